"""Convolutional models with BatchNorm: statistics are their own kind of tensor (never merged by a
method), follow their block, are counted in sizes and never stored negative; SVD methods see conv
kernels as matrices; conv and BN share a block; block order follows the checkpoint's key order;
``curve`` refuses non-finite outputs.

The tiny CNN: a 3x3 stem conv + BN, a 1x1 (pointwise) conv + BN, a depthwise 3x3 conv + BN, a
linear head (task-specific). Tasks perturb the weights and the statistics; in half the channels a
task's running variance is 0.2 x the base's, so that ``theta_0 + 1.5 * mean tau`` (task arithmetic's
default) would be negative there.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flexmerge import available_methods
from flexmerge.blocks import build_block_map, statistics_of
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError
from flexmerge.io import TensorInfo
from flexmerge.materialize import pooled_statistics
from flexmerge.methods import make_method
from helpers import group, one_thread, stored_bytes  # noqa: F401  (one_thread: module fixture)

N_TASKS = 4


class Unit(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.dw = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = torch.relu(self.bn1(self.pw(x)))
        return torch.relu(self.bn2(self.dw(x)))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.layers = nn.ModuleList([Unit(8, 16)])
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        for u in self.layers:
            x = u(x)
        return self.head(x.mean(dim=(2, 3)))


def cnn_set(n: int = N_TASKS) -> dict:
    """Base and ``n`` task state dicts (in-memory, registration key order) and the config."""
    torch.manual_seed(0)
    base = TinyCNN().state_dict()
    g = torch.Generator().manual_seed(1)
    for k, v in base.items():
        if k.endswith("running_var"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g))
        elif k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=g))
    tasks = {}
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if k.endswith("running_var"):
                low = torch.arange(v.numel()) % 2 == 0  # half the channels: 0.2 x the base's variance
                sd[k] = torch.where(low, 0.2 * v, v * (1 + torch.rand(v.shape, generator=g)))
            elif k.endswith("running_mean"):
                sd[k] = v + 0.5 * torch.randn(v.shape, generator=g)
            elif v.is_floating_point():
                sd[k] = v + 0.1 * torch.randn(v.shape, generator=g)
            else:
                sd[k] = v + 10 * (i + 1)
        tasks[f"t{i}"] = sd
    return {"base": dict(base), "tasks": tasks, "exclude": [r"head\..*"]}


def stat_names(sd):
    return [k for k in sd if k.endswith(("running_mean", "running_var"))]


# ---- statistics are their own kind ----------------------------------------------------------


def test_conv_and_its_bn_are_one_block_and_statistics_follow_it():
    cfg = cnn_set()
    fm = FlexMerge(cfg)
    bm = fm.blockmap
    assert bm.names == ["stem", "layers.0.pw", "layers.0.dw"]  # key order: the stem first
    stem = bm.blocks[0]
    assert stem.params == ["bn0.bias", "bn0.weight", "stem.weight"]
    assert stem.statistics == ["bn0.running_mean", "bn0.running_var"]
    assert stem.stats_nbytes == 2 * 8 * 4
    assert all(not p.endswith(("running_mean", "running_var")) for b in bm.blocks for p in b.params)
    # by module type, when a model is at hand
    assert statistics_of(TinyCNN()) == {f"{m}.{s}" for m in ("bn0", "layers.0.bn1", "layers.0.bn2")
                                        for s in ("running_mean", "running_var", "num_batches_tracked")}


def test_grams_and_plan_see_weights_only():
    cfg = cnn_set()
    fm = FlexMerge(cfg)
    grams = fm.grams()
    base = cfg["base"]
    for b in fm.blockmap.blocks:
        taus = torch.stack([torch.cat([(cfg["tasks"][t][p] - base[p]).reshape(-1).double() for p in b.params])
                            for t in fm.tasks])
        assert torch.allclose(torch.from_numpy(grams[b.name]), taus @ taus.T, rtol=1e-5, atol=1e-6)


# ---- every method, every size: finite outputs, positive variances ---------------------------


def forward_outputs(sd: dict) -> torch.Tensor:
    model = TinyCNN()
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(x)


def test_fixture_would_go_negative_under_task_arithmetic():
    cfg = cnn_set()
    base = cfg["base"]
    for name in [k for k in base if k.endswith("running_var")]:
        mean_tau = torch.stack([cfg["tasks"][t][name] - base[name] for t in cfg["tasks"]]).mean(0)
        assert bool(((base[name] + 1.5 * mean_tau) < 0).any())


@pytest.mark.parametrize("method", available_methods())
def test_every_method_at_every_size_gives_finite_outputs_and_positive_variances(method):
    fm = FlexMerge(cnn_set(), method=method)
    plan = fm.plan()
    with fm.cache_groups():
        for k in range(len(plan.steps) + 1):
            bundle = fm.merge(grouping=plan.grouping(k))
            for t in fm.tasks:
                sd = bundle.state_dict(t)
                for name in sd:
                    if name.endswith("running_var"):
                        assert bool((sd[name] > 0).all()), (method, k, t, name)
                assert bool(torch.isfinite(forward_outputs(sd)).all()), (method, k, t)


# ---- the storage rules ----------------------------------------------------------------------


def hand_pooled(rows_mu, rows_var):
    """Law of total variance, element by element in Python floats."""
    mus, vs = [], []
    for c in range(len(rows_mu[0])):
        m = [float(r[c]) for r in rows_mu]
        v = [float(r[c]) for r in rows_var]
        mu = sum(m) / len(m)
        mus.append(mu)
        vs.append(sum(vi + (mi - mu) ** 2 for mi, vi in zip(m, v)) / len(v))
    return torch.tensor(mus), torch.tensor(vs)


def test_pooled_statistics_equal_a_hand_computation():
    cfg = cnn_set()
    fm = FlexMerge(cfg)
    plan = fm.plan()
    for k in range(len(plan.steps) + 1):
        grouping = plan.grouping(k)
        bundle = fm.merge(grouping=grouping)
        for block in fm.blockmap.blocks:
            for members in grouping.groups[block.name]:
                names = [fm.tasks[i] for i in members]
                for stat in stat_names(block.statistics):
                    module = stat.rpartition(".")[0]
                    mus = [cfg["tasks"][t][f"{module}.running_mean"] for t in names]
                    var = [cfg["tasks"][t][f"{module}.running_var"] for t in names]
                    want_mu, want_var = hand_pooled(mus, var)
                    for t in names:
                        got = bundle.state_dict(t)[stat]
                        if len(members) == 1:
                            assert torch.equal(got, cfg["tasks"][t][stat])  # its own, bit for bit
                        else:
                            want = want_var if stat.endswith("running_var") else want_mu
                            assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (k, stat, members)
    mu, var = pooled_statistics(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]]))
    assert mu.tolist() == [1.0] and var.tolist() == [3.0]  # (1 + 1) / 2 + (3 + 1) / 2


def test_per_task_rule_keeps_every_tasks_statistics_exactly():
    cfg = cnn_set()
    fm = FlexMerge(cfg, statistics="per_task")
    plan = fm.plan()
    bundle = fm.merge(plan.min_units)
    for t in fm.tasks:
        sd = bundle.state_dict(t)
        for stat in stat_names(cfg["base"]):
            assert torch.equal(sd[stat], cfg["tasks"][t][stat])
        assert bool(torch.isfinite(forward_outputs(sd)).all())
    with pytest.raises(FlexMergeError, match="unknown statistics rule 'mean'"):
        FlexMerge(cfg, statistics="mean")


@pytest.mark.parametrize("rule", ["pooled", "per_task"])
@pytest.mark.parametrize("method", ["task_arithmetic", "emr"])
def test_statistics_are_counted_in_sizes(tmp_path, rule, method):
    cfg = cnn_set()
    fm = FlexMerge(cfg, method=method, statistics=rule)
    weights = sum(b.nbytes for b in fm.blockmap.blocks)
    stats = sum(4 * cfg["base"][s].numel() for s in stat_names(cfg["base"]))
    assert fm.blockmap.statistics_bytes == stats
    assert fm.cost.unit_bytes == weights + stats  # one model unit: weights and statistics
    plan = fm.plan()
    assert plan.max_bytes == N_TASKS * (weights + stats)
    if method == "task_arithmetic":  # plain: one weight set, and one (pooled) or N statistics sets
        assert plan.min_bytes == weights + (stats if rule == "pooled" else N_TASKS * stats)
    for size in sorted({plan.min_units, plan.steps[len(plan.steps) // 2].size_units}):
        bundle = fm.merge(size, out=tmp_path / f"{rule}-{size:.4f}")
        assert stored_bytes(bundle.root, bundle.manifest) == bundle.size_bytes


def test_negative_input_variance_is_one_line_error():
    cfg = cnn_set()
    cfg["tasks"]["t2"]["layers.0.bn1.running_var"][3] = -0.5
    fm = FlexMerge(cfg)
    with pytest.raises(FlexMergeError, match="task 't2': normalisation variance 'layers.0.bn1.running_var' "
                                             "has negative entries") as info:
        fm.merge(fm.plan().min_units)
    assert "\n" not in str(info.value)


def test_stored_negative_variance_is_refused():
    from flexmerge.engine import _check_finite
    from flexmerge.materialize import StoredBlock

    sb = StoredBlock(index=0, name="stem:statistics", groups=[], store_base=False, nbytes=0,
                     tensors={"g0/merged/bn0.running_var": torch.tensor([1.0, -0.1])})
    with pytest.raises(FlexMergeError, match="variance g0/merged/bn0.running_var has negative entries"):
        _check_finite(sb, make_method("task_arithmetic"))


# ---- SVD methods on convolutions ------------------------------------------------------------


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_methods_treat_a_1x1_conv_exactly_as_its_linear_layer(method):
    g = torch.Generator().manual_seed(3)
    lin = torch.randn(3, 6, 5, generator=g)  # 3 tasks, [out 6, in 5]
    m = make_method(method)
    as_linear = m.merge(group(**{"fc.weight": lin})).merged["fc.weight"]
    as_conv = m.merge(group(**{"pw.weight": lin[..., None, None]})).merged["pw.weight"]
    assert as_conv.shape == (6, 5, 1, 1)
    assert torch.equal(as_conv[..., 0, 0], as_linear)
    avg = lin.mean(0)
    assert not torch.allclose(as_linear, avg)  # an SVD merge, not the average


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_methods_see_a_kxk_conv_as_out_by_in_k_k_and_average_depthwise(method):
    g = torch.Generator().manual_seed(4)
    conv = torch.randn(3, 6, 4, 3, 3, generator=g)
    m = make_method(method)
    got = m.merge(group(**{"c.weight": conv})).merged["c.weight"]
    want = m.merge(group(**{"c.weight": conv.reshape(3, 6, 36)})).merged["c.weight"].reshape(6, 4, 3, 3)
    assert torch.equal(got, want)
    dw = torch.randn(3, 6, 1, 3, 3, generator=g)
    got = m.merge(group(**{"dw.weight": dw})).merged["dw.weight"]
    assert torch.equal(got, (m.params.alpha * dw.double().mean(0)).float())


def test_bundles_note_the_depthwise_kernels_an_svd_method_averaged(tmp_path, capsys):
    from flexmerge.cli import main

    cfg = cnn_set()
    out = tmp_path / "tsv"
    fm = FlexMerge(cfg, method="tsv")
    assert fm.merge(1.0, out=out).manifest["notes"] == [
        "tsv: 1 depthwise kernels (in = 1) averaged, not merged by the method's SVD rule: layers.0.dw.weight"]
    assert main(["inspect", str(out)]) == 0
    assert "note: tsv: 1 depthwise kernels (in = 1) averaged" in capsys.readouterr().out
    assert fm.merge(float(N_TASKS)).manifest["notes"] == []  # nothing merged, nothing averaged
    assert FlexMerge(cfg, method="ties").merge(1.0).manifest["notes"] == []  # its rule covers every tensor


def test_methods_text_says_how_convolutions_are_treated(capsys):
    from flexmerge.cli import main

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("tsv", "iso_c", "iso_cts"):
        i = next(k for k, line in enumerate(lines) if line.startswith(name + " "))
        assert "depthwise kernels (in = 1) averaged" in lines[i + 1]
        assert "[out, in*k]" in lines[i + 1]


# ---- order, export, inspect, curve ----------------------------------------------------------


def test_block_order_follows_key_order_and_sorted_keys_keep_the_name_rule():
    names = ["conv_stem.weight", "bn_stem.weight", "bn_stem.running_mean", "bn_stem.running_var",
             "blocks.0.project.weight", "blocks.0.expand.weight", "blocks.1.project.weight",
             "blocks.10.project.weight", "head.weight"]
    shapes = {n: (4, 4, 1, 1) if "bn" not in n else (4,) for n in names}
    infos = {n: TensorInfo(shapes[n], torch.float32) for n in names}
    keyed = build_block_map(infos, "component", key_order=True)
    assert keyed.names == ["conv_stem", "blocks.0.project", "blocks.0.expand", "blocks.1.project",
                           "blocks.10.project", "head"]
    assert keyed.blocks[0].params == ["bn_stem.weight", "conv_stem.weight"]  # stem conv + its BN
    assert keyed.blocks[0].statistics == ["bn_stem.running_mean", "bn_stem.running_var"]
    sorted_infos = {n: infos[n] for n in sorted(names)}  # safetensors: keys sorted, no model order
    plain = build_block_map(sorted_infos, "component")
    assert plain.names == ["blocks.0.expand", "blocks.0.project", "blocks.1.project", "blocks.10.project",
                           "bn_stem", "conv_stem", "head"]
    assert plain.blocks[4].statistics == ["bn_stem.running_mean", "bn_stem.running_var"]


def test_sorted_keys_pair_conv_and_bn_by_name():
    names = ["features.0.0.weight", "features.0.1.bias", "features.0.1.running_mean", "features.0.1.running_var",
             "features.0.1.weight", "layer1.0.bn1.running_mean", "layer1.0.bn1.running_var", "layer1.0.bn1.weight",
             "layer1.0.conv1.weight"]
    infos = {n: TensorInfo((4, 4, 3, 3) if n.endswith("0.0.weight") or "conv" in n else (4,), torch.float32)
             for n in names}
    bm = build_block_map(infos, "component")
    assert {b.name: b.params for b in bm.blocks} == {
        "features.0.0": ["features.0.0.weight", "features.0.1.bias", "features.0.1.weight"],
        "layer1.0.conv1": ["layer1.0.bn1.weight", "layer1.0.conv1.weight"]}
    assert bm.blocks[bm.index["layer1.0.conv1"]].statistics == ["layer1.0.bn1.running_mean",
                                                               "layer1.0.bn1.running_var"]


def test_export_to_a_directory_with_a_trailing_slash_and_strict_load(tmp_path, capsys):
    from flexmerge.cli import main

    cfg = cnn_set()
    paths = {}
    for name, sd in [("base", cfg["base"])] + list(cfg["tasks"].items()):
        paths[name] = str(tmp_path / f"{name}.pt")
        torch.save(sd, paths[name])
    fm = FlexMerge({"base": paths["base"], "tasks": {t: paths[t] for t in cfg["tasks"]},
                    "exclude": cfg["exclude"]}, method={"name": "ties", "k": 0.2})
    fm.merge(1.0, out=tmp_path / "bundle")
    assert main(["export", str(tmp_path / "bundle"), "-t", "t1", "-o", str(tmp_path / "out") + "/"]) == 0
    sd = torch.load(tmp_path / "out" / "t1.pt", weights_only=True)
    TinyCNN().load_state_dict(sd, strict=True)
    assert torch.equal(sd["bn0.num_batches_tracked"], cfg["tasks"]["t1"]["bn0.num_batches_tracked"])
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "bundle")]) == 0
    text = capsys.readouterr().out
    assert "method ties (k=0.2, lambda=1.0)" in " ".join(text.split())
    assert "{" not in text.splitlines()[0]


class LogModel(nn.Module):
    """Outputs ``log(w)``: finite for positive weights, NaN where a merge made one negative."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return torch.log(self.w) * x


def test_curve_refuses_non_finite_outputs_naming_method_size_and_task(tmp_path):
    from flexmerge.evaluate import sweep

    base = {"w": torch.tensor([1.0, 1.0, 1.0])}
    tasks = {"a": {"w": torch.tensor([0.2, 1.5, 1.0])}, "b": {"w": torch.tensor([0.2, 1.2, 1.1])}}

    def evaluate(task, model):
        with torch.no_grad():
            return float(model(torch.ones(3)).argmax() == 0)  # argmax of NaN: a plausible score

    with pytest.raises(FlexMergeError, match=r"model for task 'a' \(task_arithmetic at 1 units\) gave NaN "
                                             "outputs") as info:
        sweep({"base": base, "tasks": tasks}, [{"name": "task_arithmetic", "lambda": 1.5}], [1], evaluate,
              model_factory=lambda task: LogModel(), out=tmp_path / "curve", plots=False)
    assert "\n" not in str(info.value)
    # the same sweep at lambda 1 (no negative weight) scores normally
    res = sweep({"base": base, "tasks": tasks}, [{"name": "task_arithmetic", "lambda": 1.0}], [1], evaluate,
                model_factory=lambda task: LogModel(), plots=False)
    assert all(math.isfinite(v) for r in res.rows for v in r["scores"].values())


def test_safetensors_lose_registration_order_and_a_model_restores_it(tmp_path):
    from safetensors.torch import save_file

    cfg = cnn_set()
    paths = {}
    for name, sd in [("base", cfg["base"])] + list(cfg["tasks"].items()):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, paths[name])
    files = {"base": paths["base"], "tasks": {t: paths[t] for t in cfg["tasks"]}, "exclude": cfg["exclude"]}
    by_name = FlexMerge(files).blockmap  # keys sorted on disk: the name rule, no conv-BN pair by name
    assert by_name.names == ["layers.0.bn1", "layers.0.bn2", "layers.0.dw", "layers.0.pw", "bn0", "stem"]
    assert by_name.blocks[0].statistics == ["layers.0.bn1.running_mean", "layers.0.bn1.running_var"]
    fm = FlexMerge(files, model=TinyCNN())
    assert fm.blockmap.names == ["stem", "layers.0.pw", "layers.0.dw"]
    assert fm.blockmap.names == FlexMerge(cfg).blockmap.names
    assert [b.statistics for b in fm.blockmap.blocks] == [b.statistics for b in FlexMerge(cfg).blockmap.blocks]
    with pytest.raises(FlexMergeError, match="model must be a torch.nn.Module"):
        FlexMerge(files, model="resnet")


def test_method_text_is_what_a_user_writes():
    from flexmerge.methods.base import method_text

    assert method_text(make_method("ties").describe()) == "ties (k=0.2, lambda=1.0)"
    assert method_text(make_method("tsv").describe()) == "tsv (alpha=1.0)"  # rank_fraction unset
    assert method_text(make_method("consensus").describe()) == "consensus (lambda_c=0.3, inner=ties (k=0.2, lambda=1.0))"
    assert method_text({"name": "average"}) == "average"
