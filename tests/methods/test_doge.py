"""DOGE (Wei et al. 2025) as FusionBench's doge_ta: the closed-form gradient against autograd of
FusionBench's loss, the projected Adam against a transcription of its loop, hand examples of the
coefficients, the subspace, the projection and the mask, what is left out, FusionBench itself."""

import copy

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.doge import (doge_delta, doge_gradient, doge_lambdas, doge_matrix,
                                    shared_basis)
from helpers import group, one_thread  # noqa: F401  (one torch thread for this module)


def _fb_loss(taus, lams, delta):
    """FusionBench's ``taskvector_loss``, transcribed (works in the dtype given)."""
    scaled = (taus * lams.view(-1, 1, 1)).sum(0)
    d = (delta.unsqueeze(0) * lams.view(-1, 1, 1)).sum(0)
    return sum((-v * scaled - v * d + v * v).sum(dim=1).pow(2).sum() for v in taus)


def _reference_delta(taus, lams, subspace, steps, lr):
    """FusionBench's subspace and ``optimize_delta`` loop, transcribed: float32 SVDs, the explicit
    ``[out, out]`` projection, autograd of the loss, ``torch.optim.Adam``."""
    g, out, inp = taus.shape
    low = min(out, inp)
    r = low // g
    sum_u = torch.zeros(out, low)
    for i, t in enumerate(taus):
        u, _, _ = torch.linalg.svd(t, full_matrices=False)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
    uu, _, _ = torch.linalg.svd(sum_u, full_matrices=False)
    proj = uu[:, :low // subspace] @ uu[:, :low // subspace].T
    delta = torch.nn.Parameter(torch.zeros(out, inp))
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _fb_loss(taus, lams, delta).backward()
        delta.grad.sub_(proj @ delta.grad)
        opt.step()
    return delta.detach()


def _randn(*shape, seed, scale=1e-2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _merge(spec, **stacks):
    m, grp = make_method(spec), group(**stacks)
    m.global_pass(lambda: iter(grp.task_vectors.items()), grp.size)
    return m.merge(grp).merged


# -- the pieces -------------------------------------------------------------------------------

def test_lambdas_are_lambda_over_each_norm_and_zero_for_a_zero_vector():
    taus = torch.stack([torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, -0.5]]), torch.zeros(1, 2)])
    torch.testing.assert_close(doge_lambdas(taus, 0.07), torch.tensor([0.014, 0.14, 0.0]), atol=0, rtol=1e-6)


@pytest.mark.parametrize("g,shape", [(3, (6, 5)), (2, (4, 9)), (4, (7, 7))])
def test_gradient_equals_autograd_of_fusion_benchs_loss(g, shape):
    taus = _randn(g, *shape, seed=g)
    lams = doge_lambdas(taus, 0.07).double()
    delta = _randn(*shape, seed=10 + g).double().requires_grad_(True)
    _fb_loss(taus.double(), lams, delta).backward()
    ours = doge_gradient(taus.double(), lams, delta.detach())
    torch.testing.assert_close(ours, delta.grad, atol=0, rtol=1e-9)


def test_shared_subspace_hand_example():
    """g = 2, [6, 6]: r = 3 top left singular vectors each, tau_1's e1 e2 e3 and tau_2's e1 e4 e5;
    U_bar U_bar^T = diag(2, 1, 1, 1, 1, 0), so with subspace = 6 (k = 1) the basis is +-e1."""
    t1 = torch.diag(torch.tensor([5.0, 4.0, 3.0, 0.1, 0.2, 0.3]))
    t2 = torch.diag(torch.tensor([6.0, 0.1, 0.2, 4.0, 2.0, 0.3]))
    b = shared_basis(torch.stack([t1, t2]), 6)
    assert b.shape == (6, 1)
    torch.testing.assert_close(b.abs(), torch.eye(6)[:, :1], atol=1e-12, rtol=0)
    # subspace = 3 asks for k = 2 but directions 2..5 tie: the top one is still e1
    assert shared_basis(torch.stack([t1, t2]), 3).shape == (6, 2)
    # k = floor(6 / 7) = 0 and r = floor(6 / 7) = 0: no subspace
    assert shared_basis(torch.stack([t1, t2]), 7).shape == (6, 0)
    assert shared_basis(torch.stack([t1] * 7), 1).shape == (6, 0)


def test_directions_of_zero_singular_value_are_dropped():
    """Rank-1 members: each gives one left singular vector, not r = 3 arbitrary ones; a zero
    member gives none; U_bar of rank 2 gives at most 2 directions even when k = 6."""
    u1, u2, v = torch.eye(6)[0], torch.eye(6)[1], torch.ones(6)
    taus = torch.stack([torch.outer(u1, v), torch.outer(u2, v) * 2, torch.zeros(6, 6)])
    b = shared_basis(taus, 1)
    assert b.shape == (6, 2)
    torch.testing.assert_close(b @ b.T, torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0])), atol=1e-12, rtol=0)


def test_projection_keeps_delta_off_the_shared_subspace():
    """The basis of :func:`test_shared_subspace_hand_example` is e1: the gradient's row 0 is
    removed at every step, so Delta's row 0 stays (numerically) zero; without the subspace it moves.
    One Adam step from zero is -lr * g / (|g| + eps) with g the projected gradient."""
    t1 = torch.diag(torch.tensor([5.0, 4.0, 3.0, 0.1, 0.2, 0.3])) * 1e-2
    t2 = torch.diag(torch.tensor([6.0, 0.1, 0.2, 4.0, 2.0, 0.3])) * 1e-2
    t2[0, 3] = 0.02
    taus = torch.stack([t1, t2])
    lams = doge_lambdas(taus, 0.07)
    basis = shared_basis(taus, 6)
    delta = doge_delta(taus, lams, basis, 400, 1e-4)
    assert delta[0].abs().max() < 1e-12 and delta[1:].abs().max() > 1e-3
    free = doge_delta(taus, lams, torch.zeros(6, 0), 400, 1e-4)
    assert free[0].abs().max() > 1e-3
    g = doge_gradient(taus, lams, torch.zeros(6, 6))
    g[0] = 0.0
    torch.testing.assert_close(doge_delta(taus, lams, basis, 1, 1e-4), -1e-4 * g / (g.abs() + 1e-8),
                               atol=1e-12, rtol=1e-6)


@pytest.mark.parametrize("g,shape,subspace", [(3, (12, 18), 6), pytest.param(2, (20, 12), 4, marks=pytest.mark.slow),
                                               (4, (8, 8), 2), pytest.param(8, (24, 16), 6, marks=pytest.mark.slow)])
def test_projected_adam_matches_fusion_benchs_loop(g, shape, subspace):
    taus = _randn(g, *shape, seed=20 + g)
    lams = doge_lambdas(taus, 0.07)
    ref = _reference_delta(taus, lams, subspace, 400, 1e-4)
    ours = doge_delta(taus, lams, shared_basis(taus, subspace), 400, 1e-4)
    assert ours.abs().max() > 1e-2  # Delta moved (400 steps of about lr each)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-4)


def test_adam_lowers_the_loss():
    taus = _randn(3, 10, 7, seed=30)
    lams = doge_lambdas(taus, 0.07)
    delta = doge_delta(taus, lams, shared_basis(taus, 6), 400, 1e-4)
    assert _fb_loss(taus.double(), lams.double(), delta.double()) < 0.5 * _fb_loss(
        taus.double(), lams.double(), torch.zeros(10, 7, dtype=torch.float64))


# -- the method -------------------------------------------------------------------------------

def test_without_steps_it_is_task_arithmetic_with_task_aware_lambdas_and_the_mask():
    """steps = 0: Delta = 0, merged = sum_i lambda/||tau_i|| tau_i * m_i. Each task's vector has
    D = 10 entries, k = 0.3 keeps its 3 largest |tau| (the 0.5 of task 1 ties with nothing)."""
    t1 = torch.tensor([[3.0, -9.0, 0.5, 1.0, 0.0], [2.0, 8.0, -7.0, 0.25, 0.1]])
    t2 = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, 0.5, 0.5]])
    out = _merge({"name": "doge", "steps": 0}, w=[t1, t2])["w"]
    m1 = torch.tensor([[0.0, 1, 0, 0, 0], [0, 1, 1, 0, 0]])
    m2 = torch.tensor([[0.0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    want = 0.07 / t1.norm() * t1 * m1 + 0.07 / t2.norm() * t2 * m2
    torch.testing.assert_close(out, want, atol=1e-8, rtol=1e-6)
    nomask = _merge({"name": "doge", "steps": 0, "k": 1.0}, w=[t1, t2])["w"]
    torch.testing.assert_close(nomask, 0.07 / t1.norm() * t1 + 0.07 / t2.norm() * t2, atol=1e-8, rtol=1e-6)


def test_merge_is_doge_matrix_with_the_global_mask():
    taus = {"a.w": _randn(3, 9, 6, seed=40), "b.w": _randn(3, 5, 11, seed=41)}
    m = make_method("doge")
    m.global_pass(lambda: iter(taus.items()), 3)
    flat = torch.cat([t.reshape(3, -1) for t in taus.values()], dim=1).abs()
    keep = int(0.3 * flat.shape[1])
    torch.testing.assert_close(m.thresholds, flat.sort(dim=1, descending=True).values[:, keep - 1], atol=0, rtol=0)
    out = m.merge(group(**taus)).merged
    for n, t in taus.items():
        want = doge_matrix(t, doge_lambdas(t, 0.07), t.abs() >= m.thresholds.view(-1, 1, 1), 6, 400, 1e-4)
        assert torch.equal(out[n], want)


def test_mask_population_is_the_optimised_tensors():
    """Biases, single flat chunks (1-D tensors), >2-D tensors and embeddings are left out; a
    tensor streamed in several chunks counts; embeddings count with embeddings=doge."""
    n = 2
    items = [("l.w", torch.ones(n, 2, 2)), ("l.b", torch.full((n, 50), 9.0)),
             ("big.w", torch.full((n, 3), 2.0)), ("big.w", torch.full((n, 3), 3.0)),
             ("conv", torch.full((n, 2, 2, 2), 7.0)), ("emb.word_embeddings.weight", torch.full((n, 4, 2), 5.0))]
    m = make_method({"name": "doge", "k": 0.1})
    assert [(k, float(v.max())) for k, v in m._population(lambda: iter(items))] == [
        ("l.w", 1.0), ("big.w", 2.0), ("big.w", 3.0)]
    m.global_pass(lambda: iter(items), n)
    assert m.thresholds.tolist() == [3.0, 3.0]  # floor(0.1 * 10) = 1 entry: the largest
    e = make_method({"name": "doge", "k": 0.1, "embeddings": "doge"})
    e.global_pass(lambda: iter(items), n)
    assert e.thresholds.tolist() == [5.0, 5.0]


def test_a_group_of_one_keeps_its_vector_and_others_are_pretrained_or_averaged():
    w, b = _randn(1, 4, 3, seed=50), _randn(1, 4, seed=51)
    out = _merge("doge", w=w, b=b)
    assert torch.equal(out["w"], w[0]) and torch.equal(out["b"], b[0])
    stacks = {"b": [[1.0, 2.0], [3.0, -2.0]], "s": [1.0, 2.0], "conv": torch.ones(2, 2, 1, 1, 1),
              "bert.embeddings.word_embeddings.weight": torch.ones(2, 5, 3)}
    out = _merge("doge", **stacks)
    assert all(torch.equal(out[n], torch.zeros_like(out[n])) for n in stacks)
    out = _merge({"name": "doge", "others": "average"}, **stacks)
    assert torch.equal(out["b"], torch.tensor([2.0, 0.0])) and torch.equal(out["s"], torch.tensor(1.5))
    assert torch.equal(out["bert.embeddings.word_embeddings.weight"], torch.ones(5, 3))


def test_embeddings_are_optimised_on_request():
    name = "bert.embeddings.word_embeddings.weight"
    taus = _randn(3, 30, 6, seed=60)
    out = _merge({"name": "doge", "embeddings": "doge", "k": 1.0}, **{name: taus})[name]
    assert torch.equal(out, doge_matrix(taus, doge_lambdas(taus, 0.07), None, 6, 400, 1e-4))


def test_identical_members_and_zero_members():
    tau = _randn(6, 5, seed=70)
    out = _merge({"name": "doge", "k": 1.0}, w=[tau] * 3)["w"]
    # every lambda_i tau_i is lambda tau/||tau||, and Delta is shared: the merge is along tau + Delta
    lams = doge_lambdas(torch.stack([tau] * 3), 0.07)
    torch.testing.assert_close(out, 3 * lams[0] * (tau + doge_delta(torch.stack([tau] * 3), lams,
                               shared_basis(torch.stack([tau] * 3), 6), 400, 1e-4)), atol=1e-8, rtol=1e-6)
    zero = _merge({"name": "doge", "k": 1.0}, w=[torch.zeros(6, 5)] * 2)["w"]
    assert torch.equal(zero, torch.zeros(6, 5))
    one = _merge({"name": "doge", "k": 1.0}, w=[tau, torch.zeros(6, 5)])["w"]
    assert torch.isfinite(one).all()


def test_deterministic_and_plain_storage():
    taus = _randn(4, 7, 5, seed=80)
    a, b = _merge("doge", w=taus)["w"], _merge("doge", w=taus.clone())["w"]
    assert torch.equal(a, b) and a.dtype == torch.float32
    m = make_method("doge")
    p = m.params
    assert (p.lam, p.k, p.subspace, p.steps, p.lr, p.others, p.embeddings) == (
        0.07, 0.3, 6, 400, 1e-4, "pretrained", "others")
    assert not m.needs_base and m.has_global_pass and not m.has_transform and m.order_invariant


def test_merge_before_the_global_pass_is_an_error():
    with pytest.raises(FlexMergeError, match="global_pass"):
        make_method("doge").merge(group(w=_randn(2, 3, 3, seed=90)))


@pytest.mark.parametrize("spec,needle", [
    ({"k": 0}, "'k'"), ({"k": 1.5}, "'k'"), ({"lambda": 0}, "'lambda'"), ({"subspace": 0}, "'subspace'"),
    ({"steps": -1}, "'steps'"), ({"steps": True}, "boolean"), ({"lr": 0}, "'lr'"),
    ({"others": "zero"}, "'others'"), ({"embeddings": "average"}, "'embeddings'"), ({"K": 30}, "unknown parameter 'K'"),
])
def test_bad_parameters_raise(spec, needle):
    with pytest.raises(FlexMergeError, match="doge") as exc:
        make_method({"name": "doge", **spec})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


# -- FusionBench ------------------------------------------------------------------------------

def _fb_models(g=3):
    """A zero pretrained model (so task vectors are the fine-tuned weights exactly) and ``g``
    fine-tuned ones; FusionBench merges the ``encoder`` weights and keeps everything else."""
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleDict({"l0": nn.Linear(18, 12), "l1": nn.Linear(12, 20, bias=False)})

    base = Tiny()
    with torch.no_grad():
        for p in base.parameters():
            p.zero_()
    models = {"_pretrained_": base}
    for i in range(g):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for j, p in enumerate(m.parameters()):
                p.copy_(_randn(*p.shape, seed=100 * i + j))
            # FusionBench keeps floor(k D) + 1 entries, we keep floor(k D): make the two
            # boundary magnitudes equal so both keep the same set
            w = [m.encoder.l0.weight, m.encoder.l1.weight]
            flat = torch.cat([x.reshape(-1) for x in w])
            order = flat.abs().argsort(descending=True)
            keep = int(0.3 * flat.numel())
            src, dst = int(order[keep - 1]), int(order[keep])
            val = flat[src].abs() * torch.sign(flat[dst])
            sizes = [x.numel() for x in w]
            which, idx = (0, dst) if dst < sizes[0] else (1, dst - sizes[0])
            w[which].view(-1)[idx] = val
        models[f"t{i}"] = m
    return models


def test_agrees_with_fusion_bench():
    """FusionBench's ``DOGE_TA_Algorithm.run`` (its defaults: subspace 6, K 30, lamda 0.07, Adam
    lr 1e-4, 400 steps) on identical inputs; the encoder bias, which it keeps pretrained, is the
    ``others: pretrained`` default here."""
    fb = pytest.importorskip("fusion_bench.method.doge_ta.doge_ta", reason="fusion_bench is not installed")
    from fusion_bench.modelpool import BaseModelPool

    models = _fb_models()
    sds = {k: {n: p.detach().clone() for n, p in m.state_dict().items()} for k, m in models.items()}
    theirs = fb.DOGE_TA_Algorithm(subspace=6, K=30, lamda=0.07).run(BaseModelPool(copy.deepcopy(models)))
    theirs = theirs.state_dict()
    names = list(sds["_pretrained_"])
    taus = {n: torch.stack([sds[f"t{i}"][n] - sds["_pretrained_"][n] for i in range(3)]) for n in names}
    m = make_method("doge")
    m.global_pass(lambda: iter(taus.items()), 3)
    ours = m.merge(group(**taus)).merged
    for n in names:
        assert ours[n].abs().max() > 0 or "bias" in n
        torch.testing.assert_close(ours[n], theirs[n].detach(), atol=2e-7, rtol=1e-4)


def test_fusion_benchs_mask_keeps_one_entry_more():
    fb = pytest.importorskip("fusion_bench.method.doge_ta.doge_ta", reason="fusion_bench is not installed")
    x = torch.arange(1.0, 11.0)
    theirs = fb.DOGE_TA_Algorithm(subspace=6, K=30, lamda=0.07).topk_values_mask(x, K=30)
    assert int(theirs.sum()) == 4  # floor(0.3 * 10) + 1
    m = make_method("doge")
    m.global_pass(lambda: iter([("w", x.reshape(1, 2, 5))]), 1)
    assert int((x >= m.thresholds[0]).sum()) == 3
