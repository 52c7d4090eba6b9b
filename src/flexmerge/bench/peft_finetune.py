"""PEFT fine-tunes of the text8 encoder: one LoRA or (IA)3 adapter per task, cached like the full ones.

The recipe (:class:`PeftRecipe`) is the full fine-tuning recipe (:class:`~.finetune.FinetuneRecipe`:
same training data, seeds, steps, batches, warm-up and schedule) plus the adapter's settings. Each
task's model starts as the full recipe's does (:func:`~.finetune.build_model`, the same seeded
head), then PEFT's ``get_peft_model`` freezes the encoder and adds:

* ``lora``: LoRA (Hu et al. 2022) of rank ``r`` (default 8, ``lora_alpha`` 16, no dropout, no
  bias) on :data:`LORA_TARGETS`: the attention query, value and attention output projection
  (``encoder.layer.*.attention.self.query``, ``...self.value``, ``...attention.output.dense``),
  18 modules of [384, 384] in all-MiniLM-L6-v2;
* ``ia3``: (IA)3 (Liu et al. 2022) on PEFT's own targets for BERT, :data:`IA3_TARGETS`
  (``key``, ``value``, ``output.dense``; ``output.dense`` (both the attention output and the FFN
  output) scales its input, as PEFT's feed-forward rule for BERT says).

The task head (``bert.pooler`` + ``classifier``, :data:`~.finetune.HEAD_PATTERNS`) is trained as
PEFT's ``modules_to_save``, so it is saved inside the adapter directory (keys
``base_model.model.classifier.weight`` ...) and stays task-specific when adapters are merged
(:mod:`flexmerge.adapters.source`). The adapter parameters get ``adapter_lr``, the head ``head_lr``;
weight decay applies to LoRA factors and head matrices, never to (IA)3 vectors (they start at 1).

Cache layout (``$FLEXMERGE_CACHE`` or ``~/.cache/flexmerge``)::

    text8-peft/<first 16 hex digits of the PEFT recipe key>/
        recipe.json       the recipe and its full key
        <task>/           adapter_config.json, adapter_model.safetensors, flexmerge_finetune.json

Every adapter's ``base_model_name_or_path`` is the full suite's ``base/`` directory, the merge
config's base.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, ClassVar, Literal

from pydantic import ConfigDict, Field

from ..errors import FlexMergeError
from .datasets import TaskData
from .finetune import (FinetuneRecipe, build_model, load_tokenizer, resolve_backbone, task_seed, train_model,
                       write_atomically)

LORA_TARGETS: tuple[str, ...] = ("attention.self.query", "attention.self.value", "attention.output.dense")
"""LoRA's target modules (PEFT suffix match): 3 per layer."""

IA3_TARGETS: tuple[str, ...] = ("key", "value", "output.dense")
IA3_FEEDFORWARD: tuple[str, ...] = ("output.dense",)
"""PEFT's (IA)3 defaults for BERT (``TRANSFORMERS_MODELS_TO_IA3_*_MAPPING["bert"]``)."""

HEAD_MODULES: tuple[str, ...] = ("classifier", "pooler.dense")
"""The head as PEFT ``modules_to_save`` (:data:`~.finetune.HEAD_PATTERNS`); the pooler's linear
layer rather than the whole ``BertPooler`` (PEFT 0.21's (IA)3 ``merge_and_unload`` fails on a
wrapped module without a ``weight``)."""

BENCH_RECIPES: dict[str, dict] = {"lora": {"peft": "lora"}, "ia3": {"peft": "ia3", "adapter_lr": 3e-3}}
"""The text8-peft benchmark's recipes: LoRA at the default ``adapter_lr`` 1e-3, (IA)3 at 3e-3, the
learning rate of (IA)3 in Liu et al. 2022 (T-Few, Sec. 3.3)."""

INFO_FILE = "flexmerge_finetune.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", INFO_FILE)
PEFT_FORMAT_VERSION = 1


class PeftRecipe(FinetuneRecipe):
    """The full recipe plus the adapter: ``peft`` (``lora`` or ``ia3``), ``adapter_lr`` (the
    encoder's ``lr`` is unused: the encoder is frozen), ``lora_r`` and ``lora_alpha``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peft: Literal["lora", "ia3"] = "lora"
    adapter_lr: float = Field(1e-3, gt=0)
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)

    LABEL: ClassVar[str] = "PEFT fine-tuning recipe"

    def full_recipe(self) -> FinetuneRecipe:
        """The full fine-tuning recipe this one shares data, seeds and steps with."""
        return FinetuneRecipe(**{k: getattr(self, k) for k in FinetuneRecipe.model_fields})

    def key(self) -> str:
        """Hex digest of the whole recipe, the format and the backbone (as the full recipe's key)."""
        payload = {"peft_format": PEFT_FORMAT_VERSION, "full": self.full_recipe().key(),
                   "recipe": self.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def peft_config(self, base_dir: Path | str):
        """The PEFT config (LoRA or (IA)3) for a model loaded from ``base_dir``."""
        if self.peft == "lora":
            from peft import LoraConfig

            return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=0.0, bias="none",
                              target_modules=list(LORA_TARGETS), modules_to_save=list(HEAD_MODULES),
                              base_model_name_or_path=str(base_dir))
        from peft import IA3Config

        return IA3Config(target_modules=list(IA3_TARGETS), feedforward_modules=list(IA3_FEEDFORWARD),
                         modules_to_save=list(HEAD_MODULES), base_model_name_or_path=str(base_dir))


def is_adapter_complete(path: Path) -> bool:
    """An adapter directory fully written (they appear only by atomic rename)."""
    return all((path / f).is_file() for f in ADAPTER_FILES)


def _is_head(name: str) -> bool:
    return ".modules_to_save." in name


def param_groups(model, recipe: PeftRecipe) -> list[dict]:
    """AdamW groups of the trainable parameters: head (``modules_to_save``) at ``head_lr``, adapter
    at ``adapter_lr``; weight decay on LoRA factors and head matrices only."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = _is_head(name)
        decay = p.ndim >= 2 and "ia3_" not in name
        groups.setdefault((head, decay), []).append(p)
    return [{"params": ps, "lr": recipe.head_lr if head else recipe.adapter_lr,
             "weight_decay": recipe.weight_decay if decay else 0.0}
            for (head, decay), ps in groups.items()]


def peft_model(recipe: PeftRecipe, backbone: Path, base_dir: Path, data: TaskData):
    """The task's model before training: the full recipe's seeded start wrapped by PEFT."""
    from peft import get_peft_model

    model = build_model(backbone, data.label_names, seed=task_seed(recipe.seed, data.name))
    model.config._name_or_path = model.name_or_path = str(base_dir)  # PEFT records it as the base
    return get_peft_model(model, recipe.peft_config(base_dir))


def train_adapter(model, tokenizer, data: TaskData, recipe: PeftRecipe, *, threads: int = 1,
                  progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train ``model`` (a PEFT model) in place with the full recipe's batches, schedule and
    dropout seeds: :func:`~.finetune.train_model`'s loop on the trainable parameters only."""
    summary = train_model(model, tokenizer, data.train, recipe, task=data.name, progress=progress,
                          groups=param_groups(model, recipe), threads=threads)
    summary.pop("epochs_seen", None)
    summary["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return summary


def finetune_adapter(recipe: PeftRecipe, data: TaskData, base_dir: Path, out_dir: Path, *,
                     threads: int = 1, progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Train one task's adapter and write its directory atomically to ``out_dir``; a complete
    ``out_dir`` is reused as is (resumable)."""
    if is_adapter_complete(out_dir):
        return out_dir
    backbone = resolve_backbone(recipe.backbone)
    tokenizer = load_tokenizer(backbone)

    def write(tmp: Path):
        model = peft_model(recipe, backbone, base_dir, data)
        summary = train_adapter(model, tokenizer, data, recipe, threads=threads, progress=progress)
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "adapter_model.safetensors", 0o666 & ~umask)  # safetensors writes 0600
        info = {"task": data.name, "recipe": recipe.model_dump(mode="json"), "label_names": list(data.label_names),
                "base": str(base_dir), **summary}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        if not is_adapter_complete(tmp):
            raise FlexMergeError(f"PEFT wrote no adapter files to {tmp}; check the installed peft version")

    return write_atomically(out_dir, write)


__all__ = ["BENCH_RECIPES", "IA3_TARGETS", "LORA_TARGETS", "PeftRecipe", "finetune_adapter", "is_adapter_complete",
           "param_groups", "peft_model", "train_adapter"]
