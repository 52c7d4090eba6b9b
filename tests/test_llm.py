"""Decoder LLMs as they come: HF causal-LM directories with sharded bf16 weights (Llama untied and
tied, GPT-2), merged, exported as sharded HF directories, written straight from a size-1 merge,
served with generation; bad LLM inputs give one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flexmerge.bundle import Bundle  # noqa: E402
from flexmerge.cli import main  # noqa: E402
from flexmerge.engine import FlexMerge  # noqa: E402
from flexmerge.errors import FlexMergeError  # noqa: E402
from flexmerge.runtime import MultiTaskModel  # noqa: E402

TASKS = ("t0", "t1", "t2")
SHARD = "2KB"  # a few tensors per shard at these sizes


def _config(family: str):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=32, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                       initializer_range=0.5)
    return transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                                    max_position_embeddings=64, initializer_range=0.5,
                                    tie_word_embeddings=family == "llama_tied")


def _model(cfg):
    return transformers.AutoModelForCausalLM.from_config(cfg)


def save_llm_set(root: Path, family: str, dtype=torch.bfloat16, scale: float = 0.05) -> dict:
    """A random base and three fine-tunes (base + ``scale``·N(0, 1) per tensor, ties kept), each
    saved with ``save_pretrained`` as a sharded HF directory in ``dtype``. Returns the config."""
    cfg = _config(family)
    torch.manual_seed(0)
    base = _model(cfg).to(dtype)
    base.save_pretrained(root / "base", max_shard_size=SHARD)
    tasks = {}
    for i, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(100 + i)
        m = _model(cfg)
        sd = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype)
              for k, v in base.state_dict().items()}
        m.load_state_dict(sd)
        m.tie_weights()
        m.to(dtype).save_pretrained(root / t, max_shard_size=SHARD)
        tasks[t] = str(root / t)
    return {"base": str(root / "base"), "tasks": tasks}


def load(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


IDS = torch.tensor([[3, 7, 1, 30, 12, 5], [9, 9, 2, 17, 0, 4]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def shard_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))


FAMILIES = ["llama", "llama_tied", "gpt2"]


@pytest.fixture(params=FAMILIES)
def llm(request, tmp_path):
    return request.param, save_llm_set(tmp_path / "in", request.param)


# ------------------------------------------------------------------------------------ size N
def test_size_n_exports_reproduce_every_fine_tune(llm, tmp_path):
    family, cfg = llm
    assert (Path(cfg["base"]) / "model.safetensors.index.json").is_file()  # the inputs are sharded
    fm = FlexMerge({**cfg, "method": "task_arithmetic"})
    bundle = fm.merge(float(len(TASKS)), out=tmp_path / "b")
    for t in TASKS:
        out = bundle.export(t, tmp_path / f"x-{t}", max_shard_size=SHARD)
        files = shard_files(out)
        assert len(files) > 1 and all(f.startswith("model-") for f in files)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
        source = json.loads((Path(cfg["tasks"][t]) / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(source["weight_map"])  # tied names as the source had them
        assert index["metadata"]["total_size"] == source["metadata"]["total_size"]
        exported, original = load(out), load(cfg["tasks"][t])
        assert exported.dtype == torch.bfloat16
        assert torch.equal(logits(exported), logits(original))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in shard_files(Path(folder)):
        out.update(load_file(str(Path(folder) / f)))
    return out


LAM = 1.5


def hand_task_arithmetic(cfg: dict) -> dict[str, torch.Tensor]:
    """base + λ·mean_i(θ_i − base) per tensor, in float32, cast to the checkpoint dtype (bf16)."""
    base = read_weights(cfg["base"])
    tasks = [read_weights(p) for p in cfg["tasks"].values()]
    out = {}
    for k, b in base.items():
        b32 = b.float()
        taus = torch.stack([t[k].float() - b32 for t in tasks])
        out[k] = (b32 + LAM * taus.mean(0)).to(b.dtype)
    return out


def test_size_one_task_arithmetic_equals_hand_computation_and_hf_out(llm, tmp_path, capsys):
    family, cfg = llm
    fm = FlexMerge({**cfg, "method": {"name": "task_arithmetic", "lambda": LAM}})
    fm.merge(1.0, out=tmp_path / "b")
    expect = hand_task_arithmetic(cfg)
    ref = None
    for t in TASKS:
        out = Bundle.load(tmp_path / "b").export(t, tmp_path / f"x-{t}", max_shard_size=SHARD)
        got = read_weights(out)
        assert set(got) == set(expect)
        for k in expect:
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], expect[k]), k
        model = load(out)
        ref = logits(model) if ref is None else ref
        assert torch.equal(logits(model), ref)  # one model for every task
    # the same model written straight from the merge, without a bundle
    yaml = tmp_path / "merge.yaml"
    yaml.write_text(json.dumps({**cfg, "method": {"name": "task_arithmetic", "lambda": LAM}}))
    assert main(["merge", str(yaml), "--size", "1", "--hf-out", str(tmp_path / "hf"),
                 "--max-shard-size", SHARD, "--no-progress"]) == 0
    assert "wrote HF directory" in capsys.readouterr().out
    direct = read_weights(tmp_path / "hf")
    assert set(direct) == set(expect) and all(torch.equal(direct[k], expect[k]) for k in expect)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == \
        json.loads((Path(cfg["base"]) / "config.json").read_text())
    assert torch.equal(logits(load(tmp_path / "hf")), ref)
    # one file when the weights fit in a shard; a rerun replaces its own earlier output
    assert main(["merge", str(yaml), "--size", "1", "--hf-out", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert shard_files(tmp_path / "hf") == ["model.safetensors"]
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert torch.equal(logits(load(tmp_path / "hf")), ref)


def test_streamed_export_equals_the_bundles_rebuild_for_a_mask_method(tmp_path):
    """Exports rebuild one tensor at a time (originals of several members, masked groups): the
    written weights equal :meth:`Bundle.state_dict`, which rebuilds the task whole."""
    cfg = save_llm_set(tmp_path / "in", "llama_tied")
    fm = FlexMerge({**cfg, "method": "emr"})
    from flexmerge.plan import Grouping

    # blocks alternately in groups {t0, t1} + {t2} (a mask method keeps originals there: cheaper) and
    # one masked group of all three
    groups = {b.name: [(0, 1), (2,)] if i % 2 else [(0, 1, 2)] for i, b in enumerate(fm.blockmap.blocks)}
    nbytes = sum(fm.cost.layout(i, [len(g) for g in groups[b.name]]).nbytes for i, b in enumerate(fm.blockmap.blocks))
    grouping = Grouping(groups, steps=0, size_bytes=nbytes, size_units=nbytes / fm.cost.unit_bytes)
    bundle = fm.merge(grouping=grouping, out=tmp_path / "b")
    kinds = [g["kind"] for b in bundle.blocks for g in b.groups if len(g["tasks"]) > 1]
    assert "masked" in kinds and "original" in kinds
    for t in TASKS:
        got = read_weights(bundle.export(t, tmp_path / f"x-{t}", max_shard_size=SHARD))
        whole = bundle.state_dict(t)
        assert set(got) == set(whole)
        assert all(torch.equal(got[k], whole[k]) for k in whole)


# ------------------------------------------------------------------------------------ serving
def test_multitask_model_generates_and_forwards_like_each_exported_task(llm, tmp_path):
    """At an intermediate size (shared and own blocks), every task served from the bundle gives the
    exported task model's logits and greedy tokens exactly, alone and in a mixed batch."""
    check_serving(llm[1], tmp_path)


def test_multitask_model_float32_llama(tmp_path):
    check_serving(save_llm_set(tmp_path / "in", "llama", dtype=torch.float32), tmp_path)


def test_generate_takes_prompts_of_different_lengths_per_task(tmp_path):
    """Tasks whose prompts differ in length are left-padded and masked in one batch; each task's
    greedy tokens equal its own call, and its sequences start with its own prompt."""
    cfg = save_llm_set(tmp_path / "in", "llama", dtype=torch.float32)
    FlexMerge({**cfg, "method": "task_arithmetic"}).merge(2.0, out=tmp_path / "b")
    mt = MultiTaskModel.from_bundle(tmp_path / "b")
    prompts = {"t2": IDS[:, 2:], "t0": IDS, "t1": {"input_ids": IDS[:, 3:], "attention_mask": torch.ones(2, 3,
                                                                                                     dtype=torch.long)}}
    # 31 occurs in no prompt (HF masks a prompt's own pad tokens when no attention_mask is given)
    together = mt.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=31)
    assert list(together) == ["t2", "t0", "t1"]  # the caller's order
    for t, x in prompts.items():
        ids = x["input_ids"] if isinstance(x, dict) else x
        alone = mt.generate(ids, task=t, max_new_tokens=5, do_sample=False, pad_token_id=31)
        assert together[t].shape == (2, ids.shape[1] + 5)
        assert torch.equal(together[t][:, : ids.shape[1]], ids)
        assert torch.equal(together[t], alone), t
    with pytest.raises(FlexMergeError, match="pad_token_id 99 that would pad .* outside the model's 32 token ids"):
        mt.generate(prompts, max_new_tokens=2, pad_token_id=99)
    with pytest.raises(FlexMergeError, match="'position_ids' cannot be"):
        mt.generate({"t0": IDS, "t1": {"input_ids": IDS[:, 1:], "position_ids": IDS[:, 1:]}}, max_new_tokens=2)


def check_serving(cfg, tmp_path):
    fm = FlexMerge({**cfg, "method": "task_arithmetic"})
    plan = fm.plan()
    bundle = fm.merge((plan.min_units + plan.max_units) / 2, out=tmp_path / "b")
    assert {len(b.groups) for b in bundle.blocks} >= {1, 2}  # some blocks shared, some not
    mt = MultiTaskModel.from_bundle(tmp_path / "b")
    mixed = mt({t: {"input_ids": IDS} for t in TASKS})
    together = mt.generate({t: IDS for t in TASKS}, max_new_tokens=6, do_sample=False)
    for t in TASKS:
        ref = load(bundle.export(t, tmp_path / f"x-{t}"))
        expect = ref.generate(IDS, max_new_tokens=6, do_sample=False)
        assert expect.shape[1] > IDS.shape[1]
        alone = mt.generate(IDS, task=t, max_new_tokens=6, do_sample=False)
        assert torch.equal(alone, expect) and torch.equal(together[t], expect)
        assert torch.equal(mt({t: {"input_ids": IDS}})[t].logits, logits(ref))
        assert torch.equal(mixed[t].logits, logits(ref))
    outputs = {t: mt.generate(IDS, task=t, max_new_tokens=6, do_sample=False) for t in TASKS}
    assert any(not torch.equal(outputs[TASKS[0]], outputs[t]) for t in TASKS[1:])  # tasks do differ
    with pytest.raises(FlexMergeError, match="one task per call"):
        mt.generate({t: IDS for t in TASKS}, max_new_tokens=2, num_beams=2)
    with pytest.raises(FlexMergeError, match="unknown task 'zz'"):
        mt.generate(IDS, task="zz", max_new_tokens=2)


# ------------------------------------------------------------------------------------ bad input
def run_cli(args, capsys) -> str:
    """Run the CLI expecting exit code 2; return its one-line error."""
    capsys.readouterr()  # drop what the set-up printed (transformers' progress bars)
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def llama_set(tmp_path):
    return save_llm_set(tmp_path / "in", "llama")


def merge_args(cfg, tmp_path, *extra):
    yaml = tmp_path / "merge.yaml"
    yaml.write_text(json.dumps(cfg))
    return ["merge", yaml, "--size", "1", "-o", tmp_path / "out", "--no-progress", *extra]


def nothing_written(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and not (tmp_path / "hf").exists() and \
        not [p for p in tmp_path.iterdir() if ".flexmerge-" in p.name]


def test_extended_vocabulary_is_named_with_both_row_counts_and_the_way_out(llama_set, tmp_path, capsys):
    cfg = llama_set
    m = load(cfg["tasks"]["t1"])
    m.resize_token_embeddings(40)
    m.save_pretrained(cfg["tasks"]["t1"], max_shard_size=SHARD)
    err = run_cli(merge_args(cfg, tmp_path), capsys)
    assert "task 't1'" in err and "'model.embed_tokens.weight' has 40 rows but the base has 32" in err
    assert "resize it back to 32 rows" in err and "exclude" in err
    assert nothing_written(tmp_path)
    # the way out it names works: the tensors stay task-specific and the task keeps its 40 rows
    fm = FlexMerge({**cfg, "exclude": [r"model\.embed_tokens\.weight", r"lm_head\.weight"]})
    bundle = fm.merge(1.0, out=tmp_path / "b")
    wide = load(bundle.export("t1", tmp_path / "x1", max_shard_size=SHARD))
    assert wide.get_input_embeddings().weight.shape[0] == 40
    assert torch.equal(wide.get_input_embeddings().weight, m.get_input_embeddings().weight.to(torch.bfloat16))


def test_missing_shard(llama_set, tmp_path, capsys):
    shard = sorted(Path(llama_set["tasks"]["t2"]).glob("model-0000*.safetensors"))[1]
    shard.unlink()
    err = run_cli(merge_args(llama_set, tmp_path), capsys)
    assert f"task 't2': shard(s) {shard.name} listed in model.safetensors.index.json are missing" in err
    assert "copy them there" in err and nothing_written(tmp_path)


def test_shard_that_lies_about_its_tensors(llama_set, tmp_path, capsys):
    index_path = Path(llama_set["tasks"]["t1"]) / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = list(index["weight_map"].values())
    name, real = next((n, f) for n, f in index["weight_map"].items() if files.count(f) > 1)
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != real)
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    err = run_cli(merge_args(llama_set, tmp_path), capsys)
    assert f"task 't1': model.safetensors.index.json says shard {other} holds tensor '{name}', but {real} does" in err
    assert "re-save the model" in err and nothing_written(tmp_path)
    del index["weight_map"][name]  # a shard holding a tensor the index does not list
    index_path.write_text(json.dumps(index))
    err = run_cli(merge_args(llama_set, tmp_path), capsys)
    assert f"shard {real} holds tensor '{name}', which model.safetensors.index.json does not list" in err
    assert nothing_written(tmp_path)


def test_mismatched_dtypes_name_the_file(llama_set, tmp_path, capsys):
    load(llama_set["tasks"]["t2"]).to(torch.float16).save_pretrained(llama_set["tasks"]["t2"], max_shard_size=SHARD)
    err = run_cli(merge_args(llama_set, tmp_path), capsys)
    assert "task 't2': tensor '" in err and str(Path(llama_set["tasks"]["t2"]) / "model-0000") in err
    assert "is float16 but the base is bfloat16 (" in err and "convert the checkpoints to one dtype" in err
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("extra,needle", [
    (["--size", "2"], "groups of tasks, so the tasks do not share one model; merge to --size 1"),
    (["--method", "emr", "--size", "2.2"], "method 'emr' stores block 'model.embed_tokens' as masked weights per task"),
    (["--exclude", r"lm_head\.weight"], "task-specific tensor 'lm_head.weight' differs between tasks 't0' and 't1'"),
    (["--max-shard-size", "lots"], "max shard size 'lots' is not a size"),
    (["-o", "{tmp}/out"], "give either -o DIR"),
])
def test_hf_out_refuses_what_is_not_one_model(llama_set, tmp_path, capsys, extra, needle):
    yaml = tmp_path / "merge.yaml"
    yaml.write_text(json.dumps(llama_set))
    args = ["merge", yaml, "--size", "1", "--hf-out", tmp_path / "hf", "--no-progress",
            *[a.format(tmp=tmp_path) for a in extra]]
    err = run_cli(args, capsys)
    assert needle in err
    if "share one model" in needle or "differs" in needle:
        assert "flexmerge export BUNDLE --task T" in err
    assert nothing_written(tmp_path)


def test_export_replaces_only_its_own_directories(llama_set, tmp_path, capsys):
    FlexMerge(llama_set).merge(1.0, out=tmp_path / "b")
    target = tmp_path / "x"
    args = ["export", tmp_path / "b", "--task", "t0", "-o", target, "--max-shard-size", SHARD]
    assert main([str(a) for a in args]) == 0
    assert len(shard_files(target)) > 1
    assert main([str(a) for a in args]) == 0  # an earlier sharded export is replaced
    (target / "notes.txt").write_text("mine")
    err = run_cli(args, capsys)
    assert "was not made by flexmerge" in err and (target / "notes.txt").read_text() == "mine"
    source = Path(llama_set["tasks"]["t1"])  # a user's own sharded model directory
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    err = run_cli(["export", tmp_path / "b", "--task", "t0", "-o", source], capsys)
    assert "was not made by flexmerge" in err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


# ------------------------------------------------------------------------------------ the writer
def test_sharded_writer_cuts_as_save_pretrained_and_aligns_mixed_dtypes(tmp_path):
    """Shards by transformers' rule (in order; a new shard when the next tensor would overflow; a
    tensor over the limit alone), tensors written in any order, every dtype at an aligned offset
    (an odd-sized bf16 tensor before float32 ones), read back bit for bit by safetensors."""
    from safetensors import safe_open

    from flexmerge.shards import ShardedWriter, parse_shard_size

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, generator=g).to(torch.bfloat16),      # 6 bytes
               "b": torch.randn(5, generator=g),                         # 20 bytes
               "c": torch.randn(2, 2, generator=g).to(torch.float16),    # 8 bytes
               "d": torch.randn(40, generator=g),                        # 160 bytes: over the limit
               "e": torch.arange(3),                                     # 24 bytes (int64)
               "f": torch.randn(0, 4, generator=g)}                      # empty
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with ShardedWriter(tmp_path, specs, 40, {"producer": "test"}) as w:
        for k in reversed(list(tensors)):
            w.write(k, tensors[k])
        w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # a, b, c fill 34 of 40 bytes; d (160) goes alone, listed before the open shard (as huggingface_hub's
    # split_state_dict_into_shards does); e would overflow, so it opens the third shard, with f
    shard = {1: ["d"], 2: ["a", "b", "c"], 3: ["e", "f"]}
    assert index["weight_map"] == {k: f"model-0000{i}-of-00003.safetensors" for i, ks in shard.items() for k in ks}
    hub = pytest.importorskip("huggingface_hub")  # the splitter save_pretrained uses agrees
    assert index["weight_map"] == hub.split_torch_state_dict_into_shards(tensors, max_shard_size=40).tensor_to_filename
    assert index["metadata"] == {"total_size": 218, "producer": "test"}
    for f in set(index["weight_map"].values()):  # every tensor's data aligned for its dtype
        raw = (tmp_path / f).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % 8 == 0
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__")
        assert all(e["data_offsets"][0] % tensors[k].element_size() == 0 for k, e in header.items()), header
    for k, f in index["weight_map"].items():
        with safe_open(str(tmp_path / f), "pt") as fh:
            assert fh.metadata() == {"producer": "test"}
            got = fh.get_tensor(k)
        assert got.dtype == tensors[k].dtype and torch.equal(got, tensors[k]), k
    assert parse_shard_size("500MB") == 500 * 10**6 and parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2GiB") == 2 * 2**30 and parse_shard_size("1000") == 1000 and parse_shard_size(7) == 7
    for bad in ("", "lots", "0", "-5MB", "5 parsecs"):
        with pytest.raises(FlexMergeError, match="max shard size"):
            parse_shard_size(bad)
