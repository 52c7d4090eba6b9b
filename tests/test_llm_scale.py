"""Merging large half-precision checkpoints: the minimum size without a Gram pass,
entry-by-entry methods merged in chunks, half-precision tasks streamed through a reused buffer.
Every path is compared with the one it replaces, bit for bit."""

from __future__ import annotations

import pytest
import torch

import flexmerge.engine as engine_mod
import flexmerge.materialize as materialize_mod
from conftest import finetune, llama_like, write_checkpoint
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError

N = 3


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    base = {k: v.to(torch.bfloat16) for k, v in llama_like(0, hidden=16, vocab=40).items()}
    tasks = {}
    for i in range(N):
        ft = {k: v.to(torch.bfloat16) for k, v in finetune({k: v.float() for k, v in base.items()}, i, 0.05).items()}
        tasks[f"t{i}"] = str(write_checkpoint(ft, d / f"t{i}", "hf_dir"))
    return {"base": str(write_checkpoint(base, d / "base", "hf_dir")), "tasks": tasks}


def state_dicts(bundle) -> dict:
    return {t: bundle.state_dict(t) for t in bundle.tasks}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for t in a:
        assert a[t].keys() == b[t].keys()
        for n in a[t]:
            assert a[t][n].dtype == b[t][n].dtype and torch.equal(a[t][n], b[t][n]), (t, n)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv"])
def test_the_minimum_size_needs_no_gram_pass_and_equals_the_planned_bundle(bf16_llama, method, monkeypatch):
    planned = FlexMerge(bf16_llama, method=method)
    want = planned.merge(planned.plan().min_units)

    def no_grams(*a, **k):
        raise AssertionError("the Gram pass ran")

    monkeypatch.setattr(engine_mod, "block_grams", no_grams)
    fm = FlexMerge(bf16_llama, method=method)
    assert fm.target_bytes("1") == want.size_bytes
    got = fm.merge(1)
    assert_same(state_dicts(got), state_dicts(want))
    assert got.size_bytes == want.size_bytes and got.manifest["plan"]["steps"] == want.manifest["plan"]["steps"]
    assert got.manifest["plan"]["planner"] == want.manifest["plan"]["planner"] == fm.config.planner
    with pytest.raises(FlexMergeError, match="outside the possible range"):
        fm.target_bytes("0.5")
    with pytest.raises(AssertionError, match="Gram pass"):  # above the minimum the plan is needed
        fm.merge(2)


def test_a_mask_method_plans_even_at_its_minimum(bf16_llama, monkeypatch):
    fm = FlexMerge(bf16_llama, method="emr")
    minimum = fm._size_plan().min_bytes
    monkeypatch.setattr(engine_mod, "block_grams", lambda *a, **k: (_ for _ in ()).throw(AssertionError("grams")))
    with pytest.raises(AssertionError, match="grams"):
        fm.merge(f"{minimum}b")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "magmax"])
@pytest.mark.parametrize("size", ["min", "mid"])
def test_chunked_merging_equals_whole_block_merging(bf16_llama, method, size, monkeypatch):
    def bundle():
        fm = FlexMerge(bf16_llama, method=method)
        plan = fm.plan()
        units = plan.min_units if size == "min" else (plan.min_units + plan.max_units) / 2
        return fm.merge(units)

    monkeypatch.setattr(materialize_mod, "chunkable", lambda m: False)
    whole = state_dicts(bundle())
    monkeypatch.undo()
    calls = []
    real = materialize_mod.merge_in_chunks
    monkeypatch.setattr(materialize_mod, "merge_in_chunks", lambda *a: calls.append(a[2].name) or real(*a))
    monkeypatch.setattr(materialize_mod, "MERGE_CHUNK_BYTES", 4 * N * 37)  # ragged 37-element chunks
    assert_same(state_dicts(bundle()), whole)
    assert calls  # the chunked path ran


def test_half_precision_tasks_stream_as_float32_task_vectors(bf16_llama):
    fm = FlexMerge(bf16_llama)
    from safetensors.torch import load_file

    base = load_file(f"{bf16_llama['base']}/model.safetensors")
    tasks = [load_file(f"{p}/model.safetensors") for p in bf16_llama["tasks"].values()]
    for chunk in (None, 23):
        seen: dict[str, list] = {}
        for name, b32, taus in fm.models.stream(chunk_elems=chunk, reuse_buffers=True, prefetch=2):
            seen.setdefault(name, []).append(taus.reshape(N, -1).clone())
            assert b32.dtype == torch.float32
        for name, parts in seen.items():
            want = torch.stack([t[name].float() - base[name].float() for t in tasks]).reshape(N, -1)
            assert torch.equal(torch.cat(parts, dim=1), want), (chunk, name)


def test_the_minimum_is_recognised_up_to_the_smallest_merge(bf16_llama, monkeypatch):
    """A target a few bytes above the minimum (``--size 1`` rounds up by the size tolerance on a
    2 GiB model) is still the minimum: every merge of a plain method saves at least the smallest
    block's bytes, so no plan can stop before its last merge below that margin."""
    fm = FlexMerge(bf16_llama, method="task_arithmetic")
    low = fm._size_plan().min_bytes
    smallest = min(w for w in fm.cost.weight_bytes if w > 0)
    assert fm._minimum_size(f"{low + smallest - 1}b") is not None
    assert fm._minimum_size(f"{low + smallest}b") is None
    planned = fm.plan()
    prefix = planned.prefix_for(f"{low + smallest - 1}b")
    assert prefix == len(planned.steps)  # the planned path agrees: all merges made


def test_source_hashes_only_when_asked(bf16_llama, tmp_path):
    from flexmerge.io import file_sha256

    plain = FlexMerge(bf16_llama).merge(1, tmp_path / "plain")
    assert {e["sha256"] for e in plain.manifest["sources"]["tasks"].values()} == {None}
    hashed = FlexMerge(dict(bf16_llama, hash_sources=True)).merge(1, tmp_path / "hashed")
    for t, entry in hashed.manifest["sources"]["tasks"].items():
        import hashlib
        from pathlib import Path

        files = sorted(Path(bf16_llama["tasks"][t]).glob("*.safetensors"))
        h = hashlib.sha256()
        for f in files:
            h.update(Path(f).read_bytes())
        assert entry["sha256"] == h.hexdigest() and len(files) == 1 and file_sha256(files[0]) == h.hexdigest()


def test_memory_estimate_by_hand_and_independent_of_n_for_chunked_methods(tmp_path, bf16_llama):
    from flexmerge.materialize import MERGE_CHUNK_BYTES
    from flexmerge.memory import estimate

    fm = FlexMerge(bf16_llama, method="task_arithmetic")
    _, grouping = fm.grouping_at(1)
    est = estimate(fm, grouping, will_plan=False)
    want = 0
    for bi, b in enumerate(fm.blockmap.blocks):  # 4 E(b) g_b + (4 + 2) max E(t) + out(b), g_b = 1
        numels = [fm.models.mergeable[p].numel for p in b.params]
        want = max(want, 4 * sum(numels) + 6 * max(numels) + fm.cost.layout(bi, [N]).nbytes)
    assert est.exact and est.chunked and est.plan_pass == 0
    assert est.merge == want + 6 * MERGE_CHUNK_BYTES

    def with_tasks(n, method):
        base = {k: v.to(torch.bfloat16) for k, v in llama_like(0, hidden=16, vocab=40).items()}
        d = tmp_path / f"{method}{n}"
        d.mkdir()
        tasks = {f"t{i}": str(write_checkpoint({k: v.to(torch.bfloat16) for k, v in
                                                finetune({k: v.float() for k, v in base.items()}, i).items()},
                                               d / f"t{i}", "safetensors")) for i in range(n)}
        f = FlexMerge({"base": str(write_checkpoint(base, d / "base", "safetensors")), "tasks": tasks},
                      method=method)
        return estimate(f, f.grouping_at(1)[1], will_plan=False).merge

    assert with_tasks(2, "task_arithmetic") == with_tasks(6, "task_arithmetic")
    assert with_tasks(6, "tsv") > with_tasks(2, "tsv")  # whole blocks of N tasks


def test_dry_run_reads_no_tensor_and_writes_nothing(bf16_llama, tmp_path, capsys, monkeypatch):
    from flexmerge.cli import main
    from flexmerge.validate import ModelSet

    def no_reads(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(ModelSet, "stream", no_reads)
    args = ["merge", "--base", bf16_llama["base"], *[x for t, p in bf16_llama["tasks"].items()
                                                      for x in ("--task", f"{t}={p}")]]
    for size, exact in (("1", True), ("2", False)):
        assert main([*args, "--size", size, "-o", str(tmp_path / "out"), "--dry-run", "--no-progress"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "peak memory (predicted)" in text and ("bound" not in text) == exact, text
    assert not (tmp_path / "out").exists()
