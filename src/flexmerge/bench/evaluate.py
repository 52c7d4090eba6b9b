"""Test-set accuracy of a classifier given as a model or as a (merged) state dict.

:func:`evaluate_accuracy` runs a capped test set (tokenized once per process, sorted by length and
dynamically padded, so repeated evaluations of many merged models cost only the forward passes).
:class:`TaskEvaluator` binds tasks to their fine-tuned checkpoints and the pretrained base, and is
the ``(task_name, state_dict) -> accuracy`` callable the sweep needs; it also gives the two
reference levels of every accuracy-size plot:

* fine-tuned: the task's own checkpoint;
* zero-shot: the pretrained encoder with that task's fine-tuned head (every name matching the
  head patterns from the task, everything else from the base), as the FlexMerge paper's
  "zero-shot" line is the pretrained backbone with the task's head (Sec. 5; for CLIP the head is
  the zero-shot text classifier, here it is the fine-tuned pooler + classifier).

A state dict may omit head parameters (names matching the exclude patterns): they are filled in
from the task's checkpoint. Any other missing or unexpected name is an error, so a merged model
can never silently borrow fine-tuned encoder weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import FlexMergeError
from .datasets import LabeledTexts, TaskData
from .finetune import (HEAD_PATTERNS, _quiet_transformers, load_tokenizer, pad,
                       read_state_dict, to_bert_names, tokenize)

_BATCH_CACHE: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def eval_batches(
    tokenizer, data: LabeledTexts, *, max_seq_len: int = 64, batch_size: int = 128
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask, labels)`` batches sorted by length; cached in memory per
    (tokenizer, texts, labels, max_seq_len, batch_size)."""
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), max_seq_len,
           batch_size, hash(data.texts), hash(data.labels))
    hit = _BATCH_CACHE.get(key)
    if hit is not None:
        return hit
    ids = tokenize(tokenizer, data.texts, max_seq_len)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad_id = tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x, mask = pad([ids[i] for i in idx], pad_id)
        batches.append((x, mask, torch.tensor([data.labels[i] for i in idx], dtype=torch.long)))
    _BATCH_CACHE[key] = batches
    return batches


@torch.inference_mode()
def accuracy_of_model(model, batches) -> float:
    """Fraction of examples whose arg-max logit is the label."""
    model.eval()
    correct = total = 0
    for x, mask, y in batches:
        out = model(input_ids=x, attention_mask=mask)
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    if total == 0:
        raise FlexMergeError("empty test set: raise max_test (or check the data directory)")
    return correct / total


def _compile(patterns: Sequence[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else re.compile("(?!)")


class _Skeleton:
    """One ``BertForSequenceClassification`` whose encoder is overwritten for every evaluation;
    the classifier is swapped per task (tasks differ in their number of classes)."""

    def __init__(self, config_dir: Path):
        transformers = _quiet_transformers()
        config = transformers.BertConfig.from_pretrained(str(config_dir))
        self.model = transformers.BertForSequenceClassification(config)
        self.model.eval()
        self.names = {k for k in self.model.state_dict() if not k.endswith("position_ids")}

    def load(self, sd: Mapping[str, torch.Tensor], num_labels: int, task: str):
        head_w = sd.get("classifier.weight")
        if head_w is None or head_w.shape[0] != num_labels:
            raise FlexMergeError(
                f"task {task}: classifier.weight must have {num_labels} rows (its classes); "
                "pass that task's head or leave it out to use the fine-tuned one"
            )
        m = self.model
        if m.classifier.out_features != num_labels:
            m.classifier = torch.nn.Linear(m.classifier.in_features, num_labels)
            m.num_labels = num_labels
            m.config.num_labels = num_labels
        body = {k: v for k, v in sd.items()}
        names = set(body)
        expected = {k for k in self.names if not k.startswith("classifier.")} | {
            "classifier.weight", "classifier.bias"}
        missing, unexpected = expected - names, names - expected
        if missing or unexpected:
            raise FlexMergeError(
                f"task {task}: state dict does not fit the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}; pass BertForSequenceClassification names"
            )
        with torch.no_grad():
            m.load_state_dict(body, strict=False)
        return m


def evaluate_accuracy(
    task: TaskData | LabeledTexts,
    model_or_state_dict,
    *,
    checkpoint: str | Path | None = None,
    tokenizer=None,
    max_seq_len: int = 64,
    batch_size: int = 128,
    exclude: Sequence[str] = HEAD_PATTERNS,
) -> float:
    """Accuracy on ``task``'s test set (or on the given :class:`LabeledTexts`).

    ``model_or_state_dict``: an ``nn.Module`` that maps ``(input_ids, attention_mask)`` to logits
    (or an output with ``.logits``), or a state dict in ``BertForSequenceClassification`` names;
    a state dict needs ``checkpoint``, the task's fine-tuned directory (config, tokenizer, and the
    head parameters matching ``exclude`` when the state dict lacks them). For many calls use
    :class:`TaskEvaluator`, which keeps one model skeleton.
    """
    data = task.test if isinstance(task, TaskData) else task
    name = task.name if isinstance(task, TaskData) else "task"
    if isinstance(model_or_state_dict, torch.nn.Module):
        if tokenizer is None:
            if checkpoint is None:
                raise FlexMergeError("evaluate_accuracy: give tokenizer= or checkpoint= with a model")
            tokenizer = load_tokenizer(Path(checkpoint))
        return accuracy_of_model(model_or_state_dict,
                                 eval_batches(tokenizer, data, max_seq_len=max_seq_len,
                                              batch_size=batch_size))
    if checkpoint is None:
        raise FlexMergeError(
            "evaluate_accuracy: a state dict needs checkpoint= (the task's fine-tuned directory)"
        )
    ev = TaskEvaluator({name: data}, {name: Path(checkpoint)}, base=None,
                       max_seq_len=max_seq_len, batch_size=batch_size, exclude=exclude,
                       tokenizer=tokenizer)
    return ev(name, model_or_state_dict)


class TaskEvaluator:
    """``evaluator(task_name, model_or_state_dict) -> accuracy`` over fixed test sets.

    ``tests[task]`` are the (capped) test sets, ``checkpoints[task]`` the fine-tuned directories,
    ``base`` the pretrained directory (needed only for :meth:`zero_shot`). One model skeleton and
    one tokenization per test set are kept for the process's lifetime; fine-tuned heads are read
    once per task.
    """

    def __init__(
        self,
        tests: Mapping[str, LabeledTexts | TaskData],
        checkpoints: Mapping[str, str | Path],
        base: str | Path | None,
        *,
        max_seq_len: int = 64,
        batch_size: int = 128,
        exclude: Sequence[str] = HEAD_PATTERNS,
        tokenizer=None,
    ):
        torch.set_num_threads(2)
        self.tests = {k: (v.test if isinstance(v, TaskData) else v) for k, v in tests.items()}
        self.checkpoints = {k: Path(v) for k, v in checkpoints.items()}
        missing = set(self.tests) - set(self.checkpoints)
        if missing:
            raise FlexMergeError(f"no fine-tuned checkpoint for tasks {sorted(missing)}")
        self.base = Path(base) if base is not None else None
        self.max_seq_len, self.batch_size = max_seq_len, batch_size
        self.exclude = list(exclude)
        self._head = _compile(self.exclude)
        first = next(iter(self.checkpoints.values()))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(first)
        self._skeleton: _Skeleton | None = None
        self._heads: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.tests)

    @property
    def resume_key(self) -> str:
        """What a resumed sweep must match besides the evaluator's name (see
        :mod:`flexmerge.evaluate.resume`): the test sets' texts and labels, the fine-tuned
        checkpoints (their heads are used), sequence length and head patterns."""
        h = hashlib.sha256()
        for t, d in sorted(self.tests.items()):
            h.update(json.dumps([t, list(d.texts), list(d.labels), str(self.checkpoints[t])]).encode())
        h.update(json.dumps([self.max_seq_len, self.exclude]).encode())
        return h.hexdigest()

    def _task(self, task: str) -> LabeledTexts:
        if task not in self.tests:
            raise FlexMergeError(f"unknown task {task!r}; the evaluator has {', '.join(self.tests)}")
        return self.tests[task]

    def head(self, task: str) -> dict[str, torch.Tensor]:
        """The task's fine-tuned parameters that match the exclude patterns (its head)."""
        self._task(task)
        if task not in self._heads:
            sd = to_bert_names(read_state_dict(self.checkpoints[task]))
            self._heads[task] = {k: v for k, v in sd.items() if self._head.fullmatch(k)}
        return self._heads[task]

    def finetuned_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        self._task(task)
        return to_bert_names(read_state_dict(self.checkpoints[task]))

    def zero_shot_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """Pretrained weights for every merged name, the task's own head for the excluded ones."""
        if self.base is None:
            raise FlexMergeError("zero-shot accuracy needs the pretrained base directory (base=)")
        base = to_bert_names(read_state_dict(self.base))
        sd = {k: v for k, v in base.items() if not self._head.fullmatch(k)}
        sd.update(self.head(task))
        return sd

    def __call__(self, task: str, model_or_state_dict) -> float:
        data = self._task(task)
        batches = eval_batches(self.tokenizer, data, max_seq_len=self.max_seq_len,
                               batch_size=self.batch_size)
        if isinstance(model_or_state_dict, torch.nn.Module):
            return accuracy_of_model(model_or_state_dict, batches)
        if not isinstance(model_or_state_dict, Mapping):
            raise FlexMergeError(
                f"task {task}: evaluator got {type(model_or_state_dict).__name__}; pass a "
                "torch module or a state dict"
            )
        sd = to_bert_names(dict(model_or_state_dict))
        for k, v in self.head(task).items():
            sd.setdefault(k, v)
        if self._skeleton is None:
            self._skeleton = _Skeleton(self.checkpoints[task])
        model = self._skeleton.load(sd, data.num_classes, task)
        return accuracy_of_model(model, batches)

    def finetuned(self, task: str) -> float:
        """Accuracy of the task's own fine-tuned checkpoint."""
        return self(task, self.finetuned_state_dict(task))

    def zero_shot(self, task: str) -> float:
        """Accuracy of the pretrained encoder with the task's fine-tuned head."""
        return self(task, self.zero_shot_state_dict(task))
