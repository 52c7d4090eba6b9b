"""``flexmerge demo``: the whole pipeline on real models, in minutes, on a laptop CPU.

Fine-tunes (or reuses from the cache) all-MiniLM-L6-v2 on four real text tasks with a few
hundred examples each (:data:`flexmerge.bench.suite.DEMO_TASKS`), plans FlexMerge once per
method, merges at several sizes with two methods, evaluates every task's test accuracy, and
prints the accuracy-size table next to the fine-tuned and zero-shot levels; writes
``curve.csv``, ``curve.json`` and the plots.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from .errors import FlexMergeError

DEMO_METHODS = ("task_arithmetic", "ties")
DEMO_SIZES = (1.0, 1.5, 2.5, 4.0)
"""Three merged sizes and the unmerged one: keeps a cached demo under a minute on 2 cores."""


def run_demo(out: str | os.PathLike | None = None, *, methods: Sequence[str] = DEMO_METHODS,
             sizes: Sequence[float] = DEMO_SIZES, tasks: Sequence[str] | None = None,
             data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
             max_train: int | None = None, max_test: int | None = None, progress: bool = True):
    """Run the demo; return the :class:`~flexmerge.evaluate.SweepResult`."""
    from rich.console import Console

    from .bench.finetune import FinetuneRecipe
    from .bench.suite import DEMO_RECIPE, Text8Suite
    from .evaluate import sweep

    console = Console(stderr=True, highlight=False)
    kw: dict = {"data_dir": data_dir, "cache_dir": cache_dir, "progress": progress,
                "log": lambda m: console.print(m, markup=False)}
    if tasks:
        kw["tasks"] = list(tasks)
    if max_train:
        kw["recipe"] = FinetuneRecipe(**{**DEMO_RECIPE.model_dump(), "max_train_examples": max_train})
    if max_test:
        kw["max_test"] = max_test
    t0 = time.perf_counter()
    suite = Text8Suite.demo(**kw)
    suite.prepare()
    ref = suite.reference()
    t1 = time.perf_counter()
    out = Path(out) if out is not None else suite.root / "demo"
    result = sweep(suite.merge_config(), list(methods), list(sizes), suite.evaluator,
                   finetuned={t: r["finetuned"] for t, r in ref.items()},
                   zero_shot={t: r["zero_shot"] for t, r in ref.items()}, out=out,
                   ylabel="accuracy", evaluator_name="text accuracy (flexmerge.bench)",
                   log=(lambda m: console.print(m, markup=False)) if progress else None)
    t2 = time.perf_counter()
    console.print(f"fine-tuning/reference {t1 - t0:.0f} s, merging and evaluation {t2 - t1:.0f} s; "
                  f"checkpoints in {suite.root}", markup=False)
    result.out_dir = out
    return result


__all__ = ["run_demo", "DEMO_METHODS", "DEMO_SIZES", "FlexMergeError"]
