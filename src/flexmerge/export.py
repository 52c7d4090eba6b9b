"""Export one task of a bundle as a plain checkpoint of the same kind as its input.

An HF directory gets that task's own ``config.json`` and tokenizer files (stored in the bundle,
so the sources may be gone) and ``model.safetensors``; a ``.safetensors`` input gives a
``.safetensors`` file; a torch ``.pt``/``.bin`` input a torch state dict. Tied names are written the
way the source had them. Writing is atomic, and an existing path is replaced only if it is an
earlier flexmerge export (its safetensors metadata says so) or ``force`` is given.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .bundle_format import ASSET_FILES
from .outputs import atomic_path

EXPORT_METADATA = {"format": "pt", "producer": "flexmerge-export"}
_EXPORT_WEIGHTS = "model.safetensors"


def _is_export_file(path: Path) -> bool:
    """A safetensors file whose metadata says flexmerge exported it."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("producer") == EXPORT_METADATA["producer"]
    except Exception:
        return False


def _is_export_dir(path: Path) -> bool:
    """A directory holding only what :func:`export_task` writes, with a flexmerge weights file."""
    try:
        names = {p.name for p in path.iterdir() if p.is_file() and not p.is_symlink()}
        if len(names) != len(list(path.iterdir())):
            return False
    except OSError:
        return False
    return _EXPORT_WEIGHTS in names and names <= {_EXPORT_WEIGHTS, *ASSET_FILES} \
        and _is_export_file(path / _EXPORT_WEIGHTS)


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


def export_task(bundle, task: str, out: str | os.PathLike, force: bool = False) -> Path:
    """Write ``task`` to ``out``; an ``out`` that is an existing directory or ends with a path
    separator receives ``<task>.safetensors`` (or ``.pt``) inside it, for file-kind inputs."""
    sd = bundle.state_dict(task)
    src = bundle.manifest["sources"]["tasks"][task]
    kind = src.get("kind", "safetensors")
    into_dir = str(out).endswith(("/", os.sep))
    out = Path(out).expanduser()
    if kind == "hf_dir":
        assets = {name: bundle.check_file(rel) for name, rel in (bundle.manifest.get("assets", {}).get(task) or {}).items()}
        with atomic_path(out, is_dir=True, what="export target", replaceable=_is_export_dir, force=force,
                         hint="choose a new directory") as tmp:
            for name, path in assets.items():  # names are plain file names (the manifest schema)
                shutil.copyfile(path, tmp / name)
            save_file(_untie_for_safetensors(sd), str(tmp / _EXPORT_WEIGHTS), metadata=EXPORT_METADATA)
        return out
    if into_dir or out.is_dir():
        suffix = ".safetensors" if kind in ("safetensors", "state_dict") else ".pt"
        out = out / f"{task}{suffix}"
    with atomic_path(out, is_dir=False, what="export target", replaceable=_is_export_file, force=force,
                     hint="choose a new file name") as tmp:
        if kind == "torch" and out.suffix != ".safetensors":
            torch.save(sd, tmp)
        else:
            save_file(_untie_for_safetensors(sd), str(tmp), metadata=EXPORT_METADATA)
    return out
