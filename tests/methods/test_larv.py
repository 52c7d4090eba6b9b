"""LARV (Wang et al. 2026): the proxies by hand and against brute-force numpy, the gates, the
wrapper against an independent reference computation, groups of one, composition with TIES and
Iso-C, errors; FusionBench when it ships LARV."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import bert_like, finetune, write_checkpoint
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError
from flexmerge.methods import GroupInput, make_method
from flexmerge.methods.larv import (commutator_conflict, continuous_gate, effective_rank, layer_of,
                                    layer_scores, matrix_proxies, tiered_gate)
from helpers import group, one_thread  # noqa: F401  (one torch thread for this module)


def stream_of(taus: dict, base: dict | None):
    def start():
        return iter(taus.items())
    if base is not None:
        start.base = lambda n: base[n]
    return start


# -- the proxies --------------------------------------------------------------------------------

def test_effective_rank_by_hand():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0, rel=1e-12)      # flat spectrum: n
    assert effective_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(2))) == pytest.approx(1.0)  # rank 1
    p = torch.tensor([9.0, 16.0], dtype=torch.float64) / 25  # sigma = 3, 4
    want = math.exp(float(-(p * p.log()).sum()))
    assert effective_rank(torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])) == pytest.approx(want, rel=1e-12)
    assert effective_rank(torch.zeros(3, 4)) == 0.0


def test_commutator_conflict_by_hand():
    # W0 = I: W0 D^T - D W0^T = D^T - D and W0^T D - D^T W0 = D - D^T, so c = ||D - D^T|| / (sqrt(n) ||D||)
    d = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert commutator_conflict(torch.eye(2), d) == pytest.approx(1.0)            # sqrt(2) / (sqrt(2) * 1)
    assert commutator_conflict(torch.eye(3), torch.ones(3, 3)) == 0.0            # commutes
    assert commutator_conflict(torch.eye(3), torch.zeros(3, 3)) == 0.0           # no update


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (7, 2)])
def test_commutator_conflict_equals_the_explicit_products(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    a, d = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    an, dn = a.double().numpy(), d.double().numpy()
    left = np.linalg.norm(an @ dn.T - dn @ an.T)      # [rows, rows]
    right = np.linalg.norm(an.T @ dn - dn.T @ an)     # [cols, cols]
    want = 0.5 * (left + right) / (np.linalg.norm(an) * np.linalg.norm(dn))
    assert commutator_conflict(a, d) == pytest.approx(want, rel=1e-9)
    assert commutator_conflict(a.T, d.T) == pytest.approx(want, rel=1e-9)


def _np_reff(m: np.ndarray) -> float:
    s2 = np.linalg.svd(m, compute_uv=False) ** 2
    if s2.sum() == 0:
        return 0.0
    p = s2[s2 > 0] / s2.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_matrix_proxies_against_numpy_svd():
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(6, 4, generator=gen)
    d = torch.randn(6, 4, generator=gen)
    taus = torch.stack([d, 0.1 * d, torch.zeros(6, 4), torch.randn(6, 4, generator=gen)])
    e, c = matrix_proxies(w0, taus)
    for t in (0, 3):
        assert float(e[t]) == pytest.approx(_np_reff(w0.double().numpy()) / (_np_reff(taus[t].double().numpy()) + 1e-8), rel=1e-9)
    assert float(e[2]) == 0.0 and float(c[2]) == 0.0  # a zero update counts e = c = 0
    assert float(c[0]) == pytest.approx(float(c[1]), rel=1e-6) and float(e[0]) == pytest.approx(float(e[1]), rel=1e-6)
    assert float(c[3]) != pytest.approx(float(c[0]), rel=1e-3)  # both are scale-invariant in D, not constant


# -- score and gates ----------------------------------------------------------------------------

def test_layer_scores_by_hand():
    e = torch.tensor([[2.0, 1.0, 4.0]], dtype=torch.float64)
    c = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    depth = torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64)
    z = [-math.sqrt(1.5), 0.0, math.sqrt(1.5)]  # (c - 0.2) / std_pop, std_pop = sqrt(2/3) * 0.1
    want = [e_ * d ** 0.5 / (1 + math.log1p(math.exp(z_))) for e_, d, z_ in zip([2.0, 1.0, 4.0], depth.tolist(), z)]
    got = layer_scores(e, c, depth, eta=1.0, rho=0.5)
    assert got[0].tolist() == pytest.approx(want, rel=1e-12)
    # equal conflicts: std 0 counts as 1, z = 0 everywhere
    flat = layer_scores(e, torch.full_like(c, 0.5), depth, eta=2.0, rho=0.0)
    assert flat[0].tolist() == pytest.approx([4 / (1 + math.log(2)), 1 / (1 + math.log(2)), 16 / (1 + math.log(2))])


def test_tiered_gate_by_hand():
    s = torch.tensor([[0.1, 0.5, 0.9, 0.3, 0.7, 0.2]], dtype=torch.float64)
    # sorted 0.1 0.2 0.3 0.5 0.7 0.9: the 1/3 quantile is 0.2 + (2/3)(0.1) = 0.2667, the 2/3 one 0.5 + (1/3)(0.2) = 0.5667
    assert tiered_gate(s, [0.5, 1.0, 1.5])[0].tolist() == [0.5, 1.0, 1.5, 1.0, 1.5, 0.5]
    # two levels: the median 0.4
    assert tiered_gate(s, [0.8, 1.2])[0].tolist() == [0.8, 1.2, 1.2, 0.8, 1.2, 0.8]
    # each task's layers are ranked on their own; ties take the lower tier
    two = torch.tensor([[1.0, 2.0, 3.0], [30.0, 20.0, 10.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    assert tiered_gate(two, [0.5, 1.0, 1.5]).tolist() == [[0.5, 1.0, 1.5], [1.5, 1.0, 0.5], [0.5, 0.5, 0.5]]


def test_continuous_gate_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    want = [1.0, 1 + 0.5 * math.tanh(3.0), 1 - 0.5 * math.tanh(3.0)]
    assert continuous_gate(s, 3.0)[0].tolist() == pytest.approx(want, rel=1e-12)


def test_layer_of_names():
    assert layer_of("bert.encoder.layer.3.attention.self.query.weight") == ("bert.encoder.layer.3", "bert.encoder.layer", 3)
    assert layer_of("model.layers.11.mlp.up_proj.weight")[1:] == ("model.layers", 11)
    assert layer_of("bert.embeddings.word_embeddings.weight") is None
    assert layer_of("classifier.weight") is None


# -- the wrapper against an independent computation ----------------------------------------------

def _model(seed: int, n: int = 3):
    """Pretrained tensors and N task vectors of a 3-layer toy encoder plus an embedding."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"enc.layer.0.q.weight": (5, 4), "enc.layer.0.q.bias": (5,), "enc.layer.0.ff.weight": (3, 5),
              "enc.layer.1.q.weight": (5, 4), "enc.layer.1.norm.weight": (4,),
              "enc.layer.2.q.weight": (5, 4), "enc.layer.2.ff.weight": (3, 5), "enc.layer.3.norm.weight": (4,),
              "emb.weight": (6, 4)}
    base = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    taus = {k: torch.randn(n, *s, generator=gen) * torch.rand(n, *([1] * len(s)), generator=gen)
            for k, s in shapes.items()}
    return base, taus


def _reference_scales(base, taus, levels=(0.5, 1.0, 1.5), eta=1.0, rho=0.5):
    """``{layer index: [N]}`` from numpy SVDs, explicit commutators and numpy quantiles."""
    n = next(iter(taus.values())).shape[0]
    mats = {0: ["enc.layer.0.q.weight", "enc.layer.0.ff.weight"], 1: ["enc.layer.1.q.weight"],
            2: ["enc.layer.2.q.weight", "enc.layer.2.ff.weight"]}  # layer 3 has no matrix
    num_layers = 4  # the stack has layers 0..3
    e = np.zeros((n, 3))
    c = np.zeros((n, 3))
    for li, names in mats.items():
        for name in names:
            a = base[name].double().numpy()
            for t in range(n):
                d = taus[name][t].double().numpy()
                e[t, li] += _np_reff(a) / (_np_reff(d) + 1e-8) / len(names)
                left = np.linalg.norm(a @ d.T - d @ a.T)
                right = np.linalg.norm(a.T @ d - d.T @ a)
                c[t, li] += 0.5 * (left + right) / (np.linalg.norm(a) * np.linalg.norm(d)) / len(names)
    depth = np.array([1, 2, 3]) / num_layers
    z = (c - c.mean(1, keepdims=True)) / c.std(1, keepdims=True)
    score = e ** eta * depth ** rho / (1 + np.log1p(np.exp(z)))
    out = {}
    for li in range(3):
        col = []
        for t in range(n):
            cuts = np.quantile(score[t], [j / len(levels) for j in range(1, len(levels))])
            col.append(levels[int((cuts < score[t, li]).sum())])
        out[li] = np.array(col)
    return out, score


def test_wrapper_with_task_arithmetic_equals_the_reference():
    base, taus = _model(0)
    m = make_method({"name": "larv", "inner": {"name": "task_arithmetic", "lambda": 1.0}})
    m.global_pass(stream_of(taus, base), 3)
    want, score = _reference_scales(base, taus)
    np.testing.assert_allclose(m.proxies["score"].numpy(), score, rtol=1e-9)
    assert sorted(set(m.scales.flatten().tolist())) != [1.0]  # not vacuous: scales differ from 1
    trans = {k: m.transform(k, t) for k, t in taus.items()}
    merged = m.merge(group(**trans)).merged
    for k, t in taus.items():
        li = int(k.split(".")[2]) if k.startswith("enc.") else None
        s = torch.ones(3) if li is None or li == 3 else torch.from_numpy(want[li]).float()
        torch.testing.assert_close(merged[k], (s.view(-1, *[1] * (t.dim() - 1)) * t).mean(0), rtol=1e-6, atol=1e-7)
    # outside numbered layers and in a layer without matrices: untouched
    assert trans["emb.weight"] is taus["emb.weight"] and trans["enc.layer.3.norm.weight"] is taus["enc.layer.3.norm.weight"]
    # a layer's biases and norms follow its matrices
    torch.testing.assert_close(trans["enc.layer.0.q.bias"] / taus["enc.layer.0.q.bias"],
                               (trans["enc.layer.0.q.weight"] / taus["enc.layer.0.q.weight"])[:, :5, 0])


def test_group_of_one_is_its_rescaled_vector_and_the_engine_keeps_originals(tmp_path):
    base, taus = _model(1)
    m = make_method({"name": "larv", "inner": {"name": "task_arithmetic", "lambda": 1.0}})
    m.global_pass(stream_of(taus, base), 3)
    trans = {k: m.transform(k, t) for k, t in taus.items()}
    for t in range(3):
        one = m.merge(GroupInput(task_vectors={k: v[t:t + 1] for k, v in trans.items()},
                                 base={k: torch.zeros(v.shape[1:]) for k, v in trans.items()}, task_ids=[t]))
        s = float(m.scales[t, m.layers.index("enc.layer.2")])
        torch.testing.assert_close(one.merged["enc.layer.2.q.weight"], s * taus["enc.layer.2.q.weight"][t])
    # through the engine, the N-unit model is every task's own checkpoint, bit for bit
    b0 = bert_like(0)
    cfg = {"base": str(write_checkpoint(b0, tmp_path / "base", "safetensors")),
           "tasks": {f"t{i}": str(write_checkpoint(finetune(b0, i), tmp_path / f"t{i}", "safetensors")) for i in range(3)}}
    fm = FlexMerge(cfg, method="larv")
    full = fm.merge(3.0)
    for t, path in cfg["tasks"].items():
        own = load_file(path)
        got = full.state_dict(t)
        assert all(torch.equal(got[k], own[k]) for k in own), t
    assert fm.method.scales is not None and fm.method.layers == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


def test_composes_with_ties_global_trim_on_the_rescaled_vectors():
    base, taus = _model(2)
    m = make_method({"name": "larv", "inner": {"name": "ties", "k": 0.3}})
    m.global_pass(stream_of(taus, base), 3)
    scaled = {k: m._rescale(k, t) for k, t in taus.items()}
    ties = make_method({"name": "ties", "k": 0.3})
    ties.global_pass(stream_of(scaled, None), 3)
    assert torch.equal(m.inner.thresholds, ties.thresholds)
    # the trim threshold differs from the one on the unscaled vectors (not vacuous)
    plain = make_method({"name": "ties", "k": 0.3})
    plain.global_pass(stream_of(taus, None), 3)
    assert not torch.equal(plain.thresholds, ties.thresholds)
    for k, t in taus.items():
        assert torch.equal(m.transform(k, t), ties.transform(k, scaled[k]))
    trans = {k: m.transform(k, t) for k, t in taus.items()}
    a, b = m.merge(group(**trans)).merged, ties.merge(group(**trans)).merged
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_composes_with_iso_c():
    base, taus = _model(3)
    m = make_method({"name": "larv", "inner": "iso_c", "gate": "continuous"})
    m.global_pass(stream_of(taus, base), 3)
    want, score = _reference_scales(base, taus)
    np.testing.assert_allclose(m.scales.numpy(), 1 + 0.5 * np.tanh(3.0 * (score - 1)), rtol=1e-9)
    trans = {k: m.transform(k, t) for k, t in taus.items()}
    scaled = {k: t * m.scales[:, m.layers.index(layer_of(k)[0])].float().view(-1, *[1] * (t.dim() - 1))
              if layer_of(k) and layer_of(k)[0] in m.layers else t for k, t in taus.items()}
    iso = make_method("iso_c").merge(group(**scaled)).merged
    got = m.merge(group(**trans)).merged
    for k in taus:
        torch.testing.assert_close(got[k], iso[k], rtol=1e-6, atol=1e-7)
    # and it is not Iso-C of the unscaled vectors
    plain = make_method("iso_c").merge(group(**taus)).merged
    assert not torch.allclose(got["enc.layer.0.q.weight"], plain["enc.layer.0.q.weight"])


# -- errors -------------------------------------------------------------------------------------

def test_errors_name_the_fix():
    with pytest.raises(FlexMergeError, match="inner method cannot be 'larv'"):
        make_method({"name": "larv", "inner": "larv"})
    with pytest.raises(FlexMergeError, match="two or three tier scales"):
        make_method({"name": "larv", "levels": [1.0]})
    with pytest.raises(FlexMergeError, match="larv', inner method: unknown merge method"):
        make_method({"name": "larv", "inner": "nope"})
    base, taus = _model(4)
    m = make_method("larv")
    with pytest.raises(FlexMergeError, match="call global_pass"):
        m.transform("enc.layer.0.q.weight", taus["enc.layer.0.q.weight"])
    with pytest.raises(FlexMergeError, match="needs the pretrained weights"):
        m.global_pass(stream_of(taus, None), 3)
    m.global_pass(stream_of(taus, base), 3)
    with pytest.raises(FlexMergeError, match="computed for 3 tasks"):
        m.transform("enc.layer.0.q.weight", taus["enc.layer.0.q.weight"][:2])


def test_describe_round_trips():
    m = make_method({"name": "larv", "inner": {"name": "ties", "k": 0.2}, "levels": [0.8, 1.2]})
    again = make_method(m.describe())
    assert again.describe() == m.describe() and again.describe()["inner"]["name"] == "ties"


# -- FusionBench ----------------------------------------------------------------------------------

def test_fusion_bench_has_no_larv_to_compare_with():
    """FusionBench 0.2.33 has no LARV (no module of that name); fail when one appears, so that a
    comparison on identical inputs gets written."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fusion-bench is not installed")
    root = spec.submodule_search_locations[0]
    found = [os.path.join(d, f) for d, dirs, files in os.walk(root) for f in dirs + files if "larv" in f.lower()]
    if not found:
        pytest.skip(f"fusion-bench at {root} ships no LARV implementation to compare with")
    pytest.fail(f"fusion-bench now ships {found[:3]}: add a comparison on identical tiny inputs")
