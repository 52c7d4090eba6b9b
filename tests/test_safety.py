"""Never lose a user's data; interrupted runs clean up; bundles are tamper-evident, confined and
self-contained.

Every CLI case asserts the contract: exit code 2 (or 130/143 for signals), exactly one stderr line
``error: ...``, and nothing of the user's changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flexmerge import FlexMerge
from flexmerge.bundle import Bundle
from flexmerge.cli import main
from flexmerge.errors import FlexMergeError

from conftest import bert_like, finetune, write_checkpoint


@pytest.fixture
def hf_set(tmp_path):
    """Base + three HF-directory tasks (config.json and vocab.txt beside the weights), a config file."""
    base = bert_like(0)
    write_checkpoint(base, tmp_path / "base", "hf_dir")
    for i in range(3):
        heads = {"classifier.weight": torch.randn(2 + i, 8), "classifier.bias": torch.randn(2 + i)}
        write_checkpoint(finetune(base, i, heads=heads), tmp_path / f"t{i}", "hf_dir")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text('base: base\ntasks:\n  a: t0\n  b: t1\n  c: t2\nexclude: ["classifier\\\\..*"]\n')
    return cfg


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".flexmerge-" in p.name]


# ------------------------------------------------------------------------ nothing of the user's is lost
def test_user_folder_with_a_manifest_json_is_never_replaced(hf_set, capsys):
    web = hf_set.parent / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "My PWA"}')
    (web / "index.html").write_text("<html></html>")
    before = tree(web)
    rc, err = run_cli(capsys, "merge", hf_set, "--size", "2", "-o", web, "--no-progress")
    assert_one_line_error(rc, err, str(web), "--force")
    assert tree(web) == before
    rc, err = run_cli(capsys, "merge", hf_set, "--size", "2", "-o", web, "--no-progress", "--force")
    assert rc == 0 and (web / "tensors").is_dir() and not (web / "index.html").exists()


@pytest.mark.parametrize("extra", ["notes.txt", "tensors/mine.bin", "sub/dir/x"])
def test_a_bundle_holding_a_user_file_is_not_replaced(hf_set, capsys, extra):
    out = hf_set.parent / "out"
    assert run_cli(capsys, "merge", hf_set, "--size", "2", "-o", out, "--no-progress")[0] == 0
    assert run_cli(capsys, "merge", hf_set, "--size", "1.5", "-o", out, "--no-progress")[0] == 0  # ours: replaced
    (out / extra).parent.mkdir(parents=True, exist_ok=True)
    (out / extra).write_text("mine")
    before = tree(out)
    rc, err = run_cli(capsys, "merge", hf_set, "--size", "2", "-o", out, "--no-progress")
    assert_one_line_error(rc, err, "not made by flexmerge")
    assert tree(out) == before


@pytest.mark.parametrize("target", [".", "..", "~", "/"])
def test_output_paths_that_name_no_new_directory(hf_set, capsys, target, monkeypatch):
    monkeypatch.chdir(hf_set.parent)
    rc, err = run_cli(capsys, "merge", hf_set, "--size", "2", "-o", target, "--no-progress", "--force")
    assert_one_line_error(rc, err)


def test_output_that_is_a_user_file_or_symlink(hf_set, capsys):
    f = hf_set.parent / "file.txt"
    f.write_text("keep")
    link = hf_set.parent / "link"
    link.symlink_to(hf_set.parent / "t0")
    for target in (f, link):
        rc, err = run_cli(capsys, "merge", hf_set, "--size", "2", "-o", target, "--no-progress")
        assert_one_line_error(rc, err, str(target))
    assert f.read_text() == "keep" and link.is_symlink() and (hf_set.parent / "t0" / "config.json").exists()


def test_plan_file_replaces_only_a_plan(hf_set, capsys):
    mine = hf_set.parent / "plan.json"
    mine.write_text('{"mine": true}')
    rc, err = run_cli(capsys, "plan", hf_set, "-o", mine, "--no-progress")
    assert_one_line_error(rc, err, "plan file")
    assert mine.read_text() == '{"mine": true}'
    ours = hf_set.parent / "p2.json"
    assert run_cli(capsys, "plan", hf_set, "-o", ours, "--no-progress")[0] == 0
    assert run_cli(capsys, "plan", hf_set, "-o", ours, "--no-progress")[0] == 0


def test_export_replaces_only_its_own_exports(hf_set, capsys, tmp_path):
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", hf_set, "--size", "2", "-o", out, "--no-progress")[0] == 0
    exp = tmp_path / "exp"
    assert run_cli(capsys, "export", out, "-t", "a", "-o", exp)[0] == 0
    assert run_cli(capsys, "export", out, "-t", "a", "-o", exp)[0] == 0  # its own export: replaced
    (exp / "README.md").write_text("mine")
    rc, err = run_cli(capsys, "export", out, "-t", "a", "-o", exp)
    assert_one_line_error(rc, err, "export target")
    assert (exp / "README.md").read_text() == "mine"
    # a user's own safetensors file is never replaced by a file export
    st_cfg = {"base": str(tmp_path / "base" / "model.safetensors"),
              "tasks": {t: str(tmp_path / f"t{i}" / "model.safetensors") for i, t in enumerate("abc")},
              "exclude": [r"classifier\..*"]}
    FlexMerge(st_cfg).merge(2.0, out=tmp_path / "sb")
    user = tmp_path / "user.safetensors"
    save_file({"x": torch.zeros(2)}, str(user))
    before = user.read_bytes()
    rc, err = run_cli(capsys, "export", tmp_path / "sb", "-t", "b", "-o", user)
    assert_one_line_error(rc, err, str(user))
    assert user.read_bytes() == before
    # a trailing slash names a directory to write into
    rc, _ = run_cli(capsys, "export", tmp_path / "sb", "-t", "b", "-o", str(tmp_path / "newdir") + "/")
    assert rc == 0 and (tmp_path / "newdir" / "b.safetensors").is_file()


# ------------------------------------------------------------------------ interrupted runs
_SLOW_MERGE = r'''
import pathlib, sys, time
import flexmerge.bundle as b
orig = b.BundleWriter.write
def slow(self, rel, tensors):
    orig(self, rel, tensors)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(0.2)
b.BundleWriter.write = slow
from flexmerge.cli import main
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.slow  # a few seconds (subprocesses): runs in CI's full run (.ci/run), not the default fast run
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("existing", [False, True])
def test_signals_exit_nonzero_and_leave_nothing(hf_set, capsys, sig, code, existing):
    out = hf_set.parent / "out"
    if existing:
        assert run_cli(capsys, "merge", hf_set, "--size", "3", "-o", out, "--no-progress")[0] == 0
    before = tree(out) if existing else None
    marker = hf_set.parent / "started"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, str(marker), "merge", str(hf_set), "--size", "1.5",
                             "-o", str(out), "--no-progress"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert leftovers(hf_set.parent) == []
    if existing:
        assert tree(out) == before  # the old bundle is intact
    else:
        assert not out.exists()


def test_stale_temporaries_of_a_killed_run_are_swept(hf_set, capsys):
    parent = hf_set.parent
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = parent / f".out.flexmerge-{dead}-new.tmp"
    (stale / "tensors").mkdir(parents=True)
    (stale / "tensors" / "block-00000.safetensors").write_bytes(b"x" * 100)
    other = parent / f".other.flexmerge-{dead}-new.tmp"  # another target's: not ours to sweep
    other.mkdir()
    alive = parent / f".out.flexmerge-{os.getpid()}-x.tmp"  # a live process's: kept
    alive.mkdir()
    assert run_cli(capsys, "merge", hf_set, "--size", "2", "-o", parent / "out", "--no-progress")[0] == 0
    assert not stale.exists() and other.exists() and alive.exists()


def test_a_bundle_moved_aside_by_a_killed_run_is_put_back(hf_set, capsys):
    parent = hf_set.parent
    out = parent / "out"
    assert run_cli(capsys, "merge", hf_set, "--size", "2", "-o", out, "--no-progress")[0] == 0
    before = tree(out)
    aside = parent / f".out.flexmerge-{2 ** 22 + 7}-old.tmp"
    os.replace(out, aside)  # as if killed between moving the old bundle aside and renaming the new one
    from flexmerge.outputs import sweep_stale
    assert sweep_stale(out) == [aside]
    assert tree(out) == before


# ------------------------------------------------------------------------ disk full, permissions
@pytest.mark.slow  # a few seconds (a subprocess): runs in CI's full run (.ci/run), not the default fast run
def test_file_too_large_is_one_line_naming_the_target(hf_set):
    out = hf_set.parent / "out"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000)); "
            "from flexmerge.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code, "merge", str(hf_set), "--size", "3", "-o", str(out),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(out) in lines[0] and "File too large" in lines[0]
    assert not out.exists() and leftovers(hf_set.parent) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_parent_names_the_target(hf_set, capsys):
    ro = hf_set.parent / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, err = run_cli(capsys, "merge", hf_set, "--size", "2", "-o", ro / "out", "--no-progress")
        assert_one_line_error(rc, err, str(ro / "out"))
    finally:
        ro.chmod(0o700)


def test_outputs_follow_the_umask(hf_set, capsys):
    old = os.umask(0o022)
    try:
        out = hf_set.parent / "out"
        assert run_cli(capsys, "merge", hf_set, "--size", "2", "-o", out, "--no-progress")[0] == 0
        assert run_cli(capsys, "export", out, "-t", "a", "-o", hf_set.parent / "exp")[0] == 0
        for root in (out, hf_set.parent / "exp"):
            for p in [root, *root.rglob("*")]:
                mode = stat.S_IMODE(p.stat().st_mode)
                assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    finally:
        os.umask(old)


# ------------------------------------------------------------------------ tamper-evident bundles
@pytest.fixture
def bundle_dir(hf_set, capsys):
    out = hf_set.parent / "out"
    assert run_cli(capsys, "merge", hf_set, "--size", "2", "-o", out, "--no-progress")[0] == 0
    return out


def flip(path: Path, at: int = -20, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[at + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_read_path_verifies_checksums(bundle_dir, capsys, tmp_path):
    flip(next((bundle_dir / "tensors").glob("block-*.safetensors")))
    assert run_cli(capsys, "inspect", bundle_dir)[0] == 0  # the manifest alone is cheap to check
    assert_one_line_error(*run_cli(capsys, "inspect", bundle_dir, "--verify"), "checksum")
    assert_one_line_error(*run_cli(capsys, "export", bundle_dir, "-t", "a", "-o", tmp_path / "e"), "checksum")
    assert not (tmp_path / "e").exists()
    with pytest.raises(FlexMergeError, match="checksum"):
        Bundle.load(bundle_dir).state_dict("a")
    with pytest.raises(FlexMergeError, match="checksum"):
        Bundle.load(bundle_dir).verify()
    sd = Bundle.load(bundle_dir, verify=False).state_dict("a")  # the user's explicit opt-out
    assert len(sd) > 0


def test_tampered_asset_is_caught(bundle_dir, capsys, tmp_path):
    (bundle_dir / "assets" / "a" / "config.json").write_text('{"model_type": "evil"}')
    assert_one_line_error(*run_cli(capsys, "export", bundle_dir, "-t", "a", "-o", tmp_path / "e"), "checksum")


def edit_manifest(bundle_dir: Path, fn) -> None:
    path = bundle_dir / "manifest.json"
    m = json.loads(path.read_text())
    m = fn(m)
    path.write_text(m if isinstance(m, str) else json.dumps(m))


def _retarget(m, rel, digest=None):
    """Point block 0 at ``rel`` (listed in files with ``digest``)."""
    old = m["blocks"][0]["file"]
    m["blocks"][0]["file"] = rel
    m["files"][rel] = digest or m["files"].pop(old)
    return m


@pytest.mark.parametrize("rel", ["/etc/passwd", "../../x", "../outside.safetensors", "tensors/../../y",
                                 "tensors/./block.safetensors", "", "tensors\\block.safetensors"])
def test_manifest_paths_must_stay_inside(bundle_dir, capsys, tmp_path, rel):
    outside = bundle_dir.parent / "outside.safetensors"
    shutil.copy(next((bundle_dir / "tensors").glob("block-00000.safetensors")), outside)
    edit_manifest(bundle_dir, lambda m: _retarget(m, rel))
    for argv in (("inspect", bundle_dir), ("export", bundle_dir, "-t", "a", "-o", tmp_path / "e")):
        assert_one_line_error(*run_cli(capsys, *argv))
    assert not (tmp_path / "e").exists()


def test_symlink_out_of_the_bundle_is_refused(bundle_dir, capsys, tmp_path):
    f = next((bundle_dir / "tensors").glob("block-00000.safetensors"))
    outside = tmp_path / "outside.safetensors"
    shutil.move(f, outside)
    f.symlink_to(outside)
    assert_one_line_error(*run_cli(capsys, "export", bundle_dir, "-t", "a", "-o", tmp_path / "e"), "outside")


@pytest.mark.parametrize("edit,needle", [
    (lambda m: [m], "not a flexmerge bundle manifest"),
    (lambda m: "\x00\xff garbage", "not valid JSON"),
    (lambda m: {k: v for k, v in m.items() if k != "blocks"}, "'blocks'"),
    (lambda m: {**m, "version": 1}, "version"),
    (lambda m: {**m, "format": "something"}, "not a flexmerge bundle"),
    (lambda m: {**m, "tasks": ["a", "a", "c"]}, "tasks"),
    (lambda m: {**m, "tasks": m["tasks"] + ["zz"]}, "every task"),
    (lambda m: {**m, "size": {**m["size"], "units": float("nan")}}, "size"),
    (lambda m: {**m, "blocks": [{**m["blocks"][0], "groups": [{"tasks": ["a"], "kind": "weird"}]}]}, "kind"),
    (lambda m: {**m, "files": {**m["files"], "tensors/x": "not-a-digest"}}, "sha256"),
    (lambda m: {**m, "extra_field": 1}, "extra_field"),
    (lambda m: {**m, "task_keys": {"a": []}}, "task_keys"),
])
def test_damaged_manifest_is_one_line(bundle_dir, capsys, tmp_path, edit, needle):
    edit_manifest(bundle_dir, edit)
    rc, err = run_cli(capsys, "inspect", bundle_dir)
    assert_one_line_error(rc, err, needle)
    with pytest.raises(FlexMergeError):
        Bundle.load(bundle_dir)


def test_missing_tensor_key_is_one_line(bundle_dir, capsys, tmp_path):
    """A manifest that agrees with its checksums but names a group the file does not hold."""
    def swap(m):
        b = next(b for b in m["blocks"] if len(b["groups"]) > 1)
        b["groups"][0]["kind"] = "merged" if b["groups"][0]["kind"] == "original" else "original"
        return m
    edit_manifest(bundle_dir, swap)
    assert_one_line_error(*run_cli(capsys, "export", bundle_dir, "-t", "a", "-o", tmp_path / "e"), "no tensor")


# ------------------------------------------------------------------------ self-contained bundles
def test_bundle_needs_nothing_but_itself(bundle_dir, capsys, tmp_path):
    ref = {t: Bundle.load(bundle_dir).state_dict(t) for t in "abc"}
    for name in ("base", "t0", "t1", "t2"):
        shutil.move(bundle_dir.parent / name, tmp_path / f"moved-{name}")
    for i, t in enumerate("abc"):
        exp = tmp_path / f"exp-{t}"
        assert run_cli(capsys, "export", bundle_dir, "-t", t, "-o", exp)[0] == 0
        cfg = json.loads((exp / "config.json").read_text())
        assert cfg["name"] == f"t{i}"  # the task's own config, from the bundle
        assert (exp / "vocab.txt").read_text() == "a\nb\n"
        from safetensors.torch import load_file
        got = load_file(str(exp / "model.safetensors"))
        assert set(got) == set(ref[t]) and all(torch.equal(got[k], ref[t][k]) for k in got)


def test_from_bundle_and_serve_need_only_the_bundle(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from flexmerge import MultiTaskModel

    def cfg(labels):
        return transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=16, num_labels=labels)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg(2))
    base.save_pretrained(tmp_path / "src" / "base")
    tasks = {}
    for i, n in enumerate((2, 3)):
        m = transformers.BertForSequenceClassification(cfg(n))
        sd = {k: (v if k.startswith("classifier.") else base.state_dict()[k] + 0.05 * torch.randn(v.shape))
              for k, v in m.state_dict().items()}
        m.load_state_dict(sd)
        m.save_pretrained(tmp_path / "src" / f"t{i}")
        tasks[f"t{i}"] = str(tmp_path / "src" / f"t{i}")
    FlexMerge({"base": str(tmp_path / "src" / "base"), "tasks": tasks,
               "exclude": [r"classifier\..*"]}).merge(1.5, out=tmp_path / "b")
    shutil.rmtree(tmp_path / "src")
    mt = MultiTaskModel.from_bundle(tmp_path / "b")
    ids = torch.randint(0, 30, (2, 5))
    out = mt({"t0": {"input_ids": ids}, "t1": {"input_ids": ids}})
    assert out["t0"].logits.shape == (2, 2) and out["t1"].logits.shape == (2, 3)


# ------------------------------------------------------------------------ accepted nonsense
def test_non_finite_merge_is_refused(bundle_dir):
    from flexmerge.engine import _check_finite
    from flexmerge.materialize import StoredBlock

    class M:
        def describe(self):
            return {"name": "task_arithmetic", "lambda": 1e39}

    sb = StoredBlock(index=0, name="embeddings", groups=[], store_base=False,
                     tensors={"g0/merged/w": torch.tensor([1.0, float("inf")])}, nbytes=8)
    with pytest.raises(FlexMergeError, match="non-finite values in block 'embeddings'"):
        _check_finite(sb, M())
    _check_finite(StoredBlock(index=0, name="e", groups=[], store_base=False,
                              tensors={"k": torch.tensor([1.0, 2.0]), "i": torch.tensor([3])}, nbytes=8), M())


# ------------------------------------------------------------------------ exit codes
def test_exit_codes_of_the_framework_propagate(capsys):
    assert main(["--help"]) == 0
    assert main(["methods"]) == 0
    rc, err = run_cli(capsys, "merge")
    assert_one_line_error(rc, err, "--help")
    rc, err = run_cli(capsys, "no-such-command")
    assert_one_line_error(rc, err)


def test_python_api_seed_is_checked(hf_set):
    fm = FlexMerge(str(hf_set))
    for bad in (-1, 2 ** 32, 1.5, True):
        with pytest.raises(FlexMergeError, match="seed"):
            fm.plan(order="random", seed=bad)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("delay", [0.2, 1.0])
def test_signal_during_start_up_is_one_line(hf_set, sig, code, delay):
    """The console script's heavy imports take seconds: a signal then is one line, no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.argv[0] = 'flexmerge'; "
                             "from flexmerge._entry import run; run()", "merge", str(hf_set), "--size", "2",
                             "-o", str(hf_set.parent / "out"), "--no-progress"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # the whole merge finished before the signal: nothing to check
        return
    lines = [x for x in err.splitlines() if x.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), err
    assert leftovers(hf_set.parent) == []


@pytest.mark.parametrize("sub", ["", "/sub"])
def test_symlink_loop_as_output_is_one_line(hf_set, capsys, sub):
    loop = hf_set.parent / "loop"
    loop.symlink_to(loop)
    rc, err = run_cli(capsys, "merge", hf_set, "--size", "2", "-o", str(loop) + sub, "--no-progress")
    assert_one_line_error(rc, err, "cannot be resolved")
    assert loop.is_symlink()


def test_odd_checkpoint_paths_and_names(hf_set, capsys, tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    base = tmp_path / "base" / "model.safetensors"
    rc, err = run_cli(capsys, "merge", "--base", base, "--task", f"a={tmp_path / 't0'}", "--task", f"b={fifo}",
                      "--size", "1.5", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "not a regular file")
    for name in (".", "..", "-x", "a/b", "x" * 101):
        rc, err = run_cli(capsys, "merge", "--base", base, "--task", f"{name}={tmp_path / 't0'}",
                          "--task", f"b={tmp_path / 't1'}", "--size", "1.5", "-o", tmp_path / "o")
        assert_one_line_error(rc, err, "task name")
    assert not (tmp_path / "o").exists()


def test_pickle_with_objects_is_refused_in_one_short_line(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    base = tmp_path / "b.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), base)
    rc, err = run_cli(capsys, "merge", "--base", base, "--task", f"a={tmp_path / 'module.pt'}",
                      "--task", f"b={base}", "--size", "1.5", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "Python objects other than tensors")
    assert "\x1b" not in err[0] and len(err[0]) < 300


def test_no_arguments_prints_the_help(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out.count("Usage") == 1


def test_existing_pipe_as_output_is_refused_without_blocking(hf_set, capsys, tmp_path):
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", hf_set, "--size", "2", "-o", out, "--no-progress")[0] == 0
    for name, argv in (("x.safetensors", ("export", out, "-t", "a", "-o")),
                       ("plan.json", ("plan", hf_set, "--no-progress", "-o"))):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        rc, err = run_cli(capsys, *argv, fifo)
        assert_one_line_error(rc, err, "not a regular file")
    web = tmp_path / "web"
    web.mkdir()
    os.mkfifo(web / "manifest.json")
    assert_one_line_error(*run_cli(capsys, "merge", hf_set, "--size", "2", "-o", web, "--no-progress"))


def _rewrite_block0(bundle_dir: Path, fn) -> None:
    """Rewrite block 0's tensors with ``fn`` and update its sha256, as a careful attacker would."""
    from safetensors.torch import load_file
    from flexmerge.io import file_sha256
    f = bundle_dir / "tensors" / "block-00000.safetensors"
    save_file({k: fn(v) for k, v in load_file(str(f)).items()}, str(f))
    edit_manifest(bundle_dir, lambda m: {**m, "files": {**m["files"], "tensors/block-00000.safetensors": file_sha256(f)}})


@pytest.mark.parametrize("fn,needle", [(lambda v: v.reshape(-1)[:1].clone(), "has shape"),
                                       (lambda v: torch.full_like(v, float("nan")), "NaN or Inf")])
def test_stored_tensors_must_match_the_manifest(bundle_dir, capsys, tmp_path, fn, needle):
    _rewrite_block0(bundle_dir, fn)
    assert_one_line_error(*run_cli(capsys, "export", bundle_dir, "-t", "a", "-o", tmp_path / "e"), needle)
    assert_one_line_error(*run_cli(capsys, "inspect", bundle_dir, "--verify"), needle)
    assert not (tmp_path / "e").exists()
    with pytest.raises(FlexMergeError, match=needle):
        Bundle.load(bundle_dir).state_dict("b")


def test_version_must_be_an_integer(bundle_dir, capsys):
    edit_manifest(bundle_dir, lambda m: {**m, "version": "2"})
    assert_one_line_error(*run_cli(capsys, "inspect", bundle_dir), "version")


@pytest.mark.parametrize("name,rel", [("../../.bashrc", "assets/a/config.json"), ("config.json", "assets/b/config.json"),
                                      ("evil.py", "assets/a/evil.py"), ("config.json", "tensors/block-00000.safetensors")])
def test_asset_entries_cannot_write_or_read_elsewhere(bundle_dir, capsys, tmp_path, name, rel):
    (bundle_dir / ".bashrc").write_text("echo PWNED")
    edit_manifest(bundle_dir, lambda m: {**m, "assets": {**m["assets"], "a": {**m["assets"]["a"], name: rel}}})
    target = tmp_path / "models" / "x"
    assert_one_line_error(*run_cli(capsys, "export", bundle_dir, "-t", "a", "-o", target), "assets")
    assert not (tmp_path / ".bashrc").exists() and not (tmp_path / "models").exists()


def test_unlisted_file_in_an_asset_folder_is_refused(bundle_dir):
    (bundle_dir / "assets" / "a" / "tokenizer.json").write_text("{}")
    with pytest.raises(FlexMergeError, match="does not list"):
        Bundle.load(bundle_dir).asset_dir("a")
