"""text8: the planners against the paper's greedy and the ablation orders.

Reuses the cached text8 fine-tuning (``python -m flexmerge.bench.suite --max-test 300``) and
sweeps, through :func:`flexmerge.evaluate.sweep`, each method with each planner at every size;
the ``similarity`` planner also runs the ablation orders (greedy, left-right, right-left, random
seeds 0-2). Each (planner, method) sweep writes ``<out>/<planner>-<method>/curve.{csv,json}``, so
runs can be split and resumed. ``--summarize`` reads every table under ``<out>``, gives every row
the data-free predicted loss of its grouping (:func:`flexmerge.planners.predicted_loss`, from the
method's Gram matrices), derives the ``auto`` planner's rows (at each size it picks one of the
measured candidates' groupings, so its accuracy is that candidate's, measured), prints the
Spearman rank correlation of predicted loss against measured accuracy (over all rows and within
each size) and writes ``<out>/summary.json`` and ``<out>/summary.md``.

    nice -n 10 python bench/text8_planners.py --methods task_arithmetic --planners distortion,hybrid
    nice -n 10 python bench/text8_planners.py --methods ties --planners similarity --orders greedy,left-right,right-left,random
    nice -n 10 python bench/text8_planners.py --methods task_arithmetic,ties --calibrate 400
    python bench/text8_planners.py --summarize

``--calibrate BUDGET`` runs :func:`flexmerge.evaluate.sweep` with the suite's validation evaluator
(200 unused training examples per task, or seen ones where a task has none left; see
:meth:`~flexmerge.bench.suite.Text8Suite.validation_evaluator`), so that the planner and the
method's scale are chosen per size on validation and the choice is scored on test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = "1,1.25,1.5,2,2.5,3,4,5,6"


def ranks(x) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    x = np.asarray(x, dtype=float)
    r = np.empty(len(x))
    r[np.argsort(x, kind="mergesort")] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        idx = np.where(x == v)[0]
        r[idx] = r[idx].mean()
    return r


def spearman(a, b) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def run_label(row: dict, planner: str) -> str:
    if row["run"] == "main":
        return planner
    return row["order"] + (f" (seed {row['seed']})" if row["seed"] is not None else "")


def make_suite(a, **kw):
    from flexmerge.bench.suite import Text8Suite

    kw.update(data_dir=a.data_dir, cache_dir=a.cache_dir)
    if a.demo:  # the 4-task setting of 'flexmerge demo' (its recipe and 200 test examples)
        return Text8Suite.demo(**kw)
    return Text8Suite(max_test=a.max_test, **kw)


def sweep_runs(a) -> int:
    from flexmerge.evaluate import sweep

    suite = make_suite(a)
    suite.prepare()
    ref = suite.reference()
    ft = {t: r["finetuned"] for t, r in ref.items()}
    zs = {t: r["zero_shot"] for t, r in ref.items()}
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        if a.calibrate:
            t0 = time.perf_counter()
            sweep(suite.merge_config(planner="distortion"), [method], a.sizes, suite.evaluator,
                  finetuned=ft, zero_shot=zs, out=a.out / f"calibrated-{method}", plots=False,
                  ylabel="accuracy", evaluator_name="text8 test accuracy", progress=False,
                  validation_evaluator=suite.validation_evaluator(a.max_val), calibration_budget=a.calibrate,
                  log=lambda m: print(f"[calibrated] {m}", flush=True))
            held = {t: h for t, (_, h) in suite.validation_sets.items()}
            print(f"[calibrated] {method}: {time.perf_counter() - t0:.0f} s; validation held out: {held}",
                  flush=True)
            continue
        for planner in [p.strip() for p in a.planners.split(",") if p.strip()]:
            orders = a.orders if planner == "similarity" and a.orders else None
            t0 = time.perf_counter()
            sweep(suite.merge_config(planner=planner), [method], a.sizes, suite.evaluator, orders=orders,
                  seeds=[int(x) for x in a.seeds.split(",")], ablation_methods=[method] if orders else None, finetuned=ft, zero_shot=zs,
                  out=a.out / f"{planner}-{method}", plots=False, ylabel="accuracy",
                  evaluator_name="text8 test accuracy", progress=False,
                  log=lambda m, p=planner: print(f"[{p}] {m}", flush=True))
            print(f"[{planner}] {method}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def summarize(a) -> int:
    from flexmerge.engine import FlexMerge
    from flexmerge.evaluate import SweepResult
    from flexmerge.planners import predicted_loss

    suite = make_suite(a, log=None)
    rows = []
    fms, grams = {}, {}
    for path in sorted(a.out.glob("*/curve.json")):
        planner, _, method = path.parent.name.partition("-")
        res = SweepResult.load(path)
        if method == "channel_merging":  # its groupings come from no plan: no predicted loss
            for r in res.select(run="main", method=method):
                rows.append({"method": method, "plan": "Channel Merging", "requested": r["requested_size"],
                             "units": r["size_units"], "average": r["average"], "normalized": r["normalized"],
                             "predicted_loss": None, "complete": res.complete})
            continue
        if planner == "calibrated":  # chosen per size on validation; its rows are those of 'calibrated' runs
            for r in res.select(run="calibrated", method=method):
                rows.append({"method": method, "plan": "calibrated", "requested": r["requested_size"],
                             "units": r["size_units"], "average": r["average"], "normalized": r["normalized"],
                             "predicted_loss": None, "complete": res.complete, "note": r["note"]})
            continue
        if method not in fms:
            fms[method] = FlexMerge(suite.merge_config(), method=method)
            grams[method] = fms[method].plan().grams
        fm, plans = fms[method], {}
        for r in res.select(method=method):
            if r["requested_size"] in (None, "min") or (r["run"] == "order" and r["order"] == "greedy"):
                continue  # references, mask minima, the greedy ablation (= the similarity main run)
            key = (r["run"], r["order"], r["seed"])
            if key not in plans:
                plans[key] = fm.plan(grams=grams[method], order=r["order"], seed=r["seed"] or 0,
                                     planner=planner if r["run"] == "main" else "similarity")
            g = plans[key].at(r["requested_size"])
            assert g.size_bytes == r["size_bytes"], (path, r["order"], r["requested_size"])
            rows.append({"method": method, "plan": run_label(r, planner), "requested": r["requested_size"],
                         "units": r["size_units"], "average": r["average"], "normalized": r["normalized"],
                         "predicted_loss": predicted_loss(grams[method], g.groups), "complete": res.complete})
    # auto: at each size, the candidate grouping of lowest predicted loss, with that run's accuracy
    for method in fms:
        auto = fms[method].plan(grams=grams[method], planner="auto")
        for s in sorted({r["requested"] for r in rows if r["method"] == method}):
            g = auto.at(s)
            src = [r for r in rows if r["method"] == method and r["plan"] == g.planner and r["requested"] == s]
            if src:
                rows.append(src[0] | {"plan": f"auto ({g.planner})"})
    measured = [r for r in rows if not r["plan"].startswith("auto") and r["predicted_loss"] is not None]
    corr = {"all": spearman([r["predicted_loss"] for r in measured], [r["normalized"] for r in measured])}
    for method in fms:
        sub = [r for r in measured if r["method"] == method]
        corr[method] = spearman([r["predicted_loss"] for r in sub], [r["normalized"] for r in sub])
        within = [spearman([r["predicted_loss"] for r in ss], [r["normalized"] for r in ss])
                  for s in sorted({r["requested"] for r in sub})
                  for ss in [[r for r in sub if r["requested"] == s]]]
        within = [w for w in within if w == w]
        corr[f"{method}, within each size (mean)"] = float(np.mean(within)) if within else float("nan")
    summary = {"command": "python bench/text8_planners.py --summarize",
               "spearman_predicted_loss_vs_normalized": corr, "runs": len(measured), "rows": rows}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = []
    sizes = sorted({r["requested"] for r in rows})
    for method in dict.fromkeys(r["method"] for r in rows):
        lines += [f"### {method}: average accuracy / actual size in units", "",
                  "| plan | " + " | ".join(f"{s:g}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for plan in dict.fromkeys(r["plan"].split(" (")[0] if r["plan"].startswith("auto") else r["plan"]
                                  for r in rows if r["method"] == method):
            cells = []
            for s in sizes:
                rr = [r for r in rows if r["method"] == method and r["requested"] == s and
                      (r["plan"] == plan or (plan == "auto" and r["plan"].startswith("auto")))]
                cells.append(f"{rr[0]['average']:.3f} / {rr[0]['units']:.3f}" if rr else "")
            lines.append(f"| {plan} | " + " | ".join(cells) + " |")
        lines.append("")
    for method in dict.fromkeys(r["method"] for r in rows if r["plan"] == "calibrated"):
        lines += [f"### {method}, calibrated: choice per size (validation: normalized validation accuracy)", "",
                  "| requested | planner and scale (validation) | test average / units |", "|---:|---|---:|"]
        for r in sorted((r for r in rows if r["method"] == method and r["plan"] == "calibrated"),
                        key=lambda r: r["requested"]):
            lines.append(f"| {r['requested']:g} | {r['note']} | {r['average']:.3f} / {r['units']:.3f} |")
        lines.append("")
    lines.append("Spearman rank correlation of predicted loss with normalized accuracy (negative: lower "
                 f"predicted loss, higher accuracy), {len(measured)} measured runs: " +
                 "; ".join(f"{k} {v:.3f}" for k, v in corr.items()))
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    plot_planners(rows, a.out / "planners.png")
    print("\n".join(lines))
    return 0


def plot_planners(rows: list[dict], path: Path) -> None:
    """One panel per method (task arithmetic, TIES): average accuracy vs actual size for the
    planners, the ablation orders, the calibrated runs and Channel Merging."""
    from flexmerge.plots import COLORS, _figure, _save

    methods = [m for m in ("task_arithmetic", "ties") if any(r["method"] == m for r in rows)]
    if not methods:
        return
    fig, axes = _figure(6.0 * len(methods), 4.2, 1, len(methods))
    cm = sorted((r["units"], r["average"]) for r in rows if r["method"] == "channel_merging")
    for ax, method in zip(axes, methods):
        plans = dict.fromkeys(r["plan"] for r in rows if r["method"] == method and not r["plan"].startswith("auto"))
        for i, plan in enumerate(plans):
            pts = sorted((r["units"], r["average"]) for r in rows if r["method"] == method and r["plan"] == plan)
            style = "--" if plan.startswith(("left-right", "right-left", "random")) else "-"
            ax.plot(*zip(*pts), style, marker="o", markersize=3, linewidth=1.3, color=COLORS[i % len(COLORS)],
                    label="similarity (paper's greedy)" if plan == "similarity" else plan)
        if cm:
            ax.plot(*zip(*cm), ":", marker="s", markersize=3, color="black", label="Channel Merging")
        ax.set_title(f"text8, {method}", fontsize=10)
        ax.set_xlabel("size (model units)")
        ax.set_ylabel("average test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    _save(fig, path)


def main(argv=None) -> int:
    from flexmerge.errors import FlexMergeError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--planners", default="distortion,hybrid,similarity")
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--orders", default="", help="ablation orders of the similarity planner, e.g. "
                                                 "greedy,left-right,right-left,random")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the random order")
    ap.add_argument("--max-test", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "text8-planners")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--summarize", action="store_true", help="only summarize the tables under --out")
    ap.add_argument("--calibrate", type=int, default=None, metavar="BUDGET",
                    help="instead of the planners: calibrate each method per size on validation examples "
                         "within BUDGET evaluator calls (writes <out>/calibrated-<method>)")
    ap.add_argument("--max-val", type=int, default=200, help="validation examples per task for --calibrate")
    ap.add_argument("--demo", action="store_true", help="the 4-task 'flexmerge demo' setting instead of text8")
    a = ap.parse_args(argv)
    try:
        return summarize(a) if a.summarize else sweep_runs(a)
    except FlexMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
