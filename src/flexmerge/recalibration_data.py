"""Unlabeled recalibration batches read from a data directory (``--recalibrate-bn DIR``).

BatchNorm recalibration (:mod:`flexmerge.recalibrate`) needs a few unlabeled batches per task. A
user with code passes a callable; a user with files passes a directory laid out as::

    calib/
      preprocess.json      optional: {"size": [224, 224], "mean": [...], "std": [...],
                           "batch_size": 32, "max_examples": 512}
      <task>/              one folder per task of the bundle, holding either
        *.png, *.jpg ...   images: RGB, resized to ``size`` (bilinear, antialiased, no crop),
                           scaled to [0, 1], then (x - mean) / std per channel -> [3, H, W]
        *.safetensors      or tensors: each file one tensor ``[n, ...]`` (safetensors: one tensor,
        *.pt, *.npy        or several of equal first dimension, passed to the model as keyword
                           arguments, e.g. ``input_ids`` and ``attention_mask``)

Files are read in sorted name order; examples are cut into batches of ``batch_size`` (default 32)
and at most ``max_examples`` (default 512, the recalibration measured in ``bench/bench_statistics.py``
needs far fewer) are used. Images need ``size`` (the model's input resolution); ``mean`` and
``std`` default to no normalisation (0 and 1), since a directory cannot know how a model was
trained: give the values of your model's own preprocessing (e.g. ImageNet's
``[0.485, 0.456, 0.406]`` / ``[0.229, 0.224, 0.225]``). Use training or validation images, never
test ones. Everything is checked before any merge work: a missing task folder, an empty one, a
folder mixing images and tensors, an unreadable file or a bad ``preprocess.json`` is one line
naming the file and the fix. :func:`fingerprint` names the directory's contents for a sweep's
resume key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import FlexMergeError, first_validation_error

PREPROCESS_FILE = "preprocess.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".npy")


class Preprocess(BaseModel):
    """``preprocess.json``: how files become batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: Optional[tuple[int, int]] = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    batch_size: int = Field(32, ge=1)
    max_examples: int = Field(512, ge=1)

    def model_post_init(self, _ctx: Any) -> None:
        if self.size is not None and min(self.size) < 1:
            raise ValueError("'size' must be two positive integers [height, width]")
        if min(self.std) <= 0:
            raise ValueError("'std' must be positive")


def _load_preprocess(root: Path) -> Preprocess:
    path = root / PREPROCESS_FILE
    if not path.exists():
        return Preprocess()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlexMergeError(f"{path} is not readable JSON ({exc}); write it as in the docs, e.g. "
                             '{"size": [224, 224]}') from None
    try:
        return Preprocess.model_validate(data)
    except (ValidationError, ValueError) as exc:
        msg = first_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise FlexMergeError(f"{path}: {msg}; keys: size [h, w], mean [3], std [3], batch_size, "
                             "max_examples") from None


def _files(folder: Path) -> tuple[str, list[Path]]:
    """The folder's data files and their kind, ``"image"`` or ``"tensor"``."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    tensors = [p for p in files if p.suffix.lower() in TENSOR_SUFFIXES]
    if images and tensors:
        raise FlexMergeError(f"recalibration folder {folder} mixes images and tensor files; keep one kind per "
                             "task")
    if not images and not tensors:
        raise FlexMergeError(f"recalibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and "
                             f"no tensors ({', '.join(TENSOR_SUFFIXES)}); add the task's unlabeled examples")
    return ("image", images) if images else ("tensor", tensors)


def _image(path: Path, pre: Preprocess) -> torch.Tensor:
    """One image file -> ``[3, H, W]`` float32, resized and normalised as ``pre`` says."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            h, w = pre.size  # type: ignore[misc]
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise FlexMergeError(f"recalibration image {path} cannot be read ({exc}); remove or replace it") from None
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def _tensor_file(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """One tensor file -> a tensor ``[n, ...]`` or a dict of them (safetensors with several keys)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(path))
            value: Any = next(iter(d.values())) if len(d) == 1 else d
        elif suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many kinds
        text = str(exc).strip().splitlines()
        raise FlexMergeError(f"recalibration file {path} cannot be read ({text[0][:200] if text else type(exc).__name__}); "
                             "write one tensor [examples, ...] per file") from None
    tensors = value.values() if isinstance(value, dict) else [value]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
        raise FlexMergeError(f"recalibration file {path} does not hold tensors [examples, ...]; write one tensor "
                             "(or a safetensors file of tensors with the same first dimension)")
    if len({t.shape[0] for t in tensors}) != 1:
        raise FlexMergeError(f"recalibration file {path}: its tensors differ in their first (example) dimension; "
                             "give every tensor the same number of examples")
    return value


def _rows(value: torch.Tensor | dict[str, torch.Tensor]) -> int:
    return int(next(iter(value.values())).shape[0]) if isinstance(value, dict) else int(value.shape[0])


def _cut(value, start: int, stop: int):
    return {k: v[start:stop] for k, v in value.items()} if isinstance(value, dict) else value[start:stop]


class DirectoryBatches:
    """``batches(task)`` for :class:`~flexmerge.recalibrate.Recalibration` from a data directory
    (layout in the module doc). Construction checks the layout for ``tasks``; files are read when a
    task's batches are drawn."""

    def __init__(self, root: str | os.PathLike, tasks: list[str] | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FlexMergeError(f"recalibration data directory {self.root} not found; give a folder with one "
                                 "subfolder of unlabeled examples per task")
        self.pre = _load_preprocess(self.root)
        # how messages, manifests and curve tables name these batches (``module:qualname``)
        self.__qualname__ = f"DirectoryBatches({self.root})"
        self.kinds: dict[str, tuple[str, list[Path]]] = {}
        for t in tasks or []:
            self._kind(t)

    def _kind(self, task: str) -> tuple[str, list[Path]]:
        if task not in self.kinds:
            folder = self.root / task
            if not folder.is_dir():
                raise FlexMergeError(f"recalibration data directory {self.root} has no folder '{task}'; add "
                                     f"{folder}/ with task '{task}''s unlabeled examples")
            kind, files = _files(folder)
            if kind == "image" and self.pre.size is None:
                raise FlexMergeError(f"{folder} holds images but {self.root / PREPROCESS_FILE} gives no 'size'; "
                                     'write {"size": [height, width]} (the model\'s input resolution) there')
            self.kinds[task] = (kind, files)
        return self.kinds[task]

    def __call__(self, task: str) -> Iterator[Any]:
        kind, files = self._kind(task)
        size, left = self.pre.batch_size, self.pre.max_examples
        if kind == "image":
            files = files[:left]
            for i in range(0, len(files), size):
                yield torch.stack([_image(p, self.pre) for p in files[i:i + size]])
            return
        for path in files:
            if left <= 0:
                return
            value = _tensor_file(path)
            n = min(_rows(value), left)
            for i in range(0, n, size):
                yield _cut(value, i, min(i + size, n))
            left -= n

    def fingerprint(self) -> str:
        """A digest of the preprocessing and every data file's name, size and mtime (for resume keys)."""
        h = hashlib.sha256(self.pre.model_dump_json().encode())
        for p in sorted(self.root.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def is_data_directory(spec: str) -> bool:
    """Whether ``--recalibrate-bn``'s value names a directory (rather than ``module:function``)."""
    return Path(str(spec)).expanduser().is_dir()


def recalibration_batches(spec: str, tasks: list[str] | None = None):
    """``--recalibrate-bn``'s value -> ``batches(task)``: a data directory (checked for ``tasks``
    now), or ``module:function`` / ``file.py:function`` imported now."""
    if is_data_directory(spec):
        return DirectoryBatches(spec, tasks)
    from .evaluate.user_code import load_callable

    return load_callable(spec, "--recalibrate-bn batches (or a data directory)")
