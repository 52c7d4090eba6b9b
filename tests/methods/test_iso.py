"""Iso-C and Iso-CTS (Marczak et al. 2025): hand examples, the paper's algorithm in plain torch,
invariants."""

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.iso import iso_cts_split
from helpers import group


def _merge(spec, **stacks):
    return make_method(spec).merge(group(**stacks)).merged


def _iso_cts_reference(taus, frac):
    """Iso-CTS as in the paper's Alg. 1 / authors' code: fixed-size buffers, SVD polar factors."""
    x = taus.double()
    g, k = x.shape[0], min(x.shape[1:])
    c = int(k * frac)
    c = k - round((k - c) / g) * g
    per = (k - c) // g
    u, s, vh = torch.linalg.svd(x.sum(0), full_matrices=False)
    U, S, V = torch.zeros(x.shape[1], k, dtype=x.dtype), torch.zeros(k, dtype=x.dtype), torch.zeros(k, x.shape[2], dtype=x.dtype)
    U[:, :c], S[:c], V[:c] = u[:, :c], s[:c], vh[:c]
    for t in range(g):
        w = x[t] - u[:, :c] @ u[:, :c].T @ x[t]
        ut, st, vt = torch.linalg.svd(w, full_matrices=False)
        sl = slice(c + t * per, c + (t + 1) * per)
        U[:, sl], S[sl], V[sl] = ut[:, :per], st[:per], vt[:per]
    pu, _, qu = torch.linalg.svd(U, full_matrices=False)
    pv, _, qv = torch.linalg.svd(V, full_matrices=False)
    return S.mean() * (pu @ qu) @ (pv @ qv)


# -- Iso-C --------------------------------------------------------------------------------------

def test_iso_c_hand_example_flattens_the_spectrum():
    t1 = torch.diag(torch.tensor([2.0, 0.0]))
    t2 = torch.diag(torch.tensor([1.0, 1.0]))
    out = _merge("iso_c", w=[t1, t2])["w"]  # sum diag(3, 1): mean singular value 2
    torch.testing.assert_close(out, 2.0 * torch.eye(2), atol=1e-6, rtol=0)
    out = _merge({"name": "iso_c", "alpha": 1.5}, w=[t1, t2], b=[torch.tensor([1.0]), torch.tensor([3.0])])
    torch.testing.assert_close(out["w"], 3.0 * torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["b"], torch.tensor([3.0]))  # mean 2, times alpha


def test_iso_c_matches_paper_equation_on_random_matrices():
    gen = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 5, 4, generator=gen)
    u, s, vh = torch.linalg.svd(taus.double().sum(0), full_matrices=False)
    expected = s.mean() * u @ vh
    torch.testing.assert_close(_merge("iso_c", w=list(taus))["w"], expected.float(), atol=1e-6, rtol=1e-6)


def test_iso_c_of_one_direction_returns_the_sum():
    u = torch.tensor([0.0, 0.6, 0.8, 0.0])
    v = torch.tensor([1.0, 0.0, 0.0])
    taus = [c * torch.outer(u, v) for c in (1.0, 2.0, 0.5)]
    torch.testing.assert_close(_merge("iso_c", w=taus)["w"], 3.5 * torch.outer(u, v), atol=1e-6, rtol=0)


# -- Iso-CTS ------------------------------------------------------------------------------------

def test_iso_cts_split_matches_the_authors_rounding():
    assert iso_cts_split(10, 3, 0.8) == (7, 1)   # int(8) common, round(2/3)=1 per task
    assert iso_cts_split(6, 2, 0.5) == (2, 2)    # round(1.5) = 2
    assert iso_cts_split(768, 8, 0.8) == (616, 19)
    assert iso_cts_split(3, 2, 0.01) == (1, 1)   # rounding up would overshoot k: clamped
    assert iso_cts_split(4, 2, 1.0) == (4, 0)


def test_iso_cts_hand_example():
    # sum = diag(5, 4, 1.5, 2); k = 4, g = 2, f = 0.5 -> common {e1, e2}, one direction per task:
    # task 1 keeps (1, e3), task 2 keeps (2, e4); spectrum (5, 4, 1, 2) -> mean 3.
    t1 = torch.diag(torch.tensor([5.0, 0.0, 1.0, 0.0]))
    t2 = torch.diag(torch.tensor([0.0, 4.0, 0.5, 2.0]))
    out = _merge({"name": "iso_cts", "common_space_fraction": 0.5}, w=[t1, t2])["w"]
    torch.testing.assert_close(out, 3.0 * torch.eye(4), atol=1e-6, rtol=0)
    # Iso-C of the same pair: mean(5, 4, 1.5, 2) = 3.125
    torch.testing.assert_close(_merge("iso_c", w=[t1, t2])["w"], 3.125 * torch.eye(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,g,frac", [((8, 6), 2, 0.5), ((7, 9), 3, 0.8), ((6, 6), 2, 0.8)])
def test_iso_cts_matches_reference_algorithm(shape, g, frac):
    gen = torch.Generator().manual_seed(sum(shape) + g)
    taus = torch.randn(g, *shape, generator=gen)
    out = _merge({"name": "iso_cts", "common_space_fraction": frac, "alpha": 1.3}, w=list(taus))["w"]
    torch.testing.assert_close(out, (1.3 * _iso_cts_reference(taus, frac)).float(), atol=1e-6, rtol=1e-6)


def test_iso_cts_with_full_common_space_is_iso_c():
    gen = torch.Generator().manual_seed(5)
    taus = list(torch.randn(3, 6, 5, generator=gen))
    a = _merge({"name": "iso_cts", "common_space_fraction": 1.0}, w=taus)["w"]
    torch.testing.assert_close(a, _merge("iso_c", w=taus)["w"], atol=1e-6, rtol=1e-6)


def test_iso_cts_defaults_and_averaging_of_non_matrices():
    m = make_method("iso_cts")
    assert m.params.common_space_fraction == 0.8 and m.params.alpha == 1.0
    out = m.merge(group(b=[torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])])).merged
    torch.testing.assert_close(out["b"], torch.tensor([2.0, 0.0]))


# -- both ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_zero_task_vectors_give_zero_without_nan(name):
    out = _merge(name, w=[torch.zeros(4, 3)] * 2, b=[torch.zeros(3)] * 2)
    assert torch.equal(out["w"], torch.zeros(4, 3)) and torch.equal(out["b"], torch.zeros(3))
    # opposite task vectors: the sum is 0 (no common space); Iso-CTS's task-specific directions
    # (4, e4, e4) and (4, e4, -e4) cancel in U_perp V_perp^T as well
    t = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = _merge({"name": name, "alpha": 1.0} if name == "iso_c"
                 else {"name": name, "common_space_fraction": 0.5}, w=[t, -t])["w"]
    torch.testing.assert_close(out, torch.zeros(4, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_no_masks_no_global_pass(name):
    m = make_method(name)
    assert not m.needs_base and not m.has_global_pass and not m.has_transform
    assert m.merge(group(w=[torch.eye(2)] * 2)).masks is None


@pytest.mark.parametrize("spec", [
    {"name": "iso_c", "alpha": 0}, {"name": "iso_c", "common_space_fraction": 0.5},
    {"name": "iso_cts", "alpha": -1}, {"name": "iso_cts", "common_space_fraction": 0},
    {"name": "iso_cts", "common_space_fraction": 1.2},
])
def test_bad_parameters_raise(spec):
    with pytest.raises(FlexMergeError, match=spec["name"]):
        make_method(spec)
