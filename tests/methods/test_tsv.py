"""TSV-M (Gargiulo et al. 2025): hand examples, the paper's equations in plain torch, invariants."""

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from helpers import group


def _whiten_cols(x):
    """X (X^T X)^{-1/2}: the orthogonal polar factor of a full-column-rank X (TSV Eq. 8)."""
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def _tsv_reference(taus, r):
    """TSV-M from the paper: top-r triplets per task, concatenated, U and V whitened."""
    us, ss, vs = [], [], []
    for t in taus.to(torch.float64):
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        us.append(u[:, :r]); ss.append(s[:r]); vs.append(vh[:r].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return _whiten_cols(u) @ torch.diag(s) @ _whiten_cols(v).T


def test_orthogonal_rank_one_tasks_sum_exactly():
    e = torch.eye(4)
    t1 = 3.0 * torch.outer(e[0, :3], e[1])
    t2 = -2.0 * torch.outer(e[2, :3], e[3])
    out = make_method("tsv").merge(group(w=[t1, t2])).merged["w"]
    torch.testing.assert_close(out, t1 + t2, atol=1e-6, rtol=0)


def test_matches_paper_equations_on_random_full_rank_matrices():
    gen = torch.Generator().manual_seed(0)
    taus = torch.randn(2, 6, 5, generator=gen)
    out = make_method("tsv").merge(group(w=list(taus))).merged["w"]
    expected = _tsv_reference(taus, r=5 // 2)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-6)
    # three tasks, rank 6 // 3 = 2 each, alpha scales the result
    taus3 = torch.randn(3, 6, 7, generator=gen)
    out3 = make_method({"name": "tsv", "alpha": 0.5}).merge(group(w=list(taus3))).merged["w"]
    torch.testing.assert_close(out3, 0.5 * _tsv_reference(taus3, r=2).float(), atol=1e-6, rtol=1e-6)


def test_task_order_does_not_matter():
    gen = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 7, 6, generator=gen)
    a = make_method("tsv").merge(group(w=list(taus))).merged["w"]
    b = make_method("tsv").merge(group(w=list(taus.flip(0)))).merged["w"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_identical_rank_one_task_vectors_return_themselves():
    u = torch.tensor([1.0, 2.0, 2.0, 0.0]) / 3
    v = torch.tensor([0.0, 0.6, 0.8])
    tau = 2.5 * torch.outer(u, v)
    out = make_method("tsv").merge(group(w=[tau, tau, tau])).merged["w"]
    torch.testing.assert_close(out, tau, atol=1e-6, rtol=0)
    out2 = make_method({"name": "tsv", "alpha": 2.0}).merge(group(w=[tau, tau])).merged["w"]
    torch.testing.assert_close(out2, 2 * tau, atol=1e-6, rtol=0)


def test_identical_full_rank_task_vectors_give_their_rank_k_over_g_truncation():
    gen = torch.Generator().manual_seed(2)
    tau = torch.randn(5, 4, generator=gen)
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    top2 = (u[:, :2] * s[:2]) @ vh[:2]  # k = 4, g = 2 -> 2 triplets per task
    out = make_method("tsv").merge(group(w=[tau, tau])).merged["w"]
    torch.testing.assert_close(out, top2.float(), atol=1e-6, rtol=0)


def test_zero_task_vector_is_ignored_and_all_zero_gives_zero():
    e = torch.eye(3)
    tau = torch.diag(torch.tensor([4.0, 3.0, 0.0]))
    out = make_method("tsv").merge(group(w=[tau, torch.zeros(3, 3)], b=[e[0], torch.zeros(3)])).merged
    # k = 3, g = 2 -> 1 triplet: the top one of tau; the zero task adds nothing
    torch.testing.assert_close(out["w"], 4.0 * torch.outer(e[0], e[0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["b"], e[0] / 2)
    zero = make_method("tsv").merge(group(w=[torch.zeros(3, 2)] * 2)).merged["w"]
    assert torch.equal(zero, torch.zeros(3, 2))


def test_non_matrices_and_too_thin_matrices_are_averaged_then_scaled():
    a = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([2.0, 2.0])]
    conv = [torch.full((2, 1, 2, 2), float(i)) for i in range(3)]
    thin = [torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]) * i for i in (1, 2, 3)]  # k = 2 < g = 3
    out = make_method({"name": "tsv", "alpha": 2.0}).merge(group(b=a, c=conv, t=thin)).merged
    torch.testing.assert_close(out["b"], torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(out["c"], torch.full((2, 1, 2, 2), 2.0))
    torch.testing.assert_close(out["t"], 2.0 * 2.0 * thin[0])
    assert all(t.dtype == torch.float32 for t in out.values())


def test_rank_fraction_overrides_one_over_g():
    gen = torch.Generator().manual_seed(3)
    taus = torch.randn(2, 6, 6, generator=gen)
    out = make_method({"name": "tsv", "rank_fraction": 1 / 6}).merge(group(w=list(taus))).merged["w"]
    torch.testing.assert_close(out, _tsv_reference(taus, r=1).float(), atol=1e-6, rtol=1e-6)


def test_no_masks_and_flags():
    m = make_method("tsv")
    stored = m.merge(group(w=[torch.eye(2), torch.eye(2)]))
    assert stored.masks is None and stored.scalars is None
    assert not m.needs_base and not m.randomized and not m.has_global_pass


@pytest.mark.parametrize("params", [{"alpha": 0}, {"alpha": -1}, {"rank_fraction": 0},
                                    {"rank_fraction": 1.5}, {"k": 0.2}])
def test_bad_parameters_raise(params):
    with pytest.raises(FlexMergeError, match="tsv"):
        make_method({"name": "tsv", **params})
