"""Every bad input gets one clear error (exit 2 from the CLI, no traceback, nothing half-written)."""

import pytest
import torch

from conftest import bert_like, finetune, write_checkpoint
from flexmerge.cli import main
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError


@pytest.fixture
def good(tmp_path):
    base = bert_like(0)
    base.pop("classifier.weight"), base.pop("classifier.bias")
    tasks = {f"t{i}": str(write_checkpoint(finetune(base, i), tmp_path / f"t{i}", "safetensors"))
             for i in range(2)}
    return {"base": str(write_checkpoint(base, tmp_path / "base", "safetensors")), "tasks": tasks}, base


def corrupt_task(tmp_path, base, edit):
    sd = finetune(base, 5)
    edit(sd)
    return str(write_checkpoint(sd, tmp_path / "bad", "safetensors"))


W = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop(W), f"task 'bad'.*lacks tensor '{W}'"),
    (lambda sd: sd.__setitem__(W, torch.zeros(3, 3)), f"task 'bad': tensor '{W}' has shape \\[3, 3\\]"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)), "tensor 'extra.weight' that the base lacks.*exclude"),
    (lambda sd: sd.__setitem__(W, sd[W].to(torch.float16)), "is float16 but the base is float32"),
])
def test_mismatches_fail_before_heavy_work(tmp_path, good, edit, match):
    cfg, base = good
    cfg["tasks"]["bad"] = corrupt_task(tmp_path, base, edit)
    with pytest.raises(FlexMergeError, match=match):
        FlexMerge(cfg)


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_name_task_and_tensor_and_write_nothing(tmp_path, good, value, word):
    cfg, base = good

    def edit(sd):
        sd[W] = sd[W].clone()
        sd[W][0, 0] = value
    cfg["tasks"]["bad"] = corrupt_task(tmp_path, base, edit)
    with pytest.raises(FlexMergeError, match=f"task 'bad': tensor '{W}' contains {word}"):
        FlexMerge(cfg).merge(1.0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_non_finite_base_is_named_by_the_plan_pass(tmp_path, good, method):
    # the Gram pass (no transform) and the stream's own check (TIES transforms) both name it
    cfg, base = good
    bad = dict(base)
    bad[W] = base[W].clone()
    bad[W][1, 2] = float("inf")
    cfg["base"] = str(write_checkpoint(bad, tmp_path / "badbase", "safetensors"))
    with pytest.raises(FlexMergeError, match=f"base: tensor '{W}' contains Inf"):
        FlexMerge({**cfg, "method": method}).plan()


def test_config_errors(tmp_path, good):
    cfg, _ = good
    with pytest.raises(FlexMergeError, match="unknown key 'methd' \\(allowed: base, tasks, exclude"):
        FlexMerge({**cfg, "methd": "ties"})
    with pytest.raises(FlexMergeError, match="at least two tasks"):
        FlexMerge({**cfg, "tasks": {"a": cfg["tasks"]["t0"]}})
    with pytest.raises(FlexMergeError, match="unknown merge method 'tiez'; choose one of"):
        FlexMerge({**cfg, "method": "tiez"})
    with pytest.raises(FlexMergeError, match="unknown parameter 'lamda' \\(allowed: lambda\\)"):
        FlexMerge({**cfg, "method": {"name": "task_arithmetic", "lamda": 2}})
    with pytest.raises(FlexMergeError, match="'linkage': must be 'min', 'max' or 'avg'"):
        FlexMerge({**cfg, "linkage": "single"})
    with pytest.raises(FlexMergeError, match="path not found"):
        FlexMerge({**cfg, "base": str(tmp_path / "nope.safetensors")})


def test_corrupted_file(tmp_path, good):
    cfg, _ = good
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    cfg["tasks"]["bad"] = str(bad)
    with pytest.raises(FlexMergeError, match="broken.safetensors.*corrupted"):
        FlexMerge(cfg)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"PK\x03\x04garbage")
    cfg["tasks"]["bad"] = str(torn)
    with pytest.raises(FlexMergeError, match="torn.pt as a torch state dict"):
        FlexMerge(cfg)


def write_yaml(tmp_path, cfg, extra=""):
    lines = [f"base: {cfg['base']}", "tasks:"] + [f"  {k}: {v}" for k, v in cfg["tasks"].items()]
    p = tmp_path / "merge.yaml"
    p.write_text("\n".join(lines) + "\n" + extra)
    return p


@pytest.mark.parametrize("args,needle", [
    (["merge", "{cfg}", "--size", "0.5", "-o", "{out}"], "outside the possible range 1-2 units"),
    (["merge", "{cfg}", "--size", "9", "-o", "{out}"], "outside the possible range"),
    (["merge", "{cfg}", "--size", "1", "-o", "{out}", "--method", "nope"], "unknown merge method 'nope'"),
    (["merge", "{cfg}", "--size", "1", "-o", "{out}", "--set", "k=2", "--method", "ties"], "parameter 'k'"),
    (["merge", "{cfg}", "--size", "1", "-o", "{out}", "--bogus"], "No such option: --bogus"),
    (["plan", "{tmp}/missing.yaml", "-o", "{out}"], "config file not found"),
    (["inspect", "{tmp}"], "not a flexmerge bundle"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, good, capsys, args, needle):
    cfg, _ = good
    path = write_yaml(tmp_path, cfg)
    argv = [a.format(cfg=path, out=tmp_path / "out", tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_end_to_end(tmp_path, good, capsys):
    cfg, _ = good
    path = write_yaml(tmp_path, cfg, "method: {name: task_arithmetic, lambda: 1.0}\n")
    assert main(["blocks", str(path)]) == 0
    assert main(["plan", str(path), "-o", str(tmp_path / "plan.json")]) == 0
    assert main(["merge", str(path), "--size", "1.5", "-o", str(tmp_path / "out"),
                 "--plan", str(tmp_path / "plan.json")]) == 0
    assert main(["inspect", str(tmp_path / "out")]) == 0
    source = (tmp_path / "t1.safetensors").read_bytes()
    assert main(["export", str(tmp_path / "out"), "--task", "t1", "-o", str(tmp_path / "t1.safetensors")]) == 2
    assert (tmp_path / "t1.safetensors").read_bytes() == source  # the user's checkpoint is never overwritten
    assert main(["export", str(tmp_path / "out"), "--task", "t1", "-o", str(tmp_path / "t1-merged.safetensors")]) == 0
    assert (tmp_path / "t1-merged.safetensors").is_file()
    assert main(["export", str(tmp_path / "out"), "--task", "zz", "-o", str(tmp_path / "z.safetensors")]) == 2
    assert "unknown task 'zz'" in capsys.readouterr().err
    # a plan for another method is refused
    assert main(["merge", str(path), "--size", "1.5", "-o", str(tmp_path / "o2"), "--method", "ties",
                 "--plan", str(tmp_path / "plan.json")]) == 2


def test_tampered_bundle_fails_checksum(tmp_path, good):
    from flexmerge.bundle import Bundle
    cfg, _ = good
    FlexMerge(cfg).merge(1.0, out=tmp_path / "b")
    f = next((tmp_path / "b" / "tensors").glob("block-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FlexMergeError, match="fails its checksum"):
        Bundle.load(tmp_path / "b").verify()
    with pytest.raises(FlexMergeError, match="fails its checksum"):  # every read path verifies
        Bundle.load(tmp_path / "b").state_dict("t0")


def test_refuses_to_replace_a_non_bundle_directory(tmp_path, good):
    cfg, _ = good
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FlexMergeError, match="not made by flexmerge"):
        FlexMerge(cfg).merge(1.0, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
