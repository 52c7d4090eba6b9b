"""The ``text8`` suite: eight real tasks fine-tuned from one real pretrained encoder, cached.

:class:`Text8Suite` ties the pieces together: it verifies and loads the data
(:mod:`.datasets`), fine-tunes every task that is not cached yet with one recipe
(:mod:`.finetune`), and hands out what a sweep needs: the merge config
``{base, tasks, exclude}`` the engine takes, and the evaluator ``(task, state_dict) -> accuracy``
(:mod:`.evaluate`) with the fine-tuned and zero-shot reference accuracies.

Cache layout (``$FLEXMERGE_CACHE`` or ``~/.cache/flexmerge``)::

    text8/<first 16 hex digits of the recipe key>/
        recipe.json                 the recipe (and its full key)
        base/                       pretrained encoder, BertForSequenceClassification names
        <task>/                     one fine-tuned checkpoint per task (appears by atomic rename)
        reference-<eval key>.json   fine-tuned and zero-shot accuracies per task

A changed recipe (or backbone) gets a new directory and retrains; an unchanged one reuses every
complete checkpoint, so an interrupted run resumes at the first missing task.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ..errors import FlexMergeError
from .datasets import TASKS, TEXT8_TASKS, LabeledTexts, TaskData, default_cache_dir, load_task, resolve_data_dir
from .evaluate import TaskEvaluator
from .finetune import (HEAD_PATTERNS, FinetuneRecipe, finetune_task, is_complete,
                       resolve_backbone, write_base)
from .validation import load_validation

DEMO_TASKS: tuple[str, ...] = ("sst2", "trec", "agnews", "subj")
"""Four dissimilar tasks (sentiment, question type, topic, subjectivity) for ``flexmerge demo``."""

DEMO_RECIPE = FinetuneRecipe(max_train_examples=500, epochs=3.0, max_steps=None)
"""A few hundred examples per task: about two minutes of fine-tuning on 2 cores."""

DEFAULT_MAX_TEST = 500
DEMO_MAX_TEST = 200


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Text8Suite:
    """Fine-tuned checkpoints, merge config and evaluator for a set of text tasks.

    ``tasks`` (default the eight of ``text8``, in this order in the merge config), ``recipe``
    (a :class:`FinetuneRecipe` or dict), ``data_dir`` (default ``$FLEXMERGE_DATA`` or
    ``../shared/datasets/text``), ``cache_dir`` (default ``$FLEXMERGE_CACHE`` or
    ``~/.cache/flexmerge``), ``max_test`` test examples per task (seeded subset; ``None`` = all),
    ``progress`` rich bars per task, ``log`` one line per event (``None`` = silent).
    """

    def __init__(
        self,
        tasks: Sequence[str] = TEXT8_TASKS,
        recipe: FinetuneRecipe | dict | None = None,
        *,
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_test: int | None = DEFAULT_MAX_TEST,
        eval_batch_size: int = 128,
        progress: bool = True,
        log: Callable[[str], None] | None = _stderr,
    ):
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise FlexMergeError(
                f"unknown task(s) {unknown}; choose from {', '.join(sorted(TASKS))}"
            )
        if len(set(tasks)) != len(tasks) or len(tasks) < 1:
            raise FlexMergeError(f"tasks {tasks}: give at least one task, each once")
        self.tasks = tasks
        self.recipe = FinetuneRecipe.parse(recipe)
        self.data_dir = resolve_data_dir(data_dir)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.max_test = max_test
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.key = self.recipe.key()
        self.root = self.cache_dir / "text8" / self.key[:16]
        self._data: dict[str, TaskData] = {}
        self._evaluator: TaskEvaluator | None = None
        self._validation: dict[int, TaskEvaluator] = {}
        self.validation_sets: dict[str, tuple[LabeledTexts, bool]] = {}

    @classmethod
    def demo(cls, **kwargs) -> "Text8Suite":
        """The small setting of ``flexmerge demo``: :data:`DEMO_TASKS`, :data:`DEMO_RECIPE`,
        :data:`DEMO_MAX_TEST` test examples (each overridable by keyword)."""
        kwargs.setdefault("tasks", DEMO_TASKS)
        kwargs.setdefault("recipe", DEMO_RECIPE)
        kwargs.setdefault("max_test", DEMO_MAX_TEST)
        return cls(**kwargs)

    # ------------------------------------------------------------------ data and checkpoints

    def data(self, task: str) -> TaskData:
        """The task's capped train and test sets (verified against the manifest once)."""
        if task not in self._data:
            self._data[task] = load_task(
                task, self.data_dir, seed=self.recipe.split_seed,
                test_fraction=self.recipe.test_fraction,
                max_train=self.recipe.max_train_examples, max_test=self.max_test,
                cache_dir=self.cache_dir,
            )
        return self._data[task]

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    def task_dir(self, task: str) -> Path:
        return self.root / task

    def is_prepared(self) -> bool:
        return is_complete(self.base_dir) and all(is_complete(self.task_dir(t)) for t in self.tasks)

    def prepare(self) -> dict[str, Path]:
        """Fine-tune every task not cached yet (data and backbone checked first); returns
        ``{"base": dir, task: dir, ...}``."""
        resolve_backbone(self.recipe.backbone)
        for t in self.tasks:  # verify all data before any heavy work
            self.data(t)
        self.root.mkdir(parents=True, exist_ok=True)
        recipe_file = self.root / "recipe.json"
        if not recipe_file.is_file():
            tmp = recipe_file.with_name(f"recipe.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": self.key, "recipe": self.recipe.model_dump(
                mode="json")}, indent=1, sort_keys=True))
            os.replace(tmp, recipe_file)
        write_base(self.recipe, self.base_dir)
        for t in self.tasks:
            out = self.task_dir(t)
            if is_complete(out):
                self.log(f"{t}: cached at {out}")
                continue
            d = self.data(t)
            start = time.perf_counter()
            finetune_task(self.recipe, d, out, progress=self.progress)
            self.log(
                f"{t}: fine-tuned on {len(d.train)} examples in "
                f"{time.perf_counter() - start:.0f} s -> {out}"
            )
        return {"base": self.base_dir, **{t: self.task_dir(t) for t in self.tasks}}

    # ------------------------------------------------------------------ merging and evaluating

    def merge_config(self, **extra) -> dict:
        """The engine's config: ``{"base", "tasks", "exclude", **extra}`` (paths as strings).

        ``exclude`` is :data:`~flexmerge.bench.finetune.HEAD_PATTERNS`: the classifier and the
        pooler, which all-MiniLM-L6-v2 never trained (see :mod:`.finetune`)."""
        return {
            "base": str(self.base_dir),
            "tasks": {t: str(self.task_dir(t)) for t in self.tasks},
            "exclude": list(HEAD_PATTERNS),
            **extra,
        }

    @property
    def evaluator(self) -> TaskEvaluator:
        """``evaluator(task, model_or_state_dict) -> accuracy`` on the capped test sets."""
        if self._evaluator is None:
            if not self.is_prepared():
                raise FlexMergeError(
                    "text8 checkpoints are not ready: call Text8Suite.prepare() first"
                )
            self._evaluator = TaskEvaluator(
                {t: self.data(t) for t in self.tasks},
                {t: self.task_dir(t) for t in self.tasks},
                self.base_dir,
                max_seq_len=self.recipe.max_seq_len,
                batch_size=self.eval_batch_size,
                exclude=HEAD_PATTERNS,
            )
        return self._evaluator

    def validation_evaluator(self, max_val: int = 200) -> TaskEvaluator:
        """``evaluator(task, model_or_state_dict) -> accuracy`` on validation examples, for
        ``flexmerge curve --calibrate``: per task, ``max_val`` training examples that fine-tuning
        did not use, or, for a task whose whole training split was used, seen training examples
        (:func:`~flexmerge.bench.validation.validation_split`; which one is in
        :attr:`validation_sets`). Never a test example."""
        if max_val not in self._validation:
            if not self.is_prepared():
                raise FlexMergeError("text8 checkpoints are not ready: call Text8Suite.prepare() first")
            for t in self.tasks:
                self.data(t)  # verifies the files
                self.validation_sets[t] = load_validation(
                    t, self.data_dir, seed=self.recipe.split_seed, test_fraction=self.recipe.test_fraction,
                    max_train=self.recipe.max_train_examples, max_val=max_val)
            ev = self.evaluator
            self._validation[max_val] = TaskEvaluator(
                {t: self.validation_sets[t][0] for t in self.tasks},
                {t: self.task_dir(t) for t in self.tasks}, self.base_dir,
                max_seq_len=self.recipe.max_seq_len, batch_size=self.eval_batch_size,
                exclude=HEAD_PATTERNS, tokenizer=ev.tokenizer)
        return self._validation[max_val]

    def evaluate(self, task: str, model_or_state_dict) -> float:
        """Same as ``self.evaluator(task, model_or_state_dict)``."""
        return self.evaluator(task, model_or_state_dict)

    def reference(self) -> dict[str, dict[str, float]]:
        """``{task: {"finetuned": acc, "zero_shot": acc, "test_examples": n}}``, cached on disk
        per recipe, test cap and evaluation settings."""
        ev_key = hashlib.sha256(json.dumps(
            [self.max_test, self.eval_batch_size, list(HEAD_PATTERNS)]).encode()).hexdigest()[:12]
        path = self.root / f"reference-{ev_key}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        changed = False
        for t in self.tasks:
            if t in cached:
                continue
            ev = self.evaluator
            cached[t] = {
                "finetuned": ev.finetuned(t),
                "zero_shot": ev.zero_shot(t),
                "test_examples": len(self.data(t).test),
            }
            changed = True
            self.log(f"{t}: fine-tuned {cached[t]['finetuned']:.4f}, "
                     f"zero-shot {cached[t]['zero_shot']:.4f}")
        if changed:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
            os.replace(tmp, path)
        return {t: cached[t] for t in self.tasks}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flexmerge.bench.suite [--demo] [--tasks a,b] [--max-test N]``: fine-tune (or
    reuse) and print the reference accuracies."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m flexmerge.bench.suite")
    p.add_argument("--demo", action="store_true", help="the small demo setting")
    p.add_argument("--tasks", default=None, help="comma-separated task names")
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    kw: dict = {"data_dir": a.data_dir, "cache_dir": a.cache_dir, "progress": not a.no_progress}
    if a.tasks:
        kw["tasks"] = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if a.max_test is not None:
        kw["max_test"] = a.max_test
    try:
        suite = Text8Suite.demo(**kw) if a.demo else Text8Suite(**kw)
        t0 = time.perf_counter()
        suite.prepare()
        t1 = time.perf_counter()
        ref = suite.reference()
        t2 = time.perf_counter()
    except FlexMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cache: {suite.root}")
    print(f"{'task':<15}{'train':>7}{'test':>6}{'fine-tuned':>12}{'zero-shot':>11}")
    for t, r in ref.items():
        print(f"{t:<15}{len(suite.data(t).train):>7}{r['test_examples']:>6}"
              f"{r['finetuned']:>12.4f}{r['zero_shot']:>11.4f}")
    n = len(ref)
    print(f"{'average':<28}{sum(r['finetuned'] for r in ref.values()) / n:>12.4f}"
          f"{sum(r['zero_shot'] for r in ref.values()) / n:>11.4f}")
    print(f"fine-tuning {t1 - t0:.0f} s, reference evaluation {t2 - t1:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
