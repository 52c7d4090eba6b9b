import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from flexmerge.similarity import cosine_from_gram, gram


def test_gram_matches_direct_and_chunking():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(4, 37, 5, generator=g)
    flat = taus.reshape(4, -1).double()
    expected = (flat @ flat.T).numpy()
    np.testing.assert_allclose(gram(taus).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(gram(taus, chunk=7).numpy(), expected, rtol=1e-6)


def test_cosine_hand_example():
    a, b, c = np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.array([-2.0, 0.0])
    t = np.stack([a, b, c])
    cos = cosine_from_gram(t @ t.T)
    assert cos[0, 1] == 1 / np.sqrt(2) or abs(cos[0, 1] - 1 / np.sqrt(2)) < 1e-12
    assert cos[0, 2] == -1.0
    assert np.all(np.diag(cos) == 1.0)


def test_zero_vectors_never_nan():
    t = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    cos = cosine_from_gram(t @ t.T)
    assert not np.isnan(cos).any()
    assert cos[0, 1] == 1.0  # two frozen blocks: perfectly similar
    assert cos[0, 2] == 0.0 and cos[2, 1] == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5), min_size=3, max_size=3), min_size=2, max_size=5))
def test_cosine_bounded_symmetric(rows):
    t = np.array(rows)
    cos = cosine_from_gram(t @ t.T)
    assert np.all(np.abs(cos) <= 1.0) and np.allclose(cos, cos.T) and not np.isnan(cos).any()
