import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from flexmerge.similarity import cosine_from_gram, gram


def test_gram_matches_direct_and_chunking():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(4, 37, 5, generator=g)
    flat = taus.reshape(4, -1).double()
    expected = (flat @ flat.T).numpy()
    np.testing.assert_allclose(gram(taus).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(gram(taus, cols=7).numpy(), expected, rtol=1e-6)


def test_gram_float32_overflow_is_redone_in_float64():
    # 3e20^2 overflows float32 but the weights are finite: the slice is recomputed in float64
    taus = torch.tensor([[3e20, 1.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float32)
    got = gram(taus, cols=2).numpy()
    flat = taus.double()
    np.testing.assert_allclose(got, (flat @ flat.T).numpy(), rtol=1e-12)
    assert np.isfinite(got).all()


def test_gram_non_finite_input_shows_on_diagonal():
    taus = torch.tensor([[1.0, float("nan")], [1.0, 2.0]])
    assert not np.isfinite(gram(taus).numpy()[0, 0])
    taus = torch.tensor([[1.0, 2.0], [float("inf"), 2.0]])
    assert not np.isfinite(gram(taus).numpy()[1, 1])


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


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_stream_with_reused_buffers_yields_the_same_chunks(tmp_path, prefetch):
    from conftest import bert_like, finetune, write_checkpoint
    from flexmerge.validate import open_models

    base = bert_like(0)
    cfg = {"base": str(write_checkpoint(base, tmp_path / "base", "safetensors")),
           "tasks": {f"t{i}": str(write_checkpoint(finetune(base, i), tmp_path / f"t{i}", "safetensors"))
                     for i in range(3)}}
    models = open_models(cfg)
    fresh = [(n, t.clone()) for n, _, t in models.stream(chunk_elems=50)]
    reused = [(n, t.clone()) for n, _, t in models.stream(chunk_elems=50, reuse_buffers=True,
                                                            prefetch=prefetch)]
    assert len(fresh) == len(reused) > len(models.mergeable)  # some tensors came in chunks
    for (na, ta), (nb, tb) in zip(fresh, reused):
        assert na == nb and torch.equal(ta, tb)


def test_block_grams_equal_the_direct_products(tmp_path):
    from conftest import bert_like, finetune, write_checkpoint
    from flexmerge.validate import open_models
    from flexmerge.similarity import block_grams

    base = bert_like(0)
    tasks = [finetune(base, i) for i in range(4)]
    cfg = {"base": str(write_checkpoint(base, tmp_path / "base", "safetensors")),
           "tasks": {f"t{i}": str(write_checkpoint(sd, tmp_path / f"t{i}", "safetensors"))
                     for i, sd in enumerate(tasks)}}
    models = open_models(cfg)
    for chunk in (None, 64, 1 << 21):
        grams = block_grams(models, chunk_elems=chunk)
        for block in models.blockmap.blocks:
            t = torch.stack([torch.cat([(sd[p] - base[p]).reshape(-1).double() for p in block.params])
                             for sd in tasks])
            np.testing.assert_allclose(grams[block.name], (t @ t.T).numpy(), rtol=1e-5, atol=1e-9)
