"""Export one task of a bundle as a plain checkpoint of the same kind as its input.

An HF directory keeps that task's own ``config.json`` and tokenizer files (copied from the task's
source directory when it is still there) and gets ``model.safetensors``; a ``.safetensors`` input
gives a ``.safetensors`` file; a torch ``.pt``/``.bin`` input a torch state dict. Tied names are
written the way the source had them. Writing is atomic.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import FlexMergeError
from .io import atomic_path

_HF_EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "tokenizer.model", "added_tokens.json", "sentencepiece.bpe.model",
                   "preprocessor_config.json", "modules.json", "sentence_bert_config.json")


def _untie_for_safetensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def export_task(bundle, task: str, out: str | os.PathLike) -> Path:
    sd = bundle.state_dict(task)
    src = bundle.manifest["sources"]["tasks"][task]
    kind = src.get("kind", "safetensors")
    out = Path(out).expanduser()
    if kind == "hf_dir":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FlexMergeError(f"export target {out} exists and is not empty; choose a new directory")
        with atomic_path(out, is_dir=True) as tmp:
            source_dir = Path(src["path"]) if src.get("path") else None
            if source_dir is not None and source_dir.is_dir():
                for name in _HF_EXTRA_FILES:
                    if (source_dir / name).is_file():
                        shutil.copy2(source_dir / name, tmp / name)
            save_file(_untie_for_safetensors(sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return out
    if out.is_dir() or str(out).endswith(os.sep):
        suffix = ".safetensors" if kind in ("safetensors", "state_dict") else ".pt"
        out = out / f"{task}{suffix}"
    with atomic_path(out, is_dir=False) as tmp:
        if kind == "torch" and out.suffix != ".safetensors":
            torch.save(sd, tmp)
        else:
            save_file(_untie_for_safetensors(sd), str(tmp), metadata={"format": "pt"})
    return out
