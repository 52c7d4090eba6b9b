"""docs/results/scaling.md from the files that bench/text14_report.py writes under
docs/results/text14/ (tables, plots); no model is loaded here."""

from __future__ import annotations

import json
from pathlib import Path


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def text8_normalized(row: dict, tasks: list[str]) -> float:
    """A sweep row's normalised accuracy averaged over ``tasks`` only (merged ÷ fine-tuned)."""
    return _mean(row["normalized_scores"][t] for t in tasks)


def scaling_points(curves: dict[int, dict], tasks8: list[str]) -> dict[str, dict[int, dict[float, float]]]:
    """``{method: {N: {requested size: normalised accuracy on the text8 tasks}}}``."""
    out: dict[str, dict[int, dict[float, float]]] = {}
    for n, curve in curves.items():
        for r in curve["rows"]:
            if r["run"] != "main" or r.get("average") is None or r["requested_size"] == "min":
                continue
            out.setdefault(r["method"], {}).setdefault(n, {})[float(r["requested_size"])] = \
                text8_normalized(r, tasks8)
    return out


def _plot_scaling(points, path: Path) -> None:
    from flexmerge.plots import _figure, _save

    fig, (ax,) = _figure(6.4, 4.2)
    for i, (m, by_n) in enumerate(points.items()):
        color = f"C{i}"
        for n, style in ((8, "-o"), (14, "--s")):
            pts = sorted(by_n.get(n, {}).items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{m}, N={n}")
    ax.set_xlabel("requested size (model units)")
    ax.set_ylabel("normalised accuracy on the 8 text8 tasks")
    ax.set_title("Merged among 8 tasks (solid) vs among 14 (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def _plot_ood(ood, path: Path) -> None:
    from flexmerge.plots import _figure, _save

    tasks = ood["ood_tasks"]
    fig, (ax,) = _figure(6.4, 4.2)
    experts = [r for r in ood["runs"] if r["method"] == "fine-tuned experts"]
    methods = list(dict.fromkeys(r["method"] for r in ood["runs"] if r["method"] != "fine-tuned experts"))
    for i, m in enumerate(methods):
        rows = sorted([r for r in ood["runs"] if r["method"] == m] + experts, key=lambda r: r["size"])
        ax.plot([r["size_units"] for r in rows], [_mean(r["ensemble"][t] for t in tasks) for r in rows],
                "-o", color=f"C{i}", label=f"{m}: ensemble of the 8 branches")
    if experts:
        best = _mean(max(experts[0]["branches"][t].values()) for t in tasks)
        ax.axhline(best, color="k", ls="--", label="best fine-tuned expert per task")
    ax.axhline(_mean(ood["pretrained"][t] for t in tasks), color="gray", ls=":", label="pretrained encoder")
    ax.set_xlabel("size of the merged text8 model (units)")
    ax.set_ylabel(f"average accuracy on {len(tasks)} OOD tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def summarize(out: Path, doc: Path) -> None:
    meta = _load(out / "meta.json") or {}
    curves = {n: c for n in (8, 14) if (c := _load(out / f"scaling-n{n}" / "curve.json"))}
    ood = _load(out / "ood.json")
    lines = ["# Scaling with the number of tasks, and out-of-distribution tasks", "",
             "text14 = the eight text8 tasks plus sst5, mr, sms_spam, tweet_hate, tweet_irony and "
             "tweet_offensive, each fine-tuned from all-MiniLM-L6-v2 with text8's recipe into text8's "
             f"cache (recipe key `{meta.get('recipe_key', '?')[:16]}`: text8's checkpoints are reused). "
             "Produced by", "", "```bash", "python bench/text14_report.py", "```", "",
             f"on {meta.get('machine', '?')}, {meta.get('date', '?')}; test sets: a seeded subset of at "
             f"most {meta.get('max_test', '?')} examples per task. Wall time: fine-tuning the six new "
             f"tasks {meta.get('finetune_s', 0):.0f} s" + (
                 f" ({', '.join(f'{t} {v} s' for t, v in meta['finetune_per_task_s'].items())}; "
                 f"{meta.get('finetune_note', '')}; command: `{meta.get('finetune_command', '')}`)"
                 if meta.get("finetune_per_task_s") else "") + ", scaling sweeps "
             f"{meta.get('scaling_n8_s', 0):.0f} s (N = 8) + {meta.get('scaling_n14_s', 0):.0f} s "
             f"(N = 14), OOD {meta.get('ood_s', 0):.0f} s. The machine's 2 cores were shared with "
             "other work during these runs, so the wall times are upper bounds.", ""]
    ref = meta.get("reference")
    if ref:
        lines += ["## The six new tasks", "", "| task | test examples | fine-tuned | zero-shot |",
                  "|---|---:|---:|---:|"]
        for t in ("sst5", "mr", "sms_spam", "tweet_hate", "tweet_irony", "tweet_offensive"):
            if t in ref:
                r = ref[t]
                lines.append(f"| {t} | {r['test_examples']} | {r['finetuned']:.4f} | {r['zero_shot']:.4f} |")
        lines.append("")
    if curves:
        tasks8 = (curves.get(8) or curves[14])["tasks"][:8]
        pts = scaling_points(curves, tasks8)
        lines += ["## Scaling: 8 tasks vs 14 (paper Appendix C.7, Figure 18)", "",
                  "Normalised accuracy (merged ÷ fine-tuned, averaged) **on the eight text8 tasks**, "
                  "when they are merged among themselves (N = 8) and among all fourteen (N = 14), with "
                  "the default planner. Fixed sizes: 1 and 2 units. Proportional sizes: N/8, N/4, N/2 "
                  "units (1, 2, 4 for N = 8; 1.75, 3.5, 7 for N = 14). Drop = N = 8 minus N = 14.", "",
                  "| method | 1 unit: 8 / 14 / drop | 2 units: 8 / 14 / drop | N/8: 8 / 14 / drop "
                  "| N/4: 8 / 14 / drop | N/2: 8 / 14 / drop |", "|---|---|---|---|---|---|"]

        def cell(m, s8, s14):
            a, b = pts[m].get(8, {}).get(s8), pts[m].get(14, {}).get(s14)
            if a is None or b is None:
                return "–"
            return f"{a:.3f} / {b:.3f} / {a - b:+.3f}"

        for m in pts:
            lines.append(f"| {m} | {cell(m, 1.0, 1.0)} | {cell(m, 2.0, 2.0)} | {cell(m, 1.0, 1.75)} | "
                         f"{cell(m, 2.0, 3.5)} | {cell(m, 4.0, 7.0)} |")
        if 14 in curves:
            lines += ["", "All fourteen tasks when merged among fourteen (normalised accuracy over all 14):", "",
                      "| method | " + " | ".join(SIZE for SIZE in ("1", "1.75", "2", "3.5", "7")) + " |",
                      "|---|" + "---:|" * 5]
            by = {}
            for r in curves[14]["rows"]:
                if r["run"] == "main" and r.get("normalized") is not None and r["requested_size"] != "min":
                    by.setdefault(r["method"], {})[float(r["requested_size"])] = r["normalized"]
            for m, row in by.items():
                lines.append(f"| {m} | " + " | ".join(f"{row[s]:.3f}" if s in row else "–"
                                                      for s in (1.0, 1.75, 2.0, 3.5, 7.0)) + " |")
        drops = {label: [pts[m][8][a] - pts[m][14][b] for m in pts
                         if a in pts[m].get(8, {}) and b in pts[m].get(14, {})]
                 for label, (a, b) in {"at 1 unit": (1.0, 1.0), "at 2 units": (2.0, 2.0),
                                       "at N/8": (1.0, 1.75), "at N/4": (2.0, 3.5), "at N/2": (4.0, 7.0)}.items()}
        lines += ["", "Findings: mean drop over the methods measured at both " + "; ".join(
            f"{k} {_mean(v):+.3f} ({len(v)} methods)" for k, v in drops.items() if v) + ". Positive = the "
            "text8 tasks lose accuracy when six more tasks share the model."]
        _plot_scaling(pts, out / "scaling.png")
        lines += ["", "![scaling](text14/scaling.png)", "",
                  "Tables: `text14/scaling-n8/curve.csv`, `text14/scaling-n14/curve.csv`.", ""]
    if ood:
        tasks = ood["ood_tasks"]
        lines += ["## Out-of-distribution tasks (paper Appendix C.6, Tables 5 and 6)", "",
                  "The merged model holds the eight text8 tasks; each of the six other tasks is "
                  "predicted by one linear probe (fitted on the pretrained encoder's sentence embeddings "
                  f"of at most {max(ood['probe_train'].values())} training examples of that task; "
                  "`flexmerge.bench.ood`) applied to every task branch of the merged model, the branches' "
                  "probabilities averaged (`MultiTaskModel.ensemble`). Baselines with the same probe: the "
                  "pretrained encoder, and the fine-tuned experts (each text8 checkpoint alone; the best "
                  "per OOD task is the paper's baseline, chosen on test, so an optimistic one). "
                  "Accuracy on the OOD test sets:", "",
                  "| model | size | " + " | ".join(tasks) + " | average |", "|---|---:|" + "---:|" * (len(tasks) + 1)]

        def row(name, size, vals):
            return (f"| {name} | {size} | " + " | ".join(f"{vals[t]:.3f}" for t in tasks)
                    + f" | {_mean(vals[t] for t in tasks):.3f} |")

        lines.append(row("pretrained encoder", "1", ood["pretrained"]))
        experts = [r for r in ood["runs"] if r["method"] == "fine-tuned experts"]
        if experts:
            e = experts[0]
            lines.append(row("best fine-tuned expert (per task)", "1",
                             {t: max(e["branches"][t].values()) for t in tasks}))
            lines.append(row("mean fine-tuned expert", "1", {t: _mean(e["branches"][t].values()) for t in tasks}))
        for r in ood["runs"]:
            name = ("ensemble of the 8 experts" if r["method"] == "fine-tuned experts"
                    else f"{r['method']}, ensemble of 8 branches")
            lines.append(row(name, f"{r['size_units']:.2f}", r["ensemble"]))
        ens1 = [r for r in ood["runs"] if r["method"] != "fine-tuned experts" and r["size"] == 1.0]
        if experts and ens1:
            best = _mean(max(experts[0]["branches"][t].values()) for t in tasks)
            pre = _mean(ood["pretrained"][t] for t in tasks)
            mean_e = _mean(_mean(experts[0]["branches"][t].values()) for t in tasks)
            at1 = ", ".join(f"{r['method']} {_mean(r['ensemble'][t] for t in tasks):.3f}" for r in ens1)
            full = _mean(experts[0]["ensemble"][t] for t in tasks)
            lines += ["", f"Findings: at 1 unit the ensembles average {at1}: above the pretrained encoder "
                      f"({pre:.3f}) and the mean single expert ({mean_e:.3f}), below the best expert per task "
                      f"({best:.3f}, an oracle choice made on the test sets). More units move the ensemble "
                      f"towards the ensemble of all eight experts ({full:.3f}). The paper's finding that the "
                      "ensemble beats the best single expert (Tables 5 and 6, CLIP image encoders) does not "
                      "carry over to this 6-layer text encoder with linear probes."]
        _plot_ood(ood, out / "ood.png")
        lines += ["", "![ood](text14/ood.png)", "", "Per-branch accuracies: `text14/ood.json`.", ""]
    ray = _load(out / "ray.json")
    if ray:
        lines += ["## Sweeps on Ray", "",
                  f"`{ray['command']}` ({ray['date']}): {ray['setting']}; {ray['workers']}. "
                  f"{ray['evaluator_calls']} evaluator calls: serial {ray['serial_s']:.1f} s, Ray "
                  f"{ray['ray_sweep_s']:.1f} s plus {ray['ray_start_s']:.1f} s to start the local cluster "
                  f"(ratio {ray['ray_sweep_s'] / ray['serial_s']:.2f}, "
                  f"{(ray['ray_sweep_s'] + ray['ray_start_s']) / ray['serial_s']:.2f} with the start); "
                  f"identical `curve.csv`: {'yes' if ray['same_curve_csv'] else 'NO'}. On these 2 cores Ray "
                  "cannot add compute; its overhead is what this measures (the target is a ratio of at most 1.0, "
                  "not met)."]
        for r in ray.get("runs_with_driver_on_one_thread", []):
            lines.append(f"With the driver merging on one torch thread ({r['how']}): serial {r['serial_s']:.1f} s, "
                         f"Ray {r['ray_sweep_s']:.1f} s (ratio {r['ray_sweep_s'] / r['serial_s']:.2f}).")
        lines += ["The serial baselines of these runs differ by up to 19%: this machine's run-to-run noise is "
                  "larger than the effect, so the target is not shown.", ""]
    doc.write_text("\n".join(lines) + "\n")
