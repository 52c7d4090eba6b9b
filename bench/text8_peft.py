"""text8-peft: flexible merging of LoRA and (IA)3 adapters of the text8 tasks, at 1 ... 8 adapter units.

One command trains (or reuses from the cache) every adapter, sweeps every method at every size and
writes the report ``docs/results/text8-peft.md`` with its plots under ``docs/results/text8-peft/``:

    nice -n 10 python bench/text8_peft.py

``--peft lora`` (or ``ia3``) runs one kind only; ``--summarize`` rewrites the report from the stored
tables ``docs/results/text8-peft/<kind>/curve.json`` without evaluating anything. Finished rows are
kept, so an interrupted run resumes.

Per kind, method and size ``k`` (requested units of one adapter): :class:`flexmerge.adapters.engine.AdapterMerge`
plans once (default planner) and merges at ``plan.at(k)`` in memory; each task's adapter is
:func:`flexmerge.adapters.export.task_adapter` of that bundle (its groups' stored factors or vectors
plus its own head), rebuilt into a model by PEFT (:meth:`flexmerge.bench.peft_suite.PeftSuite.build`)
and scored on the text8 test sets. A task whose adapter comes back bit-identical to its trained
one (every group it is in is its own original) gets the trained adapter's accuracy without a
second evaluation (same tensors, same model). References: the trained adapters, the full
fine-tunes of the text8 suite (same data, seeds and steps) and the pretrained encoder with each
adapter's head (zero-shot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "text8-peft"
REPORT = ROOT / "docs" / "results" / "text8-peft.md"
KINDS = ("lora", "ia3")
METHODS = ("task_arithmetic", "ties", "tsv", "emr")
KIND_TITLE = {"lora": "LoRA", "ia3": "(IA)3"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def emr_cost(suite, job) -> dict:
    """What EMR would store for these adapters at its smallest size (one group per block): the
    unified task vector and, per task, a bit mask and a float32 rescaler over every element of the
    merged task vectors (``flexmerge.methods.emr``), in adapter units."""
    n = len(job.tasks)
    numel = sum(info.shape[0] * info.shape[1] for info in job.models.modules.values())
    unit = job.cost.unit_bytes
    unified = numel * 4
    masks = n * (-(-numel // 8) + 4 * len(job.blockmap.blocks))
    return {"unified_units": unified / unit, "mask_units": masks / unit, "total_units": (unified + masks) / unit,
            "dense_elements": numel, "unit_bytes": unit}


def sweep_kind(kind: str, a) -> dict:
    """Train or reuse the adapters of ``kind``, then evaluate every method at every size (resumable)."""
    import torch

    from flexmerge.adapters.engine import AdapterMerge
    from flexmerge.adapters.export import task_adapter
    from flexmerge.bench.peft_finetune import BENCH_RECIPES
    from flexmerge.bench.peft_suite import PeftSuite

    out = a.out / kind / "curve.json"
    table = _load(out)
    suite = PeftSuite(recipe=BENCH_RECIPES[kind], max_test=a.max_test, threads=a.threads)
    t0 = time.perf_counter()
    suite.prepare()
    ref = suite.reference()
    full = suite.full.reference() if suite.full.is_prepared() else None
    torch.set_num_threads(a.threads)
    table.update({"kind": kind, "recipe": suite.recipe.model_dump(mode="json"), "key": suite.key[:16],
                  "full_key": suite.full.key[:16], "reference": ref, "full_reference": full,
                  "max_test": a.max_test})
    table.setdefault("rows", [])
    done = {(r["method"], r["requested"]) for r in table["rows"]}
    originals = {t: suite.adapter(t)[1] for t in suite.tasks}
    jobs = {}
    try:
        for method in a.methods:
            if method == "emr":
                with AdapterMerge(suite.merge_config(), method="task_arithmetic") as job:
                    table["emr"] = emr_cost(suite, job)
                print(f"[{kind}] emr: refused on adapters; it would cost {table['emr']['total_units']:.2f} units "
                      "at its smallest size", flush=True)
            elif not all((method, k) in done for k in a.sizes):
                t1 = time.perf_counter()
                job = jobs[method] = AdapterMerge(suite.merge_config(), method=method)
                job.plan()
                table.setdefault("plan_seconds", {})[method] = round(time.perf_counter() - t1, 2)
                table["unit_bytes"] = job.cost.unit_bytes
                table["head_bytes"] = job.models.task_specific_bytes()
        for k in a.sizes:  # size by size, so that an interrupted run has whole columns
            for method, job in jobs.items():
                if (method, k) in done:
                    continue
                t2 = time.perf_counter()
                grouping = job.plan().at(k)
                bundle = job.merge(grouping=grouping)
                acc, reused = {}, []
                for task in suite.tasks:
                    config, tensors, _ = task_adapter(bundle, task)
                    own = originals[task]
                    if tensors.keys() == own.keys() and all(torch.equal(tensors[x], own[x]) for x in own):
                        acc[task] = ref[task]["finetuned"]
                        reused.append(task)
                    else:
                        acc[task] = suite.accuracy(task, config, tensors)
                row = {"method": method, "requested": k, "size_units": grouping.size_units,
                       "size_bytes": grouping.size_bytes, "accuracy": acc, "reused": reused,
                       "average": sum(acc.values()) / len(acc),
                       "normalized": sum(acc[t] / ref[t]["finetuned"] for t in acc) / len(acc),
                       "seconds": round(time.perf_counter() - t2, 1)}
                table["rows"].append(row)
                _save(out, table)
                print(f"[{kind}] {method} size {k}: {grouping.size_units:.3f} units, average {row['average']:.4f}, "
                      f"normalised {row['normalized']:.4f} ({row['seconds']:.0f} s, {len(reused)} reused)",
                      flush=True)
    finally:
        for job in jobs.values():
            job.close()
    table["seconds"] = round(time.perf_counter() - t0, 1)
    _save(out, table)
    return table


# ------------------------------------------------------------------------------ report


def _avg(d: dict, key: str) -> float:
    return sum(r[key] for r in d.values()) / len(d)


def _plot(tables: dict, path: Path, normalized: bool) -> None:
    from flexmerge.plots import COLORS, _figure, _save as save_png

    fig, axes = _figure(5.0 * len(tables), 3.8, 1, len(tables))
    for ax, (kind, t) in zip(axes, tables.items()):
        ref, full = t["reference"], t.get("full_reference")
        for i, m in enumerate(dict.fromkeys(r["method"] for r in t["rows"])):
            pts = sorted((r["size_units"], r["normalized" if normalized else "average"]) for r in t["rows"]
                         if r["method"] == m)
            ax.plot(*zip(*pts), marker="o", markersize=3, color=COLORS[i % len(COLORS)], label=m)
        ft = 1.0 if normalized else _avg(ref, "finetuned")
        zs = (sum(r["zero_shot"] / r["finetuned"] for r in ref.values()) / len(ref)) if normalized else _avg(ref, "zero_shot")
        ax.axhline(ft, color="black", lw=0.8, ls="--", label=f"{KIND_TITLE[kind]} fine-tuned")
        ax.axhline(zs, color="gray", lw=0.8, ls=":", label="zero-shot (adapter's head)")
        if full:
            fv = (sum(full[x]["finetuned"] / ref[x]["finetuned"] for x in ref) / len(ref)) if normalized \
                else _avg(full, "finetuned")
            ax.axhline(fv, color="#8c564b", lw=0.8, ls="-.", label="full fine-tuning")
        ax.set_xlabel("size (units of one adapter)")
        ax.set_ylabel("normalised accuracy" if normalized else "average test accuracy")
        ax.set_title(f"text8, {KIND_TITLE[kind]} adapters", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    save_png(fig, path)


def summarize(a) -> int:
    tables = {k: _load(a.out / k / "curve.json") for k in KINDS}
    missing_kinds = [k for k, t in tables.items() if not t.get("rows")]
    tables = {k: t for k, t in tables.items() if t.get("rows")}
    if not tables:
        print(f"error: no tables under {a.out}; run `python bench/text8_peft.py` first", file=sys.stderr)
        return 2
    import platform

    import torch

    lines = ["# text8-peft: LoRA and (IA)3 adapters merged at every size", "",
             "Eight text8 tasks, each fine-tuned as a PEFT adapter (plus its task head) on the frozen "
             "pretrained encoder all-MiniLM-L6-v2, merged by flexmerge at 1 ... 8 units of one adapter. "
             "Produced by", "", "```bash", "nice -n 10 python bench/text8_peft.py", "```", "",
             f"on {platform.machine()} CPU, torch {torch.__version__}, one thread; the tables are "
             "`text8-peft/<kind>/curve.json`. It trains the adapters that are not cached yet "
             "(`~/.cache/flexmerge/text8-peft/<recipe key>/`), reuses the full fine-tunes and the "
             "pretrained base of the text8 suite (`docs/results/text8.md`), sweeps, and writes this page.", ""]
    lines += ["## Setup", "",
              "* Recipe (`flexmerge.bench.peft_finetune`): the full text8 recipe (same training examples, "
              "200 AdamW steps of 32 examples, sequence length 64, warm-up and decay, seeds, head initialisation) "
              "with the encoder frozen. LoRA: rank 8, alpha 16, no dropout, on `attention.self.query`, "
              "`attention.self.value` and `attention.output.dense` of each of the 6 layers (18 modules of "
              "384 x 384), learning rate 1e-3. (IA)3: PEFT's BERT targets `key`, `value`, `output.dense` "
              "(`output.dense`, both the attention output and the FFN output, scales its input), learning "
              "rate 3e-3 (T-Few's). The head (`bert.pooler.dense`, `classifier`) is trained at 3e-3 as "
              "PEFT `modules_to_save`, saved in the adapter and never merged (task-specific, as in the "
              "full benchmark).",
              "* Merging: `AdapterMerge` with the default planner and each method's default parameters; "
              "a merged LoRA group stores its merged dW truncated to the members' rank 8 (so a merged block "
              "costs one adapter's bytes), a merged (IA)3 group one vector. Sizes count the adapters' "
              "weights only; every task also keeps its head (bytes below).",
              "* Evaluation: each task's adapter exported from the bundle (`task_adapter`), loaded by PEFT "
              "into the base and merged (`merge_and_unload`), scored on the text8 test sets "
              f"(seeded subsets of at most {a.max_test} examples, the ones `docs/results/text8.md` uses). "
              "Normalised accuracy = merged / the task's trained adapter, averaged over tasks.",
              "* Training times are wall seconds on a 2-core machine shared with other jobs, so they vary "
              "with the load more than with the task.", ""]
    for kind, t in tables.items():
        ref, full = t["reference"], t.get("full_reference")
        title = KIND_TITLE[kind]
        heads = t.get("head_bytes", {})
        lines += [f"## {title}", "",
                  f"Recipe key `{t['key']}` (full fine-tunes `{t['full_key']}`); one adapter = "
                  f"{t.get('unit_bytes', 0):,} bytes; heads {min(heads.values()) if heads else 0:,}-"
                  f"{max(heads.values()) if heads else 0:,} bytes per task; wall time of the last run "
                  f"{t.get('seconds', 0):.0f} s.", "",
                  f"| task | test examples | {title} fine-tuned | zero-shot | full fine-tuning | {title} training (s) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for task, r in ref.items():
            fv = f"{full[task]['finetuned']:.4f}" if full else "–"
            lines.append(f"| {task} | {r['test_examples']} | {r['finetuned']:.4f} | {r['zero_shot']:.4f} | {fv} | "
                         f"{r['train_seconds']:.0f} |")
        fva = f"{_avg(full, 'finetuned'):.4f}" if full else "–"
        lines += [f"| **average** | | {_avg(ref, 'finetuned'):.4f} | {_avg(ref, 'zero_shot'):.4f} | {fva} | "
                  f"{sum(r['train_seconds'] for r in ref.values()):.0f} (total) |", ""]
        sizes = sorted({r["requested"] for r in t["rows"]})
        lines += ["Average test accuracy / normalised accuracy, by method and requested size (units of one "
                  "adapter; the size delivered is in the table below it):", "",
                  "| method | " + " | ".join(f"{s:g}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        methods = list(dict.fromkeys(r["method"] for r in t["rows"]))
        for m in methods:
            by = {r["requested"]: r for r in t["rows"] if r["method"] == m}
            lines.append(f"| {m} | " + " | ".join(
                f"{by[s]['average']:.3f} / {by[s]['normalized']:.3f}" if s in by else "–" for s in sizes) + " |")
        lines += ["", "Delivered sizes (units):", "", "| method | " + " | ".join(f"{s:g}" for s in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for m in methods:
            by = {r["requested"]: r for r in t["rows"] if r["method"] == m}
            lines.append(f"| {m} | " + " | ".join(f"{by[s]['size_units']:.3f}" if s in by else "–" for s in sizes) + " |")
        lines.append("")
        gaps = [f"{m} at {k}" for m in methods for k in range(1, len(ref) + 1)
                if not any(r["method"] == m and r["requested"] == k for r in t["rows"])]
        if gaps:
            lines += [f"Not measured yet (the same command resumes and fills them in): {', '.join(gaps)}.", ""]
        emr = t.get("emr")
        if emr:
            lines += [f"**EMR** is not run on {title} adapters (`AdapterMerge` refuses mask methods). "
                      + ("Its masks and unified vector live on the dense dW of every adapted module, which is not "
                         "low-rank: " if kind == "lora" else "On (IA)3 vectors the task vectors are the vectors themselves, so "
                         "its unified vector costs one adapter and each mask 1 bit per element: ")
                      + f"at its smallest size (one group per block) it would store {emr['unified_units']:.2f} units "
                      f"of unified task vector plus {emr['mask_units']:.2f} units of masks and rescalers, "
                      f"{emr['total_units']:.2f} units in all"
                      + (", more than the 8 units of keeping every adapter." if kind == "lora" else
                         ". This could be allowed honestly (sizes counted from the masks), but the adapter "
                         "engine refuses it today; not measured."), ""]
        lines += [f"![{title} accuracy vs size](text8-peft/{kind}-accuracy.png)", "",
                  f"![{title} normalised accuracy vs size](text8-peft/{kind}-normalized.png)", ""]
        _plot({kind: t}, a.out / f"{kind}-accuracy.png", normalized=False)
        _plot({kind: t}, a.out / f"{kind}-normalized.png", normalized=True)
    for kind in missing_kinds:
        lines += [f"## {KIND_TITLE[kind]}", "", f"Not measured yet: `python bench/text8_peft.py --peft {kind}` "
                  "trains the adapters (or reuses them from the cache), sweeps, and rewrites this page.", ""]
    lines += ["## What differs from the paper's PEFT benchmark", "",
              "* The FlexMerge paper's PEFT benchmark merges (IA)3 adapters of one base model "
              "with sizes in units of one adapter. Here the base is a 6-layer sentence encoder "
              "(all-MiniLM-L6-v2), the tasks are the eight text8 classification tasks, each adapter is "
              "trained for 200 steps on at most 4,000 examples, and LoRA adapters are measured as well.",
              "* Heads: every task keeps its own trained pooler and classifier (PEFT `modules_to_save`; not "
              "merged, not counted in the sizes), as in the full text8 benchmark. A head (148-178k "
              "parameters) is larger than a LoRA adapter (111k) and an (IA)3 adapter (16k).",
              "* A merged LoRA group is stored at the members' rank 8 (truncated SVD of the merged dW), so "
              "the LoRA curves include that truncation error; merged (IA)3 vectors are stored exactly.",
              "* EMR is not measured (see above).", ""]
    REPORT_PATH = a.report
    REPORT_PATH.write_text("\n".join(lines))
    print(f"wrote {REPORT_PATH}")
    return 0


def main(argv=None) -> int:
    from flexmerge.errors import FlexMergeError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peft", choices=KINDS, action="append", help="kind(s) to run (default both)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sizes", default="1,4,2,6,8,3,5,7", help="requested sizes, run in this order")
    ap.add_argument("--max-test", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", type=Path, default=REPORT)
    ap.add_argument("--summarize", action="store_true", help="only rewrite the report from the stored tables")
    a = ap.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.sizes = [int(s) for s in a.sizes.split(",")]
    try:
        if not a.summarize:
            for kind in a.peft or KINDS:
                sweep_kind(kind, a)
        return summarize(a)
    except FlexMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
