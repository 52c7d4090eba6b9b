"""The CLI on PEFT adapters: blocks, plan, merge, inspect, export (one task, or an adapter set), and
bad adapter sets as one-line errors with exit 2 and nothing written."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_adapters import inputs, make_base, make_lora, peft_out  # noqa: E402

from flexmerge.cli import main  # noqa: E402


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what building the fixtures printed
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture()
def setup(tmp_path):
    base = make_base(tmp_path)
    for i, t in enumerate(("a", "b", "c")):
        make_lora(base, tmp_path / t, i + 1)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("base: base\ntasks:\n  a: a\n  b: b\n  c: c\nmethod: {name: task_arithmetic, lambda: 1.0}\n")
    return tmp_path, base, cfg


def test_cli_plan_merge_inspect_export(setup, capsys):
    tmp, base, cfg = setup
    rc, out, err = run_cli(capsys, "blocks", cfg)
    assert rc == 0 and "encoder.layer.1.attention" in out, err
    rc, out, err = run_cli(capsys, "plan", cfg, "-o", tmp / "plan.json", "--no-progress")
    assert rc == 0 and "3 -> 1 units" in out, (out, err)
    rc, out, err = run_cli(capsys, "merge", cfg, "--size", "3", "-o", tmp / "full", "--no-progress")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "inspect", tmp / "full", "--verify")
    assert rc == 0 and "3 of 3 units" in " ".join(out.split()), (out, err)
    rc, out, err = run_cli(capsys, "export", tmp / "full", "--task", "b", "-o", tmp / "b-out")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp / "b-out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(peft_out(base, tmp / "b-out"), peft_out(base, tmp / "b"))
    rc, out, err = run_cli(capsys, "export", tmp / "full", "--task", "b", "-o", tmp / "b-out")  # its own export
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "merge", cfg, "--size", "1", "-o", tmp / "one", "--plan", tmp / "plan.json",
                           "--no-progress")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "export", tmp / "one", "--adapter-set", "-o", tmp / "set")
    assert rc == 0, err
    meta = json.loads((tmp / "set" / "adapters.json").read_text())
    assert meta["tasks"] == {"a": "a", "b": "a", "c": "a"} and meta["adapters"] == ["a"]
    rc, out, err = run_cli(capsys, "export", tmp / "one", "-o", tmp / "x")
    assert rc == 2 and len(err) == 1 and "--adapter-set" in err[0] and not (tmp / "x").exists()


@pytest.mark.parametrize("case", ["target_modules", "base", "missing", "mask_method", "user_dir"])
def test_cli_bad_adapters_exit_2_and_write_nothing(setup, capsys, case):
    tmp, base, cfg = setup
    args = ["merge", cfg, "--size", "1", "-o", tmp / "out", "--no-progress"]
    needles = []
    if case == "target_modules":
        make_lora(base, tmp / "c", 3, target_modules=["query"])
        needles = ["adapter 'c'", "target_modules"]
    elif case == "base":
        conf = json.loads((tmp / "c" / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = "another/model"
        (tmp / "c" / "adapter_config.json").write_text(json.dumps(conf))
        needles = ["adapter 'c'", "base_model_name_or_path"]
    elif case == "missing":
        (tmp / "c" / "adapter_model.safetensors").unlink()
        needles = ["adapter 'c'", "adapter_model.safetensors is missing"]
    elif case == "mask_method":
        args += ["--method", "consensus"]
        needles = ["consensus", "plain method"]
    else:  # a user's directory as an export target: refused, untouched
        assert run_cli(capsys, "merge", cfg, "--size", "1", "-o", tmp / "bundle", "--no-progress")[0] == 0
        (tmp / "mine").mkdir()
        (tmp / "mine" / "notes.txt").write_text("keep")
        args = ["export", tmp / "bundle", "--task", "a", "-o", tmp / "mine"]
        needles = ["mine"]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err
    if case == "user_dir":
        assert [p.name for p in (tmp / "mine").iterdir()] == ["notes.txt"]
    else:
        assert not (tmp / "out").exists()
    assert not [p for p in tmp.iterdir() if ".flexmerge-" in p.name]


def test_python_entry_points_know_adapter_bundles(setup, capsys):
    """``Bundle.export`` writes a PEFT adapter directory; ``MultiTaskModel`` serves adapter bundles
    (tests/test_adapters_serve.py); ``--hf-out`` refuses adapters in one line instead of failing
    on a missing config.json or an internal error."""
    from flexmerge.bundle import Bundle
    from flexmerge.runtime import MultiTaskModel

    tmp, base, cfg = setup
    assert main(["merge", str(cfg), "--size", "3", "-o", str(tmp / "full"), "--no-progress"]) == 0
    bundle = Bundle.load(tmp / "full")
    bundle.export("c", tmp / "c-out")
    assert torch.equal(peft_out(base, tmp / "c-out"), peft_out(base, tmp / "c"))
    mt = MultiTaskModel.from_bundle(bundle)
    with torch.no_grad():
        assert torch.equal(mt({"c": inputs()})["c"].last_hidden_state, peft_out(base, tmp / "c"))
    rc, out, err = run_cli(capsys, "merge", cfg, "--size", "1", "--hf-out", tmp / "hf", "--no-progress")
    assert rc == 2 and len(err) == 1 and "adapters" in err[0] and not (tmp / "hf").exists()
