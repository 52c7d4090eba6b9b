"""Building an HF model skeleton from the ``config.json`` a bundle stores for each task."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.nn as nn

from ..bundle import Bundle
from ..errors import FlexMergeError


def _hf_config_dir(bundle: Bundle, task: str) -> Path | None:
    """The directory holding ``task``'s config.json and tokenizer: stored in the bundle itself
    (``assets/<task>``); only an in-memory bundle falls back to the task's source directory."""
    if bundle.root is not None:
        cdir = bundle.asset_dir(task)
        return cdir if cdir is not None and (cdir / "config.json").is_file() else None
    src = bundle.manifest.get("sources", {}).get("tasks", {}).get(task, {})
    if src.get("path"):
        p = Path(src["path"])
        p = p if p.is_dir() else p.parent
        if (p / "config.json").is_file():
            return p
    return None


def _hf_builder(bundle: Bundle) -> Callable[[str], nn.Module]:
    def build(task: str) -> nn.Module:
        cdir = _hf_config_dir(bundle, task)
        if cdir is None:
            raise FlexMergeError(f"task '{task}': the bundle stores no config.json for it (its input "
                                 "was not an HF model directory); pass model_factory=")
        try:
            import transformers
        except ImportError:  # pragma: no cover
            raise FlexMergeError("HF bundles need the 'transformers' package; install it or pass "
                                 "model_factory=") from None
        try:
            config = transformers.AutoConfig.from_pretrained(str(cdir), local_files_only=True)
        except Exception as exc:
            raise FlexMergeError(f"task '{task}': cannot read {cdir / 'config.json'} as a transformers "
                                 f"config ({str(exc).splitlines()[0]}); pass model_factory=") from None
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise FlexMergeError(f"task '{task}': {cdir / 'config.json'} names no known model class in "
                                 f"'architectures' ({archs}); pass model_factory=")
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return build


def _generation_config(bundle: Bundle, task: str):
    """``task``'s stored ``generation_config.json`` as a transformers ``GenerationConfig``, or None."""
    cdir = _hf_config_dir(bundle, task)
    if cdir is None or not (cdir / "generation_config.json").is_file():
        return None
    import transformers

    try:
        return transformers.GenerationConfig.from_pretrained(str(cdir), local_files_only=True)
    except Exception as exc:
        raise FlexMergeError(f"task '{task}': cannot read {cdir / 'generation_config.json'} "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); fix it or pass "
                             "generation_config=") from None
