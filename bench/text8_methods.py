"""text8: the data-free methods of 2025-26 (WUDI-Merging, DOGE, LARV) at every size.

Reuses the cached text8 fine-tuning (``python -m flexmerge.bench.suite --max-test 300``) and sweeps,
through :func:`flexmerge.evaluate.sweep` with the default planner, each method spec at sizes
1, 1.5, 2, 3, 4 and 6 units; each spec's table is written to ``<out>/<label>/curve.{csv,json}`` (so runs can be
split and resumed). ``--summarize`` reads every table under ``<out>`` plus TSV-M's from
``docs/results/text8-planners/distortion-tsv`` (same checkpoints, test sets and planner) and
writes ``<out>/summary.md`` and ``<out>/methods.png``.

    nice -n 10 python bench/text8_methods.py   # wudi, larv (inner iso_c), doge at 1, 1.5, 2, 3, 4, 6 units
    python bench/text8_methods.py --summarize

A spec is ``name`` or ``name:key=value,key=value`` (values read as YAML: numbers, names).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = "1,1.5,2,3,4,6"
OUT = ROOT / "docs" / "results" / "text8-methods"
REFERENCE_RUNS = {"tsv": ROOT / "docs" / "results" / "text8-planners" / "distortion-tsv",
                  "task_arithmetic": ROOT / "docs" / "results" / "text8-planners" / "distortion-task_arithmetic",
                  "ties": ROOT / "docs" / "results" / "text8-planners" / "distortion-ties"}


def parse_spec(text: str) -> tuple[str, dict]:
    """``"larv:inner=iso_c,alpha=1"`` -> ``("larv-inner=iso_c-alpha=1", {"name": "larv", ...})``;
    the parameters are parsed as ``flexmerge merge --set`` parses them."""
    from flexmerge.config import parse_assignments

    name, _, rest = text.strip().partition(":")
    spec: dict = {"name": name.strip(), **parse_assignments([p.strip() for p in rest.split(",") if p.strip()])}
    label = "-".join([spec["name"]] + [f"{k}={v}" for k, v in spec.items() if k != "name"])
    return label, spec


def run(a) -> int:
    from flexmerge.bench.suite import Text8Suite
    from flexmerge.evaluate import sweep

    suite = Text8Suite(max_test=a.max_test, progress=False)
    suite.prepare()
    ref = suite.reference()
    for text in a.methods.split(";"):
        label, spec = parse_spec(text)
        t0 = time.perf_counter()
        sweep(suite.merge_config(), [spec], a.sizes, suite.evaluator,
              finetuned={t: r["finetuned"] for t, r in ref.items()},
              zero_shot={t: r["zero_shot"] for t, r in ref.items()},
              out=a.out / label, evaluator_name="text8 test accuracy", log=print)
        print(f"== {label}: {time.perf_counter() - t0:.0f} s")
    return 0


def _rows(path: Path) -> list[dict]:
    f = path / "curve.json"
    if not f.is_file():
        return []
    return [r for r in json.loads(f.read_text())["rows"]
            if r["run"] == "main" and r.get("average") is not None and r["requested_size"] != "min"]


def summarize(a) -> int:
    runs = {p.name: _rows(p) for p in sorted(a.out.iterdir()) if p.is_dir() and _rows(p)}
    for name, path in REFERENCE_RUNS.items():
        if _rows(path):
            runs[f"{name} (text8-planners)"] = _rows(path)
    sizes = sorted({float(r["requested_size"]) for rows in runs.values() for r in rows})
    lines = ["| method | " + " | ".join(f"{s:g}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for label, rows in runs.items():
        by = {float(r["requested_size"]): r for r in rows}
        lines.append(f"| {label} | " + " | ".join(
            f"{by[s]['normalized']:.3f} ({by[s]['size_units']:.2f})" if s in by else "–" for s in sizes) + " |")
    text = ("Normalised accuracy (merged ÷ fine-tuned, averaged over the 8 tasks) and, in brackets, "
            "the delivered size in units; columns are the requested sizes; default planner.\n\n"
            + "\n".join(lines) + "\n")
    (a.out / "summary.md").write_text(text)
    print(text)
    from flexmerge.plots import COLORS, _figure, _save

    fig, axes = _figure(6.4, 4.2, 1, 1)
    ax = axes[0]
    for i, (label, rows) in enumerate(runs.items()):
        pts = sorted((r["size_units"], r["normalized"]) for r in rows)
        ax.plot(*zip(*pts), "--" if "text8-planners" in label else "-", marker="o", markersize=3,
                color=COLORS[i % len(COLORS)], label=label)
    ax.set_xlabel("size (model units)")
    ax.set_ylabel("normalised accuracy")
    ax.set_title("text8: new data-free methods at every size", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    _save(fig, a.out / "methods.png")
    return 0


def main(argv=None) -> int:
    from flexmerge.errors import FlexMergeError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="wudi;larv:inner=iso_c;doge")
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--max-test", type=int, default=300)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summarize", action="store_true")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        return summarize(a) if a.summarize else run(a)
    except FlexMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
