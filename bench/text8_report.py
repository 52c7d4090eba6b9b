"""The text8 benchmark: real accuracy-size curves, written to docs/results/text8.md.

Fine-tunes (or reuses from the cache) all-MiniLM-L6-v2 on the eight text8 tasks with one recipe
(:mod:`flexmerge.bench.finetune`), then sweeps every merge method the library has (plus the
Channel Merging baseline) at sizes 1 ... 8 model units (and each mask method's own minimum), and
the paper's ablations with task arithmetic: merge orders (greedy, left-right, right-left, random
with 3 seeds) and linkages (min, max, avg). Writes curve.csv/json and plots under
``docs/results/text8/`` and the report ``docs/results/text8.md``.

    python bench/text8_report.py                        # the full benchmark
    python bench/text8_report.py --methods task_arithmetic,ties --sizes 1,2,8 --no-ablations
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = "1,1.25,1.5,2,2.5,3,4,5,6,7,8"


def fmt(v, digits=4):
    return "–" if v is None else f"{v:.{digits}f}"


def write_report(path: Path, result, ref: dict, meta: dict) -> None:
    tasks = result.tasks
    lines = ["# text8: accuracy against deployed size", "",
             "Eight real text-classification tasks, each fine-tuned from the real pretrained encoder "
             "all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), merged by every method of flexmerge "
             "at every size. Produced by", "", "```bash", meta["command"], "```", "",
             f"on {meta['machine']}, {meta['date']}. Fine-tuning recipe (cache key `{meta['recipe_key'][:16]}`):",
             "", "```json", json.dumps(meta["recipe"], indent=1), "```", "",
             f"Test sets: a seeded subset of at most {meta['max_test']} examples per task. "
             f"Wall time: fine-tuning {meta['finetune_s']:.0f} s ({meta['finetune_note']}), reference "
             f"evaluation {meta['reference_s']:.0f} s, sweep {meta['sweep_s']:.0f} s "
             f"({result.meta.get('evaluations', '?')} evaluator calls, one per task and run).", "",
             "## Fine-tuned and zero-shot accuracy", "",
             "Zero-shot = the pretrained encoder with the task's fine-tuned head.", "",
             "| task | test examples | fine-tuned | zero-shot |", "|---|---:|---:|---:|"]
    for t in tasks:
        r = ref[t]
        lines.append(f"| {t} | {r['test_examples']} | {fmt(r['finetuned'])} | {fmt(r['zero_shot'])} |")
    lines.append(f"| **average** | | {fmt(result.finetuned_average)} | {fmt(result.zero_shot_average)} |")
    lines += ["", "## Average accuracy by method and size", "",
              "Each cell: average test accuracy over the 8 tasks / normalized accuracy (merged ÷ "
              "fine-tuned, averaged). Columns are the requested sizes; the exact size of every run in "
              "units and bytes is in `text8/curve.csv`. `min` = a mask method's smallest size.", ""]
    main_rows = result.select(run="main")
    sizes = []
    for r in main_rows:
        key = r["requested_size"]
        if key not in sizes:
            sizes.append(key)
    sizes.sort(key=lambda s: -1 if s == "min" else float(s))
    methods = list(dict.fromkeys(r["method"] for r in main_rows))
    lines.append("| method | " + " | ".join(str(s) for s in sizes) + " |")
    lines.append("|---|" + "---:|" * len(sizes))
    for m in methods:
        cells = []
        for s in sizes:
            rows = [r for r in main_rows if r["method"] == m and r["requested_size"] == s]
            cells.append(f"{rows[0]['average']:.3f} / {rows[0]['normalized']:.3f}" if rows else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy vs size](text8/accuracy_vs_size.png)", "",
              "![normalized accuracy vs size](text8/normalized_vs_size.png)", "",
              "![per task](text8/per_task.png)", ""]
    for run, title in (("order", "Merge order (task arithmetic)"), ("linkage", "Linkage (task arithmetic)")):
        rows = result.select(run=run)
        if not rows:
            continue
        lines += [f"## Ablation: {title.lower()}", ""]
        keys = list(dict.fromkeys((r["order"], r["linkage"], r["seed"]) for r in rows))
        rsizes = sorted({r["requested_size"] for r in rows}, key=float)
        lines.append(f"| {run} | " + " | ".join(str(s) for s in rsizes) + " |")
        lines.append("|---|" + "---:|" * len(rsizes))
        for k in keys:
            label = k[0] if run == "order" else k[1]
            if k[2] is not None and run == "order" and k[0] == "random":
                label += f" (seed {k[2]})"
            cells = []
            for s in rsizes:
                rr = [r for r in rows if (r["order"], r["linkage"], r["seed"]) == k and r["requested_size"] == s]
                cells.append(f"{rr[0]['average']:.3f}" if rr else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"![{run} ablation](text8/ablation_{run}.png)", ""]
    if result.notes:
        lines += ["## Notes from the sweep", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += ["## Reading the results", "", meta.get("discussion", ""), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    from flexmerge.bench.suite import Text8Suite
    from flexmerge.errors import FlexMergeError
    from flexmerge.evaluate import sweep
    from flexmerge.methods import available_methods

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(available_methods() + ["channel_merging"]))
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--max-test", type=int, default=500)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--discussion", default="", help="a paragraph for the report's last section")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite text8.md from the saved text8/curve.json and text8-meta.json (e.g. of "
                         "an interrupted run) without evaluating anything")
    a = ap.parse_args(argv)
    if a.report_only:
        from flexmerge.evaluate import SweepResult

        from flexmerge.plots import plot_all

        result = SweepResult.load(a.out / "text8" / "curve.json")
        result.write(a.out / "text8")
        plot_all(result, a.out / "text8", ylabel="accuracy")
        meta = json.loads((a.out / "text8-meta.json").read_text())
        meta["discussion"] = a.discussion or meta.get("discussion", "")
        ref = meta["reference"]
        if not result.complete:
            meta["discussion"] = ("**This sweep was interrupted; the tables hold the runs that finished.** "
                                  + meta["discussion"])
        write_report(a.out / "text8.md", result, ref, meta)
        print(f"wrote {a.out / 'text8.md'}")
        return 0
    try:
        suite = Text8Suite(max_test=a.max_test, data_dir=a.data_dir, cache_dir=a.cache_dir)
        cached = suite.is_prepared()
        t0 = time.perf_counter()
        suite.prepare()
        t1 = time.perf_counter()
        ref = suite.reference()
        t2 = time.perf_counter()
        out = a.out / "text8"
        recipe = json.loads((suite.root / "recipe.json").read_text())
        meta = {"command": "python bench/text8_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores, torch "
                           f"{__import__('torch').__version__}",
                "date": time.strftime("%Y-%m-%d"), "recipe": recipe["recipe"], "recipe_key": recipe["key"],
                "max_test": a.max_test, "finetune_s": t1 - t0,
                "finetune_note": "reused from the cache" if cached else "this run",
                "reference_s": t2 - t1, "sweep_s": float("nan"), "discussion": a.discussion,
                "reference": ref}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "text8-meta.json").write_text(json.dumps(meta, indent=1))
        result = sweep(suite.merge_config(), a.methods, a.sizes, suite.evaluator,
                       orders=None if a.no_ablations else "greedy,left-right,right-left,random",
                       linkages=None if a.no_ablations else "min,max,avg", seeds=(0, 1, 2),
                       ablation_methods=["task_arithmetic"],
                       finetuned={t: r["finetuned"] for t, r in ref.items()},
                       zero_shot={t: r["zero_shot"] for t, r in ref.items()}, out=out,
                       ylabel="accuracy", evaluator_name="text8 test accuracy", progress=False,
                       log=lambda m: print(m, flush=True))
        t3 = time.perf_counter()
    except FlexMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta["sweep_s"] = t3 - t2
    (a.out / "text8-meta.json").write_text(json.dumps(meta, indent=1))
    write_report(a.out / "text8.md", result, ref, meta)
    print(f"wrote {a.out / 'text8.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
