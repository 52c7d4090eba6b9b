"""Model Breadcrumbs: per-tensor band masks, mean merge, validation."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.breadcrumbs import Breadcrumbs, breadcrumbs_mask
from helpers import group


def test_hand_example_masks_top_beta_and_bottom_gamma_then_means():
    # d = 10, beta = 0.1 -> drop the 1 largest, gamma = 0.3 -> drop the 3 smallest magnitudes
    t0 = torch.tensor([1., -2., 3., -4., 5., -6., 7., -8., 9., -10.])
    t1 = torch.tensor([-10., 9., -8., 7., -6., 5., -4., 3., -2., 1.]) * 0.5
    m = Breadcrumbs(beta=0.1, gamma=0.3, **{"lambda": 2.0})
    x = m.transform("v", torch.stack([t0, t1]))
    assert torch.equal(x[0], torch.tensor([0., 0., 0., -4., 5., -6., 7., -8., 9., 0.]))
    assert torch.equal(x[1], torch.tensor([0., 4.5, -4., 3.5, -3., 2.5, -2., 0., 0., 0.]))
    out = m.merge(group(v=x)).merged["v"]
    assert torch.equal(out, x[0] + x[1])  # 2 * mean of two


def test_ranks_over_the_whole_tensor_not_per_row():
    w = torch.tensor([[[1., 2.], [3., 4.]]])
    kept = breadcrumbs_mask(w, beta=0.25, gamma=0.25)
    # whole-tensor ranks: drop 1 (smallest) and 4 (largest); per-row ranking would keep neither row whole
    assert torch.equal(kept, torch.tensor([[[False, True], [True, False]]]))


def test_exact_count_with_tied_magnitudes():
    x = torch.tensor([[1., -1., 1., -1., 1., -1., 1., -1., 1., -1.], [0.] * 10])
    kept = breadcrumbs_mask(x, beta=0.1, gamma=0.2)
    assert torch.equal(kept.sum(1), torch.tensor([7, 7]))


@pytest.mark.parametrize("g", [2, 4])
def test_no_masking_and_identical_vectors_return_them(g):
    gen = torch.Generator().manual_seed(g)
    w, b = torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)
    m = Breadcrumbs(beta=0.0, gamma=0.0)
    tv = {"w": torch.stack([w] * g), "b": torch.stack([b] * g)}
    seen = {n: m.transform(n, t) for n, t in tv.items()}
    assert all(torch.equal(seen[n], tv[n]) for n in tv)
    out = m.merge(group(**seen)).merged
    assert torch.allclose(out["w"], w, atol=1e-6) and torch.allclose(out["b"], b, atol=1e-6)


def test_defaults_mask_per_task_independently_of_the_group():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 10, generator=gen)
    m = make_method("breadcrumbs")
    assert m.describe() == {"name": "breadcrumbs", "beta": 0.01, "gamma": 0.85, "lambda": 1.0}
    all_rows = m.transform("w", x)
    assert torch.equal(all_rows[1:2], m.transform("w", x[1:2]))
    assert torch.equal((all_rows != 0).sum((1, 2)), torch.full((3,), 200 - 2 - 170))


@pytest.mark.parametrize("params", [
    {"beta": 1.0}, {"gamma": -0.1}, {"beta": 0.5, "gamma": 0.5}, {"lambda": 0}, {"density": 0.1},
])
def test_bad_parameters_raise(params):
    with pytest.raises(FlexMergeError):
        make_method({"name": "breadcrumbs", **params})


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.sampled_from([(0.01, 0.85), (0.1, 0.5), (0.0, 0.3), (0.2, 0.0), (0.34, 0.33)]),
       st.sampled_from(["ties", "normal", "tiny"]), st.integers(0, 2**31 - 1))
def test_mask_equals_a_stable_argsort_of_magnitudes(d, fractions, kind, seed):
    # the selection-based mask must keep exactly the stable ranks [floor(gamma d), d - floor(beta d))
    beta, gamma = fractions
    g = torch.Generator().manual_seed(seed)
    x = {"ties": torch.randint(-3, 4, (3, d), generator=g).float(),
         "normal": torch.randn(3, d, generator=g),
         "tiny": torch.randn(3, d, generator=g) * 1e-40}[kind]  # subnormal float32
    n_top, n_bottom = int(Fraction(repr(beta)) * d), int(Fraction(repr(gamma)) * d)
    expected = torch.zeros(3, d, dtype=torch.bool)
    for t in range(3):
        order = torch.argsort(x[t].abs(), stable=True)
        expected[t, order[n_bottom:d - n_top]] = True
    assert torch.equal(breadcrumbs_mask(x, beta, gamma), expected)
