"""Validation examples of a text task: training examples that fine-tuning did not use.

For ``flexmerge curve --calibrate`` on the text8 suite (:meth:`flexmerge.bench.suite.Text8Suite.
validation_evaluator`): calibration must never see a test example. The suite fine-tunes each task
on a seeded prefix of its training split (``max_train_examples``), so the rest of that seeded
permutation is held out; tasks whose whole training split was used fall back to seen training
examples, and say so.
"""

from __future__ import annotations

import os

from ..errors import FlexMergeError
from .datasets import TASKS, LabeledTexts, _split, resolve_data_dir, seeded_permutation


def validation_split(
    name: str,
    train: LabeledTexts,
    test: LabeledTexts | None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_val: int = 200,
) -> tuple[LabeledTexts, bool]:
    """``(validation set, held_out)``: the first ``max_val`` training examples that fine-tuning
    did not use (the seeded train permutation past ``max_train``), ``held_out = True``; when fewer
    than ``max_val`` are left (the task's whole training split was used), the first ``max_val``
    training examples, which the fine-tuned model has seen, ``held_out = False``. Never a test
    example."""
    if max_val < 1:
        raise FlexMergeError(f"max_val={max_val} must be >= 1")
    train, _ = _split(name, train, test, seed, test_fraction)
    perm = seeded_permutation(len(train), name, seed, "train")
    unused = perm[max_train:] if max_train is not None else []
    if len(unused) >= max_val:
        return train.take(unused[:max_val]), True
    return train.take(perm[:max_val]), False


def load_validation(name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                    test_fraction: float = 0.2, max_train: int | None = None, max_val: int = 200,
                    ) -> tuple[LabeledTexts, bool]:
    """:func:`validation_split` of a task read from ``data_dir`` (verified by :func:`load_task`
    before, as the suite does)."""
    if name not in TASKS:
        raise FlexMergeError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    train, test = TASKS[name].read(resolve_data_dir(data_dir))
    return validation_split(name, train, test, seed=seed, test_fraction=test_fraction, max_train=max_train,
                            max_val=max_val)
