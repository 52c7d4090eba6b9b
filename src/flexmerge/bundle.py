"""The deployable artifact: ``manifest.json`` + safetensors holding each stored tensor once.

Layout of a bundle directory::

    manifest.json                 format, tasks, blocks and their groups, method, sizes, checksums
    tensors/block-00007.safetensors   one file per block: per group either the members' originals
                                  (g<i>/m<pos>/<param>), merged weights (g<i>/merged/<param>), or a
                                  merged task vector + bit-packed masks + scalars (g<i>/delta/...,
                                  g<i>/mask<pos>/..., g<i>/scalars) and the pretrained block (base/...)
    tensors/task-<task>.safetensors   task-specific tensors (excluded heads, buffers)

Rebuilding task t: for each block, the group holding t gives its tensors; for masked groups
``theta_t = theta_0 + gamma_t * m_t ⊙ tau_merged`` (TALL masks, Wang et al. 2024; EMR, Huang et
al. 2024). Writing goes to a temporary directory renamed into place at the end (atomic).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FlexMergeError
from .io import atomic_path, file_sha256
from .materialize import StoredBlock, unpack_mask

BUNDLE_FORMAT = "flexmerge-bundle"
BUNDLE_VERSION = 1



def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


class BundleWriter:
    """Streams blocks into a temporary directory; :meth:`commit` renames it into place."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).expanduser()
        if self.out.exists() and (not self.out.is_dir() or (any(self.out.iterdir())
                                                            and not (self.out / "manifest.json").exists())):
            raise FlexMergeError(f"output {self.out} exists and is not a flexmerge bundle; choose a "
                                 "new or empty directory (an existing bundle is replaced)")
        self._ctx = atomic_path(self.out, is_dir=True)
        self.tmp = self._ctx.__enter__()
        (self.tmp / "tensors").mkdir()
        self.files: dict[str, str] = {}
        self._closed = False

    def write(self, rel: str, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        path = self.tmp / rel
        _save(tensors, path)
        self.files[rel] = file_sha256(path)

    def copy_file(self, src: Path, rel: str) -> None:
        shutil.copy2(src, self.tmp / rel)

    def commit(self, manifest: dict) -> Path:
        manifest = dict(manifest, files=self.files)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        self._closed = True
        self._ctx.__exit__(None, None, None)
        return self.out

    def abort(self, exc: BaseException | None = None) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._ctx.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("abort"), None)
            except BaseException:
                pass


@dataclass
class BlockEntry:
    name: str
    params: list[str]
    file: str | None
    store_base: bool
    groups: list[dict]  # {"tasks": [names], "kind": ...}


class Bundle:
    """A bundle on disk (memory-mapped) or in memory; rebuilds and exports any task."""

    def __init__(self, manifest: dict, root: Path | None = None,
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None):
        self.manifest = manifest
        self.root = root
        self._mem = tensors  # file -> {key: tensor} for in-memory bundles
        self._handles: dict[str, object] = {}
        self.tasks: list[str] = list(manifest["tasks"])
        self.blocks = [BlockEntry(b["name"], b["params"], b.get("file"), b["store_base"], b["groups"])
                       for b in manifest["blocks"]]
        self._where: dict[str, dict[str, tuple[int, int]]] = {}
        for bi, b in enumerate(self.blocks):
            for gi, g in enumerate(b.groups):
                for pos, t in enumerate(g["tasks"]):
                    self._where.setdefault(t, {})[b.name] = (gi, pos)

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = False) -> "Bundle":
        root = Path(path).expanduser()
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise FlexMergeError(f"{root} is not a flexmerge bundle (no manifest.json); make one with "
                                 "'flexmerge merge'")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise FlexMergeError(f"{mpath} is damaged ({exc.msg}); re-run 'flexmerge merge'") from None
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
            raise FlexMergeError(f"{root}: unsupported bundle format {manifest.get('format')!r} "
                                 f"v{manifest.get('version')}; re-run 'flexmerge merge'")
        for rel in manifest.get("files", {}):
            if not (root / rel).is_file():
                raise FlexMergeError(f"bundle {root} lacks file {rel}; the bundle is incomplete: re-run "
                                     "'flexmerge merge'")
        bundle = cls(manifest, root=root)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every tensor file against the sha256 in the manifest."""
        if self.root is None:
            return
        for rel, digest in self.manifest.get("files", {}).items():
            if file_sha256(self.root / rel) != digest:
                raise FlexMergeError(f"bundle file {self.root / rel} fails its checksum; the bundle is "
                                     "corrupted: re-run 'flexmerge merge'")

    def tensor(self, file: str, key: str) -> torch.Tensor:
        if self._mem is not None:
            return self._mem[file][key]
        h = self._handles.get(file)
        if h is None:
            try:
                h = self._handles[file] = safe_open(str(self.root / file), framework="pt", device="cpu")
            except Exception as exc:
                raise FlexMergeError(f"cannot read bundle file {self.root / file} ({exc}); the bundle is "
                                     "corrupted: re-run 'flexmerge merge'") from None
        return h.get_tensor(key)

    # ---- facts --------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return int(self.manifest["size"]["bytes"])

    @property
    def size_units(self) -> float:
        return float(self.manifest["size"]["units"])

    @property
    def method(self) -> dict:
        return self.manifest["method"]

    def group_of(self, task: str, block: str) -> tuple[int, int]:
        self._check_task(task)
        return self._where[task][block]

    def _check_task(self, task: str) -> None:
        if task not in self._where:
            raise FlexMergeError(f"unknown task '{task}'; this bundle has: {', '.join(self.tasks)}")

    # ---- rebuilding ---------------------------------------------------------------------
    def block_tensors(self, task: str, block: BlockEntry) -> dict[str, torch.Tensor]:
        """One task's tensors of one block."""
        gi, pos = self.group_of(task, block.name)
        kind = block.groups[gi]["kind"]
        out = {}
        for name in block.params:
            if kind == "original":
                out[name] = self.tensor(block.file, f"g{gi}/m{pos}/{name}")
            elif kind == "merged":
                out[name] = self.tensor(block.file, f"g{gi}/merged/{name}")
            else:
                out[name] = self.rebuild_masked(block, gi, pos, name)
        return out

    def rebuild_masked(self, block: BlockEntry, gi: int, pos: int, name: str,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta_0 + gamma * m ⊙ tau`` for member ``pos`` of masked group ``gi`` (into ``out``)."""
        base = self.tensor(block.file, f"base/{name}")
        delta = self.tensor(block.file, f"g{gi}/delta/{name}").to(torch.float32)
        key = f"g{gi}/mask{pos}/{name}"
        if self._has(block.file, key):
            delta = delta * unpack_mask(self.tensor(block.file, key), tuple(base.shape))
        skey = f"g{gi}/scalars"
        if self._has(block.file, skey):
            delta = delta * self.tensor(block.file, skey)[pos]
        result = (base.to(torch.float32) + delta).to(base.dtype)
        if out is not None:
            out.copy_(result)
            return out
        return result

    def _has(self, file: str, key: str) -> bool:
        if self._mem is not None:
            return key in self._mem[file]
        cache = self.__dict__.setdefault("_keycache", {})
        if file not in cache:
            if file not in self._handles:
                self._handles[file] = safe_open(str(self.root / file), framework="pt", device="cpu")
            cache[file] = set(self._handles[file].keys())
        return key in cache[file]

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The full state dict of ``task``, with its original key set (tied names re-expanded)."""
        self._check_task(task)
        out: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            out.update(self.block_tensors(task, block))
        spec = self.manifest["task_specific"].get(task, {})
        if spec.get("names"):
            for name in spec["names"]:
                out[name] = self.tensor(spec["file"], name)
        for alias, canonical in self.manifest.get("aliases", {}).items():
            if alias in self.manifest["task_keys"][task]:
                out[alias] = out[canonical]
        order = self.manifest["task_keys"][task]
        return {k: out[k] for k in order}

    def apply_task(self, model: torch.nn.Module, task: str, blocks: Iterable[str] | None = None) -> None:
        """Write ``task``'s weights into ``model``'s existing parameters and buffers, in place.

        FlexMerge Appendix C.9: with mask methods a deployment keeps one preallocated model and
        rebuilds ``theta_0 + gamma_t * m_t ⊙ tau`` into it when switching tasks, instead of
        storing N models. Only the blocks whose stored form differs between the current and the
        new task need rewriting; pass ``blocks`` to restrict the work.
        """
        self._check_task(task)
        params = model.state_dict(keep_vars=True)
        wanted = set(blocks) if blocks is not None else None
        names = [n for b in self.blocks for n in b.params]
        missing = [n for n in names if n not in params]
        if missing:
            raise FlexMergeError(f"model has no parameter '{missing[0]}' of the bundle"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                 + "; build the model of the fine-tuned checkpoints")
        with torch.no_grad():
            for block in self.blocks:
                if wanted is not None and block.name not in wanted:
                    continue
                gi, pos = self.group_of(task, block.name)
                kind = block.groups[gi]["kind"]
                for name in block.params:
                    target = params[name].data
                    if kind == "masked":
                        self.rebuild_masked(block, gi, pos, name, out=target)
                    else:
                        key = f"g{gi}/m{pos}/{name}" if kind == "original" else f"g{gi}/merged/{name}"
                        target.copy_(self.tensor(block.file, key))
            spec = self.manifest["task_specific"].get(task, {})
            for name in spec.get("names", []):
                if name in params and params[name].shape == self.tensor(spec["file"], name).shape:
                    params[name].data.copy_(self.tensor(spec["file"], name))
        model._flexmerge_task = task

    @contextlib.contextmanager
    def task_weights(self, model: torch.nn.Module, task: str, restore: str | None = None):
        """``with bundle.task_weights(model, "sst2"): ...`` runs with sst2's weights rebuilt in
        place, then rebuilds ``restore`` (default: the task the model held before, if it was set
        by this bundle) so that no copy of the weights is ever kept."""
        previous = restore if restore is not None else getattr(model, "_flexmerge_task", None)
        changed = None
        if previous is not None and previous in self._where:
            changed = [b.name for b in self.blocks if self._differs(previous, task, b)]
        self.apply_task(model, task, blocks=changed)
        try:
            yield model
        finally:
            if previous is not None:
                self.apply_task(model, previous, blocks=changed)

    def _differs(self, a: str, b: str, block: BlockEntry) -> bool:
        ga, pa = self._where[a][block.name]
        gb, pb = self._where[b][block.name]
        return ga != gb or block.groups[ga]["kind"] != "merged" and pa != pb

    def export(self, task: str, out: str | os.PathLike) -> Path:
        """Write one task as the same kind of checkpoint as its input, atomically."""
        from .export import export_task

        return export_task(self, task, out)

    def summary(self) -> dict:
        """Sizes and groups per block, for ``flexmerge inspect``."""
        m = self.manifest
        return {"tasks": self.tasks, "method": m["method"], "size": m["size"],
                "blocks": [{"name": b.name, "groups": [g["tasks"] for g in b.groups],
                            "kinds": [g["kind"] for g in b.groups], "store_base": b.store_base}
                           for b in self.blocks]}


def block_entry(sb: StoredBlock, rel: str | None, tasks: list[str], params: list[str] | None = None) -> dict:
    return {"name": sb.name, "params": params or [], "file": rel, "store_base": sb.store_base,
            "bytes": sb.nbytes,
            "groups": [{"tasks": [tasks[t] for t in g.tasks], "kind": g.kind} for g in sb.groups]}
