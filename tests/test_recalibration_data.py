"""BatchNorm recalibration from a data directory (:mod:`flexmerge.recalibration_data`): tensor
files give the statistics of the same examples passed by a callable; images are resized and
normalised as ``preprocess.json`` says (hand-computed values); ``--recalibrate-bn DIR`` works in
``merge`` and ``curve``; a changed file changes the resume key; bad directories are one line, exit
2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flexmerge.bundle import Bundle
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError
from flexmerge.recalibrate import Recalibration
from flexmerge.recalibration_data import DirectoryBatches
from helpers import one_thread  # noqa: F401  (module fixture)
from test_batchnorm import TinyCNN, cnn_set
from test_recalibrate import _files, _yaml

TASKS = [f"t{i}" for i in range(4)]


def examples(task: str, n: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + int(task[1:]))
    return torch.randn(n, 3, 6, 6, generator=g) * (1 + int(task[1:])) + 0.5


def tensor_dir(root: Path, batch_size: int = 8, max_examples: int = 512) -> Path:
    """Each task's 28 examples split over three files of the three tensor formats."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "preprocess.json").write_text(json.dumps({"batch_size": batch_size, "max_examples": max_examples}))
    for t in TASKS:
        x = examples(t)
        d = root / t
        d.mkdir()
        save_file({"x": x[:10].contiguous()}, str(d / "a.safetensors"))
        torch.save(x[10:20].clone(), d / "b.pt")
        np.save(d / "c.npy", x[20:].numpy())
    return root


def test_tensor_files_are_batched_in_name_order_and_capped(tmp_path):
    batches = DirectoryBatches(tensor_dir(tmp_path / "calib", batch_size=8, max_examples=23), TASKS)
    got = list(batches("t1"))
    assert [b.shape[0] for b in got] == [8, 2, 8, 2, 3]  # per file: 10 = 8 + 2, 10 = 8 + 2, then 3 of 8
    assert torch.equal(torch.cat(got), examples("t1")[:23])


def test_directory_recalibration_equals_the_callable_on_the_same_examples(tmp_path):
    cfg = cnn_set()
    batches = DirectoryBatches(tensor_dir(tmp_path / "calib"), TASKS)
    from_dir = FlexMerge(cfg).merge(1.0, recalibrate=Recalibration(batches, lambda t: TinyCNN()))
    # the same examples in the same batches (train-mode BatchNorm normalises each batch by its own
    # statistics, so later layers' inputs depend on the batching)
    cuts = [(0, 8), (8, 10), (10, 18), (18, 20), (20, 28)]
    same = FlexMerge(cfg).merge(1.0, recalibrate=Recalibration(lambda t: [examples(t)[a:b] for a, b in cuts],
                                                               lambda t: TinyCNN()))
    assert from_dir.manifest["plan"]["recalibration"]["examples"] == {t: 28 for t in TASKS}
    assert from_dir.manifest["plan"]["recalibration"]["batches"] == {t: 5 for t in TASKS}  # 8+2, 8+2, 8
    for t in TASKS:
        a, b = from_dir.state_dict(t), same.state_dict(t)
        stats = [k for k in a if k.endswith(("running_mean", "running_var"))]
        assert len(stats) == 6
        for k in stats:
            assert torch.equal(a[k], b[k]), (t, k)


def test_images_are_resized_scaled_and_normalised(tmp_path):
    from PIL import Image

    root = tmp_path / "calib"
    (root / "t0").mkdir(parents=True)
    (root / "preprocess.json").write_text(json.dumps({"size": [2, 3], "mean": [0.5, 0.0, 0.2],
                                                      "std": [0.25, 1.0, 0.5], "batch_size": 2}))
    colours = [(255, 0, 51), (0, 255, 102), (51, 51, 51)]
    for i, c in enumerate(colours):  # 5 x 7 pixels of one colour: any resize keeps the colour
        Image.new("RGB", (7, 5), c).save(root / "t0" / f"{i}.png")
    Image.new("L", (4, 4), 255).save(root / "t0" / "3.png")  # greyscale becomes RGB
    got = list(DirectoryBatches(root, ["t0"])("t0"))
    assert [tuple(b.shape) for b in got] == [(2, 3, 2, 3), (2, 3, 2, 3)]
    x = torch.cat(got)
    mean, std = torch.tensor([0.5, 0.0, 0.2]), torch.tensor([0.25, 1.0, 0.5])
    for i, c in enumerate(colours + [(255, 255, 255)]):
        want = (torch.tensor(c, dtype=torch.float32) / 255 - mean) / std
        torch.testing.assert_close(x[i], want.view(3, 1, 1).expand(3, 2, 3), rtol=0, atol=1e-6)


def test_cli_merge_and_curve_take_a_data_directory(tmp_path, capsys):
    from flexmerge.cli import main
    from flexmerge.evaluate import load_callable

    args, user = _files(tmp_path)
    calib = tensor_dir(tmp_path / "calib")
    out = tmp_path / "bundle"
    assert main(["merge", *args, "-s", "1", "-o", str(out), "--no-progress",
                 "--recalibrate-bn", str(calib), "--model-factory", f"{user}:factory"]) == 0
    assert "re-estimated on 28+ examples per task" in capsys.readouterr().out
    api = FlexMerge(cnn_set()).merge(1.0, recalibrate=Recalibration(DirectoryBatches(calib),
                                                                    load_callable(f"{user}:factory")))
    bundle = Bundle.load(out)
    for t in TASKS:
        for name, value in api.state_dict(t).items():
            assert torch.equal(bundle.state_dict(t)[name], value), name
    curve = tmp_path / "curve"
    argv = ["curve", str(_yaml(tmp_path)), "-s", "1", "-m", "ties", "-e", f"{user}:evaluate",
            "--model-factory", f"{user}:factory", "--recalibrate-bn", str(calib),
            "-o", str(curve), "--no-plots", "--no-progress", "--no-zero-shot"]
    assert main(argv) == 0
    rows = json.loads((curve / "curve.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "ties")
    tied = FlexMerge(cnn_set(), method="ties").merge(
        1.0, recalibrate=Recalibration(DirectoryBatches(calib), load_callable(f"{user}:factory")))
    for t, score in row["scores"].items():
        assert score == pytest.approx(float(tied.state_dict(t)["bn0.running_var"].mean()), rel=1e-6)
    # a changed data file is another setting: the rerun evaluates the row again instead of reusing it
    key = json.loads((curve / "curve.json").read_text())["meta"]["resume"]["setting"]
    capsys.readouterr()
    torch.save(examples("t0")[10:20] * 3, calib / "t0" / "b.pt")
    assert main(argv) == 0
    assert json.loads((curve / "curve.json").read_text())["meta"]["resume"]["setting"] != key


def test_bad_directories_are_one_line_exit_2_and_nothing_is_written(tmp_path, capsys):
    from PIL import Image

    from flexmerge.cli import main

    args, user = _files(tmp_path)
    out = tmp_path / "bundle"

    def layout(name, build):
        root = tensor_dir(tmp_path / name)
        build(root)
        return root

    cases = [
        (layout("missing", lambda r: [p.unlink() for p in (r / "t2").iterdir()] and (r / "t2").rmdir()),
         "has no folder 't2'"),
        (layout("empty", lambda r: [p.unlink() for p in (r / "t3").iterdir()]), "holds no images"),
        (layout("mixed", lambda r: Image.new("RGB", (2, 2)).save(r / "t1" / "x.png")), "mixes images and tensor"),
        (layout("nosize", lambda r: [[p.unlink() for p in (r / t).iterdir()] and
                                     Image.new("RGB", (2, 2)).save(r / t / "x.png") for t in TASKS]),
         "gives no 'size'"),
        (layout("badjson", lambda r: (r / "preprocess.json").write_text('{"size": [0, 4]}')), "'size' must be"),
        (layout("unknownkey", lambda r: (r / "preprocess.json").write_text('{"batchsize": 4}')), "batchsize"),
        (layout("corrupt", lambda r: (r / "t1" / "b.pt").write_bytes(b"not a tensor")), "cannot be read"),
    ]
    for root, message in cases:
        capsys.readouterr()
        assert main(["merge", *args, "-s", "1", "-o", str(out), "--no-progress",
                     "--recalibrate-bn", str(root), "--model-factory", f"{user}:factory"]) == 2, root
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
        assert not out.exists()


def test_fingerprint_follows_the_files(tmp_path):
    root = tensor_dir(tmp_path / "calib")
    a = DirectoryBatches(root).fingerprint()
    assert DirectoryBatches(root).fingerprint() == a
    np.save(root / "t3" / "c.npy", examples("t3")[20:].numpy() + 1)
    assert DirectoryBatches(root).fingerprint() != a
    with pytest.raises(FlexMergeError, match="not found"):
        DirectoryBatches(tmp_path / "nope")
