"""WUDI-Merging (Cheng et al. 2025): the closed form against a brute-force least-squares solve,
Adam against autograd of the paper's loss, hand examples, the averaging rules, FusionBench."""

import numpy as np
import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.wudi import is_embedding, wudi_adam, wudi_closed_form, wudi_system
from helpers import group, one_thread  # noqa: F401  (one torch thread for this module)


def _loss(m, taus):
    """The paper's objective with the explicit [out, out] products, float64."""
    m = m.double()
    return sum(((m - t) @ t.T).square().sum() / t.square().sum() for t in taus.double() if t.any())


def _grad(m, taus):
    """d loss / d m by autograd of :func:`_loss`, float64."""
    m = m.double().clone().requires_grad_(True)
    _loss(m, taus).backward()
    return m.grad


def _lstsq_minimiser(taus):
    """Least-norm minimiser of the loss as one linear least-squares problem, no Grams:
    row r of m solves m_r [tau_1^T/|tau_1| ... tau_g^T/|tau_g|] = [(tau_1 tau_1^T)_r/|tau_1| ...]."""
    ts = [t for t in taus.double().numpy() if t.any()]
    norms = [np.sqrt((t * t).sum()) for t in ts]
    lhs = np.concatenate([t.T / n for t, n in zip(ts, norms)], axis=1)      # [in, g*out]
    rhs = np.concatenate([t @ t.T / n for t, n in zip(ts, norms)], axis=1)  # [out, g*out]
    return torch.from_numpy(np.linalg.lstsq(lhs.T, rhs.T, rcond=None)[0].T)


def _merge(spec, **stacks):
    return make_method(spec).merge(group(**stacks)).merged


CF = {"name": "wudi", "solver": "closed_form"}


# -- the closed form --------------------------------------------------------------------------

@pytest.mark.parametrize("g,shape", [(3, (6, 5)), (2, (3, 7)), (4, (2, 9)), (2, (8, 3)), (5, (4, 4))])
def test_closed_form_is_the_least_squares_minimiser_and_stationary(g, shape):
    gen = torch.Generator().manual_seed(g * 100 + shape[0] * 10 + shape[1])
    taus = torch.randn(g, *shape, generator=gen) * torch.rand(g, 1, 1, generator=gen)
    cf = wudi_closed_form(taus)
    ref = _lstsq_minimiser(taus)  # least norm also where g*out < in (a family of minimisers)
    torch.testing.assert_close(cf, ref, atol=1e-10, rtol=1e-9)
    scale = _grad(taus.sum(0), taus).abs().max()
    assert _grad(cf, taus).abs().max() <= 1e-10 * scale
    assert _loss(cf, taus) < _loss(taus.sum(0), taus)
    torch.testing.assert_close(_merge(CF, w=taus)["w"], cf.float(), atol=0, rtol=0)


def test_gradient_of_the_gram_form_equals_autograd_of_the_paper_loss():
    gen = torch.Generator().manual_seed(7)
    taus, m = torch.randn(3, 5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    a, b = wudi_system(taus)
    torch.testing.assert_close(2 * (m.double() @ a - b), _grad(m, taus), atol=1e-12, rtol=1e-10)


def test_hand_examples():
    # 1 x 1 matrices: every G_i / n_i = 1, so the minimiser is the mean, not the sum
    out = _merge(CF, w=[[[2.0]], [[4.0]], [[9.0]]])["w"]
    torch.testing.assert_close(out, torch.tensor([[5.0]]), atol=1e-6, rtol=0)
    # rows along one direction v: tau_i = u_i v^T -> the mean of the u_i times v^T
    v = torch.tensor([0.0, 0.6, 0.8])
    us = [torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 1.0])]
    out = _merge(CF, w=[torch.outer(u, v) for u in us])["w"]
    torch.testing.assert_close(out, torch.outer(torch.tensor([-1.0, 1.5]), v), atol=1e-6, rtol=0)
    # orthogonal row spaces: no interference, the minimiser is the sum, where Adam starts and stays
    t1 = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    t2 = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, 5.0]])
    torch.testing.assert_close(_merge(CF, w=[t1, t2])["w"], t1 + t2, atol=1e-6, rtol=0)
    assert torch.equal(_merge("wudi", w=[t1, t2])["w"], t1 + t2)


def test_identical_task_vectors_give_that_vector():
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(5, 4, generator=gen)
    v = torch.tensor([0.0, 0.6, 0.8, 0.0])
    rank_one = torch.outer(torch.tensor([1.0, 2.0, 2.0]) / 3, v)
    for tau in (full, rank_one):
        torch.testing.assert_close(_merge(CF, w=[tau] * 3)["w"], tau, atol=1e-6, rtol=1e-6)
    # Adam starts at 3 tau and descends to tau where the minimiser is unique (A of full rank) ...
    out = _merge({"name": "wudi", "lr": 3e-2, "steps": 5000}, w=[full] * 3)["w"]
    torch.testing.assert_close(out, full, atol=1e-4, rtol=0)
    # ... and elsewhere to a minimiser that differs from tau only off the row space (A's null
    # space), where its per-entry steps leave a residue: the closed form takes the least norm
    out = _merge({"name": "wudi", "lr": 3e-2, "steps": 5000}, w=[rank_one] * 3)["w"]
    torch.testing.assert_close(out @ v, rank_one @ v, atol=1e-4, rtol=0)
    assert (out - rank_one).abs().max() > 0.1


@pytest.mark.parametrize("g,k", [(2, 1), (2, 4), (9, 1)])
@pytest.mark.parametrize("factor,kept", [(0.7, False), (1.3, True)])
def test_directions_below_float32_resolution_are_dropped(g, k, factor, kept):
    """In [5, k + 1]: tau_1 = I_k + d e_k e_k^T, the g - 1 others I_k. A = diag(g/k I_k, d^2/k)
    (to first order in d^2), so the e_k direction has sqrt(lambda / lambda_max) = d / sqrt(g); it
    is kept (m = tau_1, by the normal equations) iff that exceeds max(out, in) * eps32 = 5 eps32,
    and dropped (m = I_k) otherwise."""
    d = factor * 5 * torch.finfo(torch.float32).eps * g ** 0.5
    shared = torch.zeros(5, k + 1)
    shared[range(k), range(k)] = 1.0
    t1 = shared.clone()
    t1[k, k] = d
    out = _merge(CF, w=[t1] + [shared] * (g - 1))["w"]
    torch.testing.assert_close(out, t1 if kept else shared, atol=1e-12, rtol=1e-5)
    assert bool(out[k, k] != 0) is kept


@pytest.mark.parametrize("scale,kept", [(0.9, True), (1.1, False)])
def test_rcond_truncates_the_pseudo_inverse(scale, kept):
    """The construction above with d = 0.5, g = 2, k = 1: A = diag(1/n_1 + 1, d^2/n_1),
    n_1 = 1 + d^2; the e_1 direction is kept iff sqrt(A_11 / A_00) > rcond."""
    d = 0.5
    shared = torch.zeros(3, 2)
    shared[0, 0] = 1.0
    t1 = shared.clone()
    t1[1, 1] = d
    n1 = 1 + d * d
    ratio = ((d * d / n1) / (1 / n1 + 1)) ** 0.5
    out = _merge({**CF, "rcond": scale * ratio}, w=[t1, shared])["w"]
    torch.testing.assert_close(out, t1 if kept else shared, atol=1e-6, rtol=0)
    torch.testing.assert_close(_merge(CF, w=[t1, shared])["w"], t1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", ["wudi", CF])
def test_empty_matrices_are_averaged(spec):
    out = _merge(spec, a=torch.zeros(2, 3, 0), b=torch.zeros(2, 0, 3))
    assert out["a"].shape == (3, 0) and out["b"].shape == (0, 3)


def test_zero_task_vectors_are_left_out_and_give_no_nan():
    gen = torch.Generator().manual_seed(4)
    tau = torch.randn(4, 3, generator=gen)
    zero = torch.zeros(4, 3)
    for spec in (CF, "wudi"):  # L of [tau, 0] is L of [tau] alone, minimal (0) at tau = the sum
        torch.testing.assert_close(_merge(spec, w=[tau, zero])["w"], tau, atol=1e-6, rtol=0)
        assert torch.equal(_merge(spec, w=[zero, zero])["w"], zero)


# -- Adam -------------------------------------------------------------------------------------

def _reference_adam(taus, steps, lr):
    """The paper's recipe written out: autograd of the loss with the [out, out] products,
    torch.optim.Adam from the sum, float32."""
    m = torch.nn.Parameter(taus.sum(0).clone())
    opt = torch.optim.Adam([m], lr=lr, weight_decay=0)
    norms = taus.reshape(len(taus), -1).norm(dim=1).square()
    for _ in range(steps):
        loss = (((m.unsqueeze(0) - taus) @ taus.transpose(1, 2)).square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.detach()


@pytest.mark.parametrize("scale", [1.0, 1e-7])  # at 1e-7 the gradient meets Adam's eps 1e-8
def test_adam_matches_the_papers_recipe(scale):
    gen = torch.Generator().manual_seed(5)
    taus = torch.randn(3, 6, 4, generator=gen) * scale
    ref = _reference_adam(taus, 300, 1e-5 * scale)
    out = _merge({"name": "wudi", "lr": 1e-5 * scale}, w=taus)["w"]
    torch.testing.assert_close(out, ref, atol=1e-6 * scale, rtol=1e-5)
    assert not torch.equal(out, taus.sum(0))


def test_adam_decreases_the_objective_and_approaches_the_closed_form():
    gen = torch.Generator().manual_seed(6)
    taus = torch.randn(3, 6, 5, generator=gen)
    start = _loss(taus.sum(0), taus)
    short = wudi_adam(taus, 300, 1e-5)
    assert _loss(short, taus) < start
    assert (short - taus.sum(0)).abs().max() <= 300 * 1e-5 * 1.01  # Adam's steps are about lr
    cf = wudi_closed_form(taus)
    long = wudi_adam(taus, 5000, 1e-2)
    torch.testing.assert_close(long, cf.float(), atol=1e-4, rtol=0)
    assert _loss(long, taus) - _loss(cf, taus) < 1e-8 * start


def test_adam_is_deterministic():
    gen = torch.Generator().manual_seed(8)
    taus = torch.randn(4, 7, 5, generator=gen)
    a, b = _merge("wudi", w=taus)["w"], _merge("wudi", w=taus.clone())["w"]
    assert torch.equal(a, b) and a.dtype == torch.float32


# -- what is averaged -------------------------------------------------------------------------

def test_tensors_that_are_not_matrices_are_averaged():
    b = [[1.0, 2.0], [3.0, -2.0], [5.0, 0.0]]
    conv = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 2)
    for spec in ("wudi", CF):
        out = _merge(spec, b=b, conv=conv, s=[1.0, 2.0, 6.0])
        assert torch.equal(out["b"], torch.tensor([3.0, 0.0]))
        assert torch.equal(out["conv"], conv.mean(0))
        assert torch.equal(out["s"], torch.tensor(3.0))


@pytest.mark.parametrize("name,expected", [
    ("bert.embeddings.word_embeddings.weight", True), ("bert.embeddings.position_embeddings.weight", True),
    ("transformer.wte.weight", True), ("transformer.wpe.weight", True), ("model.embed_tokens.weight", True),
    ("shared.weight", True), ("positional_embedding", True), ("vit.pos_embed", True),
    ("bert.encoder.layer.0.attention.self.query.weight", False), ("lm_head.weight", False),
    ("bert.embeddings.LayerNorm.weight", False), ("model.layers.0.mlp.shared_expert.weight", False),
])
def test_embedding_names(name, expected):
    assert is_embedding(name) is expected


def test_embeddings_are_averaged_by_default_and_optimised_on_request():
    gen = torch.Generator().manual_seed(9)
    taus = torch.randn(3, 10, 4, generator=gen)
    name = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(_merge(CF, **{name: taus})[name], taus.double().mean(0).float())
    assert torch.equal(_merge("wudi", **{name: taus})[name], taus.double().mean(0).float())
    out = _merge({**CF, "embeddings": "wudi"}, **{name: taus})[name]
    torch.testing.assert_close(out, wudi_closed_form(taus).float(), atol=0, rtol=0)
    out = _merge({"name": "wudi", "embeddings": "wudi"}, **{name: taus})[name]
    assert torch.equal(out, wudi_adam(taus, 300, 1e-5))


# -- parameters ---------------------------------------------------------------------------------

def test_defaults_and_plain_storage():
    assert [make_method({"name": "wudi", "steps": n}).params.steps for n in (1, 100_000)] == [1, 100_000]
    m = make_method("wudi")
    assert (m.params.solver, m.params.steps, m.params.lr, m.params.embeddings, m.params.rcond) == (
        "adam", 300, 1e-5, "average", None)
    assert not m.needs_base and not m.has_global_pass and not m.has_transform
    assert m.merge(group(w=[torch.eye(2)] * 2)).masks is None


@pytest.mark.parametrize("spec,needle", [
    ({"solver": "sgd"}, "'solver'"), ({"steps": 0}, "'steps'"), ({"steps": 2.5}, "'steps'"),
    ({"steps": True}, "boolean"), ({"steps": 100_001}, "'steps'"), ({"lr": 0}, "'lr'"), ({"lr": 2.0}, "'lr'"),
    ({"embeddings": "skip"}, "'embeddings'"), ({"rcond": 0.1}, "solver closed_form"),
    ({"solver": "closed_form", "rcond": 1.0}, "'rcond'"), ({"solver": "closed_form", "rcond": 0}, "'rcond'"),
    ({"lambda": 1.0}, "unknown parameter 'lambda'"),
])
def test_bad_parameters_raise(spec, needle):
    with pytest.raises(FlexMergeError, match="wudi") as exc:
        make_method({"name": "wudi", **spec})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


# -- FusionBench ------------------------------------------------------------------------------

def test_agrees_with_fusion_bench():
    """FusionBench's ``wudi_merging`` (its default 300 Adam steps, lr 1e-5) on identical inputs;
    the embedding name is given ``embeddings: wudi``, FusionBench's ``exclude_keys: null``."""
    fb = pytest.importorskip("fusion_bench.method.wudi.wudi", reason="fusion_bench is not installed")
    gen = torch.Generator().manual_seed(10)
    tvs = {"layer.dense.weight": torch.randn(3, 6, 5, generator=gen) * 1e-3,
           "emb.word_embeddings.weight": torch.randn(3, 9, 4, generator=gen) * 1e-3,
           "layer.dense.bias": torch.randn(3, 6, generator=gen) * 1e-3}
    theirs = fb.wudi_merging([{k: v[i] for k, v in tvs.items()} for i in range(3)], accelerator="cpu",
                             iter_num=300)
    ours = make_method({"name": "wudi", "embeddings": "wudi"}).merge(group(**tvs)).merged
    for k in tvs:
        torch.testing.assert_close(ours[k], theirs[k].detach(), atol=1e-8, rtol=1e-5)
