"""text14: scaling with the number of tasks (FlexMerge Appendix C.7) and out-of-distribution tasks
(Appendix C.6), written to docs/results/scaling.md.

text14 is text8's eight tasks plus the six other data sets of ``../shared/datasets/text`` (sst5,
mr, sms_spam, tweet_hate, tweet_irony, tweet_offensive), fine-tuned with text8's recipe into the
same cache (text8's checkpoints are reused; only the six new tasks are trained).

    python bench/text14_report.py --part finetune   # fine-tune the six new tasks (cached)
    python bench/text14_report.py --part scaling    # sweeps: 8 tasks vs 14 tasks
    python bench/text14_report.py --part ood        # OOD tasks on the merged text8 models
    python bench/text14_report.py --summarize       # docs/results/scaling.md and its plots
    python bench/text14_report.py                   # all of the above

* **Scaling (C.7, the paper's Figure 18).** For each method, the sweep merges the eight text8
  tasks (sizes 1, 2, 4) and all fourteen (sizes 1, 1.75, 2, 3.5, 7) with the default planner; the
  report compares the normalised accuracy *on the eight text8 tasks* at fixed sizes (1, 2 units)
  and at sizes proportional to N (N/8, N/4, N/2 units: 1, 2, 4 for N = 8; 1.75, 3.5, 7 for N = 14).
* **OOD (C.6, Tables 5 and 6).** :mod:`flexmerge.bench.ood`: merge the eight text8 tasks; each of
  the six other tasks gets a linear probe fitted on the pretrained encoder's features of its
  training examples, and is predicted by ensembling that probe over all eight branches of the
  merged model, at sizes 1, 2, 4 and 8 (the experts themselves), against the best fine-tuned expert
  with the same probe.

The section "Sweeps on Ray" renders ``text14/ray.json``, the figures printed by
``python bench/bench_ray_sweep.py --text8``.

Each part writes under ``docs/results/text14/`` (sweep tables ``scaling-n8/``, ``scaling-n14/``,
``ood.json``, ``meta.json``); ``--summarize`` needs only those files.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "text14"
DOC = ROOT / "docs" / "results" / "scaling.md"
METHODS = "task_arithmetic,ties,tsv,consensus"
OOD_METHODS = "task_arithmetic,ties"
OOD_SIZES = "1,2,4,8"
SCALING_SIZES = {8: "1,2,4", 14: "1,1.75,2,3.5,7"}


def _meta(update: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "meta.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.update(update)
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def suites(max_test: int):
    from flexmerge.bench.datasets import TEXT8_TASKS, TEXT14_TASKS
    from flexmerge.bench.suite import Text8Suite

    return (Text8Suite(tasks=TEXT8_TASKS, max_test=max_test, progress=False),
            Text8Suite(tasks=TEXT14_TASKS, max_test=max_test, progress=False))


def part_finetune(max_test: int) -> None:
    s8, s14 = suites(max_test)
    t0 = time.perf_counter()
    before = [t for t in s14.tasks if not (s14.task_dir(t) / "model.safetensors").exists()]
    s14.prepare()
    t1 = time.perf_counter()
    ref = s14.reference()
    t2 = time.perf_counter()
    _meta({"recipe_key": s14.key, "recipe": s14.recipe.model_dump(mode="json"), "max_test": max_test,
           "finetune_s": round(t1 - t0, 1), "finetuned_tasks": before, "reference_s": round(t2 - t1, 1),
           "reference": ref})
    print(f"fine-tuned {before or 'nothing (all cached)'} in {t1 - t0:.0f} s; reference {t2 - t1:.0f} s")


def part_scaling(max_test: int, methods: str) -> None:
    from flexmerge.evaluate import sweep

    timings = {}
    for suite in suites(max_test):
        n = len(suite.tasks)
        ref = suite.reference()
        t0 = time.perf_counter()
        sweep(suite.merge_config(), methods, SCALING_SIZES[n], suite.evaluator,
              finetuned={t: r["finetuned"] for t, r in ref.items()},
              zero_shot={t: r["zero_shot"] for t, r in ref.items()},
              out=OUT / f"scaling-n{n}", evaluator_name=f"text{n} test accuracy", log=print)
        timings[f"scaling_n{n}_s"] = round(time.perf_counter() - t0, 1)
    _meta(timings)


def part_ood(max_test: int, methods: str, sizes: str, probe_train: int) -> None:
    import torch

    from flexmerge import FlexMerge, MultiTaskModel
    from flexmerge.bench.finetune import _quiet_transformers
    from flexmerge.bench.ood import LinearProbe, accuracy, branch_predictions, encoder_features

    s8, s14 = suites(max_test)
    ood_tasks = [t for t in s14.tasks if t not in s8.tasks]
    t0 = time.perf_counter()
    tok = s8.evaluator.tokenizer  # the OOD tasks need data only, no fine-tuned checkpoint
    transformers = _quiet_transformers()
    base = transformers.BertModel.from_pretrained(str(s8.base_dir), add_pooling_layer=False)
    probes, result = {}, {"ood_tasks": ood_tasks, "tasks": list(s8.tasks), "pretrained": {},
                          "probe_train": {}, "runs": []}
    tests = {}
    for t in ood_tasks:
        d = s14.data(t)
        train = d.train.take(range(min(probe_train, len(d.train))))
        x, y = encoder_features(base, tok, train)
        probes[t] = LinearProbe.fit(x, y, d.test.num_classes)
        tests[t] = d.test
        xt, yt = encoder_features(base, tok, d.test)
        result["pretrained"][t] = accuracy(probes[t].logits(xt).argmax(-1), yt)
        result["probe_train"][t] = len(train)
        print(f"{t}: probe on {len(train)} training examples; pretrained encoder {result['pretrained'][t]:.4f}")
    t1 = time.perf_counter()
    size_list = [float(s) for s in sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="flexmerge-ood-") as tmp:
        for method in methods.split(","):
            with FlexMerge(s8.merge_config(method=method)) as fm:
                for size in size_list:
                    if size >= len(s8.tasks) and any(r["size"] >= len(s8.tasks) for r in result["runs"]):
                        continue  # size N is the experts themselves, the same for every method
                    out = Path(tmp) / f"{method}-{size}"
                    bundle = fm.merge(size, out=out)
                    mt = MultiTaskModel.from_bundle(out)
                    run = {"method": method if size < len(s8.tasks) else "fine-tuned experts",
                           "size": size, "size_units": bundle.size_units, "ensemble": {}, "branches": {}}
                    for t in ood_tasks:
                        per_branch, ens, labels = branch_predictions(mt, probes[t], tok, tests[t], s8.tasks)
                        run["ensemble"][t] = accuracy(ens, labels)
                        run["branches"][t] = {b: accuracy(p, labels) for b, p in per_branch.items()}
                    result["runs"].append(run)
                    avg = sum(run["ensemble"].values()) / len(ood_tasks)
                    print(f"{run['method']} at {bundle.size_units:.3f} units: ensemble average {avg:.4f}")
                    del mt
    result["seconds"] = {"probes": round(t1 - t0, 1), "runs": round(time.perf_counter() - t1, 1)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ood.json").write_text(json.dumps(result, indent=1) + "\n")
    _meta({"ood_s": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["finetune", "scaling", "ood", "all"], default="all")
    p.add_argument("--summarize", action="store_true", help="only write docs/results/scaling.md")
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument("--methods", default=METHODS, help="scaling sweep methods")
    p.add_argument("--ood-methods", default=OOD_METHODS)
    p.add_argument("--ood-sizes", default=OOD_SIZES)
    p.add_argument("--probe-train", type=int, default=2000, help="training examples per OOD probe")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from text14_summary import summarize

    if not a.summarize:
        _meta({"machine": f"{platform.machine()} CPU, torch {__import__('torch').__version__}",
               "date": time.strftime("%Y-%m-%d")})
        if a.part in ("finetune", "all"):
            part_finetune(a.max_test)
        if a.part in ("scaling", "all"):
            part_scaling(a.max_test, a.methods)
        if a.part in ("ood", "all"):
            part_ood(a.max_test, a.ood_methods, a.ood_sizes, a.probe_train)
    summarize(OUT, DOC)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
