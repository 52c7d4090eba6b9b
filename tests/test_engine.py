import json

import pytest
import torch

from conftest import bert_like, finetune, gpt2_like, llama_like, write_checkpoint
from flexmerge import available_methods
from flexmerge.bundle import Bundle
from flexmerge.engine import FlexMerge
from flexmerge.io import open_checkpoint
from helpers import stored_bytes

FAMILIES = {"bert": bert_like, "gpt2": gpt2_like, "llama": llama_like}


def make_set(tmp_path, family="bert", kind="safetensors", n=3, exclude=True):
    base = FAMILIES[family](0)
    tasks = {}
    for i in range(n):
        heads = {"classifier.weight": torch.randn(2 + i, 8), "classifier.bias": torch.randn(2 + i)} \
            if family == "bert" else None
        tasks[f"t{i}"] = str(write_checkpoint(finetune(base, i, heads=heads), tmp_path / f"t{i}", kind))
    cfg = {"base": str(write_checkpoint(base, tmp_path / "base", kind)), "tasks": tasks}
    if family == "bert" and exclude:
        cfg["exclude"] = [r"classifier\..*"]
    return cfg


def load_sd(path):
    src = open_checkpoint(path)
    return {n: src.get(n) for n in src.names()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["hf_dir", "safetensors", "torch"])
def test_size_n_rebuilds_every_task_exactly(tmp_path, family, kind):
    cfg = make_set(tmp_path, family, kind)
    fm = FlexMerge(cfg, method="task_arithmetic")
    bundle = fm.merge(3.0, out=tmp_path / "out")
    assert bundle.size_units == 3.0
    for t, path in cfg["tasks"].items():
        sd = bundle.state_dict(t)
        ref = load_sd(path)
        assert list(sd) == list(ref)
        for k in ref:
            assert torch.equal(sd[k], ref[k]), (t, k)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_stores_only_originals_at_size_n(tmp_path, method):
    """Size N never calls the method's merge nor reads task vectors for merging (the merges at
    intermediate sizes are checked for every method in test_conformance.py); every task is
    rebuilt bit for bit."""
    cfg = make_set(tmp_path, "bert", "safetensors")
    fm = FlexMerge(cfg, method=method)
    fm.plan()  # the global pass and the Gram pass read everything once

    def no_merge(group):
        raise AssertionError("merge() called at size N")

    fm.method.merge = no_merge
    fm.models.stream = None
    bundle = fm.merge(3.0)
    assert {g["kind"] for b in bundle.manifest["blocks"] for g in b["groups"]} == {"original"}
    for t, path in cfg["tasks"].items():
        ref = load_sd(path)
        sd = bundle.state_dict(t)
        assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref), t


@pytest.mark.parametrize("lam", [1.0, 2.0, None])
def test_task_arithmetic_at_one_unit_is_hand_computed(tmp_path, lam):
    cfg = make_set(tmp_path, "bert", "safetensors")
    fm = FlexMerge(cfg, method={"name": "task_arithmetic", **({"lambda": lam} if lam else {})})
    lam = lam or 1.5  # the default: the paper's released vision scripts (methods/average.py)
    bundle = fm.merge(1.0)
    assert bundle.size_units == 1.0
    base = load_sd(cfg["base"])
    fts = [load_sd(p) for p in cfg["tasks"].values()]
    for k, b in base.items():
        if k.startswith("classifier"):
            continue
        expected = b + lam * sum(ft[k] - b for ft in fts) / 3
        for t in cfg["tasks"]:
            torch.testing.assert_close(bundle.state_dict(t)[k], expected, rtol=0, atol=1e-6)
    # heads stay task-specific
    for t, ft in zip(cfg["tasks"], fts):
        assert torch.equal(bundle.state_dict(t)["classifier.weight"], ft["classifier.weight"])


def test_average_equals_task_arithmetic_lambda_one(tmp_path):
    cfg = make_set(tmp_path)
    a = FlexMerge(cfg, method="average").merge(1.0).state_dict("t0")
    b = FlexMerge(cfg, method={"name": "task_arithmetic", "lambda": 1.0}).merge(1.0).state_dict("t0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tasks_in_one_group_share_stored_tensors_and_bytes_are_exact(tmp_path):
    cfg = make_set(tmp_path)
    fm = FlexMerge(cfg, method="task_arithmetic")
    plan = fm.plan()
    for size in (3.0, 2.2, 1.5, 1.0):
        bundle = fm.merge(size, out=tmp_path / f"b{size}")
        grouping = plan.at(size)
        assert bundle.size_bytes == grouping.size_bytes <= size * plan.unit_bytes
        assert stored_bytes(tmp_path / f"b{size}", bundle.manifest) == bundle.size_bytes


def test_mask_method_sizes_and_minimum(tmp_path):
    cfg = make_set(tmp_path, n=4)
    fm = FlexMerge(cfg, method="consensus")
    plan = fm.plan()
    # pretrained + merged + 4 one-bit masks per element of fp32 weights: 2 + 4/32 units
    # (per-tensor rounding of masks up to whole bytes adds a little)
    assert 2 + 4 / 32 <= plan.min_units < 2 + 4 / 32 + 0.02
    sizes = plan.sizes()
    assert all(b <= a for a, b in zip(sizes, sizes[1:]))
    bundle = fm.merge(plan.min_units, out=tmp_path / "m")
    assert stored_bytes(tmp_path / "m", bundle.manifest) == bundle.size_bytes


def test_tied_weights_counted_once_and_exported_as_source(tmp_path):
    cfg = make_set(tmp_path, "gpt2", "torch")
    fm = FlexMerge(cfg, method="task_arithmetic")
    assert "lm_head.weight" not in fm.models.mergeable
    assert fm.models.aliases == {"lm_head.weight": "transformer.wte.weight"}  # the first name is kept
    bundle = fm.merge(1.0, out=tmp_path / "out")
    out = bundle.export("t1", tmp_path / "t1-merged.pt")
    sd = torch.load(out, weights_only=True)
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()


def test_export_keeps_hf_files_and_round_trips(tmp_path):
    cfg = make_set(tmp_path, "bert", "hf_dir")
    bundle = FlexMerge(cfg).merge(2.0, out=tmp_path / "out")
    loaded = Bundle.load(tmp_path / "out", verify=True)
    out = loaded.export("t2", tmp_path / "t2-merged")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert json.loads((out / "config.json").read_text())["name"] == "t2"
    exported = load_sd(out)
    expect = bundle.state_dict("t2")
    assert list(exported) == list(expect) and all(torch.equal(exported[k], expect[k]) for k in expect)


def test_plan_is_deterministic_and_reusable_for_other_linkages(tmp_path):
    cfg = make_set(tmp_path, n=4)
    p1 = FlexMerge(cfg).plan()
    p2 = FlexMerge(cfg).plan()
    assert p1.steps == p2.steps
    fm = FlexMerge(cfg)
    fm.plan()
    # re-planning from the Gram matrices reads no tensor
    fm.models.stream = None
    other = fm.plan(linkage="avg", order="right-left")
    assert other.linkage == "avg" and other.steps[0].block == p1.blocks[-1]


def test_bf16_checkpoints_store_bf16(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in bert_like(0).items()}
    tasks = {f"t{i}": str(write_checkpoint({k: v.to(torch.bfloat16) for k, v in finetune(base, i).items()},
                                           tmp_path / f"t{i}", "safetensors")) for i in range(2)}
    cfg = {"base": str(write_checkpoint(base, tmp_path / "base", "safetensors")), "tasks": tasks}
    fm = FlexMerge(cfg)
    b = fm.merge(1.0)
    assert {v.dtype for v in b.state_dict("t0").values()} == {torch.bfloat16}
    assert fm.plan().unit_bytes == sum(v.numel() * 2 for k, v in base.items())


def test_apply_task_in_place_rebuilds_each_task_and_restores(tmp_path):
    cfg = make_set(tmp_path, n=4)
    fm = FlexMerge(cfg, method="emr")
    bundle = fm.merge(fm.plan().min_units, out=tmp_path / "emr")
    sd0 = bundle.state_dict("t0")
    # a module whose state_dict keys are the bundle's names
    class Holder(torch.nn.Module):
        def __init__(self, sd):
            super().__init__()
            self.p = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v.clone()) for k, v in sd.items()})

        def state_dict(self, *a, keep_vars=False, **k):
            return {kk.replace("__", "."): v for kk, v in self.p.items()}

    holder = Holder(sd0)
    ptrs = {k: v.data_ptr() for k, v in holder.state_dict().items()}
    bundle.apply_task(holder, "t0")
    with bundle.task_weights(holder, "t2"):
        got = holder.state_dict()
        want = bundle.state_dict("t2")
        assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("classifier"))
    got = holder.state_dict()
    assert all(torch.equal(got[k], sd0[k]) for k in sd0)
    assert {k: v.data_ptr() for k, v in holder.state_dict().items()} == ptrs  # in place


def test_model_preset_is_whole_model_merging(tmp_path):
    cfg = make_set(tmp_path, n=3)
    fm = FlexMerge({**cfg, "blocks": "model"})
    plan = fm.plan()
    assert plan.blocks == ["model"] and [s.size_units for s in plan.steps] == [2.0, 1.0]


@pytest.mark.parametrize("method", ["task_arithmetic", "consensus", "tsv"])
def test_group_cache_gives_the_same_bundles_at_every_size(tmp_path, method):
    cfg = make_set(tmp_path, "bert", "safetensors", n=4)
    plain, cached = FlexMerge(cfg, method=method), FlexMerge(cfg, method=method)
    cached.cache_groups(True)
    plan = plain.plan()
    cached.use_plan(plan)
    for steps in range(len(plan.steps), -1, -1):  # largest to smallest, then back up
        g = plan.grouping(steps)
        a, b = plain.merge(grouping=g, plan=plan), cached.merge(grouping=g, plan=plan)
        for t in plain.tasks:
            sa, sb = a.state_dict(t), b.state_dict(t)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (steps, t)
    assert cached._group_cache  # groups were actually kept


def test_materialize_reports_progress_once_per_block(tmp_path):
    from flexmerge.materialize import materialize

    fm = FlexMerge(make_set(tmp_path))
    calls = []
    blocks = list(materialize(fm.models, fm.method, fm.plan().at(1.0), fm.cost,
                              progress=lambda done, total: calls.append((done, total))))
    n = len(fm.blockmap.blocks)
    assert [b.index for b in blocks] == list(range(n)) and calls == [(i + 1, n) for i in range(n)]


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from flexmerge.outputs import atomic_path, write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "t.json", {"a": 1})
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
