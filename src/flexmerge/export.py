"""Export one task of a bundle as a plain checkpoint of the same kind as its input.

An HF directory gets that task's own ``config.json`` and tokenizer files (stored in the bundle,
so the sources may be gone) and its weights as ``model.safetensors``, or as shards plus
``model.safetensors.index.json`` when they exceed ``max_shard_size`` (:mod:`flexmerge.shards`);
a ``.safetensors`` input gives a ``.safetensors`` file; both are written one tensor at a time,
each rebuilt alone (:meth:`~flexmerge.bundle.Bundle.task_tensor`), so memory holds one tensor,
never the model. A torch ``.pt``/``.bin`` input gives a torch state dict. Tied names are written
the way the source had them. Writing is atomic, and an existing path is replaced only if it is an
earlier flexmerge export (its safetensors metadata says so) or ``force`` is given.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .bundle_format import ASSET_FILES
from .outputs import atomic_path
from .shards import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, index_metadata, parse_shard_size, weight_names

EXPORT_METADATA = {"format": "pt", "producer": "flexmerge-export"}


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
    """A directory holding only what an HF export writes: asset files and one complete set of
    weights (single file, or shards and their index), every weights file marked as flexmerge's."""
    try:
        entries = list(path.iterdir())
        names = {p.name for p in entries if p.is_file() and not p.is_symlink()}
        if len(names) != len(entries):
            return False
    except OSError:
        return False
    weights = weight_names(path, names)
    if weights is None or not names - weights <= set(ASSET_FILES):
        return False
    if any(n.endswith(".json") for n in weights) and \
            index_metadata(path).get("producer") != EXPORT_METADATA["producer"]:
        return False
    return all(_is_export_file(path / n) for n in weights if n.endswith(".safetensors"))


def write_hf_dir(tmp: Path, specs, tensors, assets: dict[str, Path], max_shard_size: int | str) -> None:
    """Fill the temporary directory ``tmp``: copies of ``assets`` (file name -> path) and the
    weights ``specs`` names (``(name, shape, dtype)``), taken from the iterable of ``(name,
    tensor)`` pairs ``tensors`` one at a time."""
    for name, path in assets.items():  # names are plain file names (the manifest schema)
        shutil.copyfile(path, tmp / name)
    with ShardedWriter(tmp, specs, max_shard_size, EXPORT_METADATA) as writer:
        for name, t in tensors:
            writer.write(name, t)
        writer.close()


def _stream(bundle, task: str):
    """``(name, tensor)`` of ``task``, one at a time, the bundle's files unmapped after each."""
    for name in bundle.manifest["task_keys"][task]:
        t = bundle.task_tensor(task, name)
        bundle.release_files()
        yield name, t


def export_task(bundle, task: str, out: str | os.PathLike, force: bool = False,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``task`` to ``out``; an ``out`` that is an existing directory or ends with a path
    separator receives ``<task>.safetensors`` (or ``.pt``) inside it, for file-kind inputs.
    ``max_shard_size`` (bytes or e.g. ``"500MB"``): for HF-directory inputs."""
    bundle._check_task(task)
    if bundle.manifest.get("adapter"):  # an adapter bundle exports PEFT adapter directories
        from .adapters.export import export_adapter

        return export_adapter(bundle, task, out, force=force)
    src = bundle.manifest["sources"]["tasks"][task]
    kind = src.get("kind", "safetensors")
    into_dir = str(out).endswith(("/", os.sep))
    out = Path(out).expanduser()
    stream = _stream(bundle, task)
    if kind == "hf_dir":
        parse_shard_size(max_shard_size)  # a bad size fails before anything is written
        assets = {name: bundle.check_file(rel) for name, rel in (bundle.manifest.get("assets", {}).get(task) or {}).items()}
        specs = bundle.task_tensor_specs(task)
        with atomic_path(out, is_dir=True, what="export target", replaceable=_is_export_dir, force=force,
                         hint="choose a new directory") as tmp:
            write_hf_dir(tmp, specs, stream, assets, max_shard_size)
        return out
    if into_dir or out.is_dir():
        suffix = ".safetensors" if kind in ("safetensors", "state_dict") else ".pt"
        out = out / f"{task}{suffix}"
    with atomic_path(out, is_dir=False, what="export target", replaceable=_is_export_file, force=force,
                     hint="choose a new file name") as tmp:
        if kind == "torch" and out.suffix != ".safetensors":
            torch.save(bundle.state_dict(task), tmp)
        else:
            with ShardedWriter(tmp.parent, bundle.task_tensor_specs(task), 1, EXPORT_METADATA, single=tmp) as w:
                for name, t in stream:
                    w.write(name, t)
                w.close()
    return out
