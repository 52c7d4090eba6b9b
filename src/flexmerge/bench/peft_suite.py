"""The ``text8-peft`` suite: LoRA or (IA)3 adapters of the text8 tasks, their merge config and evaluator.

:class:`PeftSuite` is :class:`~.suite.Text8Suite`'s counterpart for adapters: the same data, test
sets and pretrained ``base/`` (written by the full suite's recipe, which the PEFT recipe extends),
one adapter directory per task (:mod:`.peft_finetune`), and an evaluator that rebuilds a task's
model from an adapter (its config and tensors, e.g. what :func:`flexmerge.adapters.export.task_adapter`
gives for a merged bundle) the way PEFT does: ``get_peft_model`` on the base, the adapter's tensors
loaded, ``merge_and_unload`` (``W0 + s B A`` for LoRA, ``W0`` scaled by the vector for (IA)3), the
head taken from the adapter's ``modules_to_save`` tensors.

References per task: ``finetuned`` (the adapter as trained) and ``zero_shot`` (the pretrained
encoder with the adapter's trained head: every LoRA ``B`` set to 0, every (IA)3 vector to 1), as
the FlexMerge paper's zero-shot line is the pretrained backbone with the task's head.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import FlexMergeError
from .datasets import TEXT8_TASKS
from .evaluate import accuracy_of_model, eval_batches
from .finetune import build_model, is_complete, load_tokenizer, resolve_backbone, write_base
from .peft_finetune import BENCH_RECIPES, PeftRecipe, finetune_adapter, is_adapter_complete
from .suite import DEFAULT_MAX_TEST, Text8Suite


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a PEFT adapter directory."""
    from safetensors.torch import load_file

    return (json.loads((path / "adapter_config.json").read_text()),
            load_file(str(path / "adapter_model.safetensors")))


def zero_shot_adapter(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter with no effect on the encoder (LoRA ``B`` = 0, (IA)3 vectors = 1); the head kept."""
    out = {}
    for k, v in tensors.items():
        if ".lora_B." in k:
            v = torch.zeros_like(v)
        elif k.endswith(".ia3_l"):
            v = torch.ones_like(v)
        out[k] = v
    return out


class PeftSuite:
    """Adapters, merge config and evaluator for a set of text tasks (module docstring).

    ``recipe`` is a :class:`~.peft_finetune.PeftRecipe` or dict; the other arguments are
    :class:`~.suite.Text8Suite`'s; ``threads`` is torch's thread count for training and evaluation.
    """

    def __init__(self, tasks: Sequence[str] = TEXT8_TASKS, recipe: PeftRecipe | dict | None = None, *,
                 data_dir=None, cache_dir=None, max_test: int | None = DEFAULT_MAX_TEST,
                 eval_batch_size: int = 128, threads: int = 1,
                 log: Callable[[str], None] | None = _stderr):
        self.recipe = PeftRecipe.parse(recipe)
        self.full = Text8Suite(tasks, self.recipe.full_recipe(), data_dir=data_dir, cache_dir=cache_dir,
                               max_test=max_test, eval_batch_size=eval_batch_size, progress=False, log=log)
        self.tasks = self.full.tasks
        self.threads = threads
        self.log = log or (lambda msg: None)
        self.key = self.recipe.key()
        self.root = self.full.cache_dir / "text8-peft" / self.key[:16]
        self._tokenizer = None
        self._pristine: dict[str, torch.nn.Module] = {}
        self.train_seconds: dict[str, float] = {}

    @property
    def base_dir(self) -> Path:
        return self.full.base_dir

    def task_dir(self, task: str) -> Path:
        return self.root / task

    def data(self, task: str):
        return self.full.data(task)

    def is_prepared(self) -> bool:
        return is_complete(self.base_dir) and all(is_adapter_complete(self.task_dir(t)) for t in self.tasks)

    def prepare(self) -> dict[str, Path]:
        """Train every adapter not cached yet (data and backbone checked first); returns
        ``{"base": dir, task: adapter dir, ...}``."""
        resolve_backbone(self.recipe.backbone)
        for t in self.tasks:
            self.data(t)
        self.root.mkdir(parents=True, exist_ok=True)
        recipe_file = self.root / "recipe.json"
        if not recipe_file.is_file():
            tmp = recipe_file.with_name(f"recipe.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": self.key, "recipe": self.recipe.model_dump(mode="json")},
                                      indent=1, sort_keys=True))
            os.replace(tmp, recipe_file)
        write_base(self.full.recipe, self.base_dir)
        for t in self.tasks:
            out = self.task_dir(t)
            if is_adapter_complete(out):
                self.log(f"{t}: {self.recipe.peft} adapter cached at {out}")
                continue
            d = self.data(t)
            start = time.perf_counter()
            finetune_adapter(self.recipe, d, self.base_dir, out, threads=self.threads)
            self.log(f"{t}: {self.recipe.peft} adapter trained on {len(d.train)} examples in "
                     f"{time.perf_counter() - start:.0f} s -> {out}")
        return {"base": self.base_dir, **{t: self.task_dir(t) for t in self.tasks}}

    def merge_config(self, **extra) -> dict:
        """The merge config ``{"base", "tasks"}``: every task an adapter directory (an adapter config
        for :func:`flexmerge.adapters.open_job`); the heads are ``modules_to_save`` tensors, kept per task."""
        return {"base": str(self.base_dir), "tasks": {t: str(self.task_dir(t)) for t in self.tasks}, **extra}

    # ------------------------------------------------------------------ evaluation

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_dir)
        return self._tokenizer

    def build(self, task: str, config: dict, tensors: dict[str, torch.Tensor]):
        """The task's ``BertForSequenceClassification`` with the adapter merged in by PEFT
        (module docstring). Every adapter tensor must load: a key PEFT does not expect is an error."""
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

        if task not in self._pristine:  # the base with a placeholder head, built once per task
            self._pristine[task] = build_model(self.base_dir, self.data(task).label_names, seed=0)
        model = copy.deepcopy(self._pristine[task])
        model.config._name_or_path = model.name_or_path = config.get("base_model_name_or_path") or str(self.base_dir)
        cfg = PeftConfig.from_peft_type(**{k: v for k, v in config.items() if k != "peft_version"})
        pm = get_peft_model(model, cfg)
        result = set_peft_model_state_dict(pm, tensors)
        if result.unexpected_keys:
            raise FlexMergeError(f"task {task}: adapter tensors {result.unexpected_keys[:3]} do not fit the "
                                 "model; give an adapter of this suite's base")
        loaded = {k for k in result.missing_keys if ("lora_" in k or "ia3_" in k or "modules_to_save" in k)}
        if loaded:
            raise FlexMergeError(f"task {task}: adapter lacks {sorted(loaded)[:3]}; give a complete adapter")
        return pm.merge_and_unload().eval()

    def accuracy(self, task: str, config: dict, tensors: dict[str, torch.Tensor]) -> float:
        """Test accuracy of the task's model rebuilt from an adapter (config and tensors)."""
        torch.set_num_threads(self.threads)
        model = self.build(task, config, tensors)
        batches = eval_batches(self.tokenizer, self.data(task).test, max_seq_len=self.recipe.max_seq_len,
                               batch_size=self.full.eval_batch_size)
        return accuracy_of_model(model, batches)

    def adapter(self, task: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """The task's trained adapter ``(config, tensors)``."""
        return read_adapter(self.task_dir(task))

    def reference(self) -> dict[str, dict[str, float]]:
        """``{task: {"finetuned", "zero_shot", "test_examples", "train_seconds"}}`` for the adapters,
        cached on disk per test cap and batch size."""
        if not self.is_prepared():
            raise FlexMergeError("text8-peft adapters are not ready: call PeftSuite.prepare() first")
        ev_key = hashlib.sha256(json.dumps([self.full.max_test, self.full.eval_batch_size]).encode()).hexdigest()[:12]
        path = self.root / f"reference-{ev_key}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        changed = False
        for t in self.tasks:
            if t in cached:
                continue
            config, tensors = self.adapter(t)
            info = json.loads((self.task_dir(t) / "flexmerge_finetune.json").read_text())
            cached[t] = {"finetuned": self.accuracy(t, config, tensors),
                         "zero_shot": self.accuracy(t, config, zero_shot_adapter(tensors)),
                         "test_examples": len(self.data(t).test), "train_seconds": info["seconds"]}
            changed = True
            self.log(f"{t}: {self.recipe.peft} fine-tuned {cached[t]['finetuned']:.4f}, "
                     f"zero-shot {cached[t]['zero_shot']:.4f}")
        if changed:
            with tempfile.NamedTemporaryFile("w", dir=self.root, delete=False, suffix=".tmp") as fh:
                fh.write(json.dumps(cached, indent=1, sort_keys=True))
            os.replace(fh.name, path)
        return {t: cached[t] for t in self.tasks}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flexmerge.bench.peft_suite [--peft lora|ia3] [--tasks a,b] [--threads 1]``:
    train (or reuse) every adapter and print the reference accuracies."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m flexmerge.bench.peft_suite")
    p.add_argument("--peft", choices=("lora", "ia3"), default="lora")
    p.add_argument("--tasks", default=None)
    p.add_argument("--max-test", type=int, default=DEFAULT_MAX_TEST)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="train only")
    a = p.parse_args(argv)
    kw: dict = {"max_test": a.max_test, "threads": a.threads, "recipe": BENCH_RECIPES[a.peft]}
    if a.tasks:
        kw["tasks"] = [t.strip() for t in a.tasks.split(",") if t.strip()]
    try:
        suite = PeftSuite(**kw)
        suite.prepare()
        if a.no_reference:
            return 0
        ref = suite.reference()
    except FlexMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cache: {suite.root}")
    for t, r in ref.items():
        print(f"{t:<15}{r['finetuned']:>10.4f}{r['zero_shot']:>10.4f}{r['train_seconds']:>9.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
