"""The deployable artifact: a bundle directory holding each stored tensor once.

The layout, tensor keys and manifest schema belong to :mod:`flexmerge.bundle_format`; this module
writes bundles (:class:`BundleWriter`) and reads them (:class:`Bundle`). Rebuilding task t: for each
block, the group holding t gives its tensors; for masked groups
``theta_t = theta_0 + gamma_t * m_t ⊙ tau_merged`` (TALL masks, Wang et al. 2024; EMR, Huang et
al. 2024). Writing goes to a temporary directory renamed into place at the end (atomic); an
existing directory is replaced only if it is a flexmerge bundle (or ``force``). Reading verifies
each file against its sha256 in the manifest before the first tensor is taken from it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from . import bundle_format as fmt
from .bundle_format import BUNDLE_FORMAT, BUNDLE_VERSION  # noqa: F401  (re-exported)
from .errors import FlexMergeError
from .io import file_sha256
from .outputs import atomic_path, write_error
from .shards import write_hashed
from .validate import all_finite
from .materialize import StoredBlock, unpack_mask



class BundleWriter:
    """Streams blocks into a temporary directory; :meth:`commit` renames it into place.

    ``out`` may be new, an empty directory or an earlier flexmerge bundle (every entry listed in
    its manifest); anything else is refused unless ``force``."""

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out = Path(out).expanduser()
        self._ctx = atomic_path(self.out, is_dir=True, what="output", replaceable=fmt.is_bundle_dir,
                                force=force, hint="choose a new or empty directory")
        self.tmp = self._ctx.__enter__()
        self._closed = False
        self.files: dict[str, str] = {}
        self._guard(lambda: (self.tmp / fmt.TENSOR_DIR).mkdir())

    def _guard(self, fn):
        try:
            return fn()
        except Exception as exc:
            err = write_error(exc, self.out)
            if err is None:
                raise
            self.abort(err)
            raise err from None

    def write(self, rel: str, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        path = self.tmp / rel
        self.files[rel] = self._guard(lambda: write_hashed(path, tensors))

    def copy_file(self, src: Path, rel: str) -> None:
        dest = self.tmp / rel

        def copy():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        self._guard(copy)
        self.files[rel] = file_sha256(dest)

    def commit(self, manifest: dict) -> Path:
        text = fmt.manifest_json(dict(manifest, files=self.files))
        self._guard(lambda: (self.tmp / fmt.MANIFEST_NAME).write_text(text))
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
        self._verified: set[str] = set()
        self._verify = True
        self.tasks: list[str] = list(manifest["tasks"])
        self.blocks = [BlockEntry(b["name"], b["params"], b.get("file"), b["store_base"], b["groups"])
                       for b in manifest["blocks"]]
        self._expected: dict | None = None  # (file, key) -> (shape, is_weight), built on first read
        self._where: dict[str, dict[str, tuple[int, int]]] = {}
        for bi, b in enumerate(self.blocks):
            for gi, g in enumerate(b.groups):
                for pos, t in enumerate(g["tasks"]):
                    self._where.setdefault(t, {})[b.name] = (gi, pos)

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Open a bundle directory. Its manifest is validated against the schema and every file
        it names must lie inside the directory. With ``verify`` (the default) each file is checked
        against its sha256 before the first tensor is read from it; ``verify=False`` skips that
        (for a bundle you have just checked, e.g. with :meth:`verify`)."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FlexMergeError(f"{root} is not a flexmerge bundle directory; give the directory that "
                                 "'flexmerge merge -o' wrote")
        manifest = fmt.read_manifest(root)
        for rel in manifest["files"]:
            if not fmt.resolve_inside(root, rel).is_file():
                raise FlexMergeError(f"bundle {root} lacks file {rel}; the bundle is incomplete: re-run "
                                     "'flexmerge merge'")
        bundle = cls(manifest, root=root)
        bundle._verify = bool(verify)
        return bundle

    def verify(self) -> None:
        """Check every file against the sha256 in the manifest, and every stored tensor against
        the manifest (shape, finite weights): all of them, now."""
        if self.root is None:
            return
        for rel in self.manifest.get("files", {}):
            self.check_file(rel, force=True)
        tensor_files = {b.file for b in self.blocks if b.file} | \
            {s["file"] for s in self.manifest["task_specific"].values() if s["names"]}
        for rel in sorted(tensor_files):
            for key in self._handle(rel).keys():
                self.tensor(rel, key)
            self._handles.pop(rel, None)  # unmap: a reader that keeps the bundle maps it again
            self.__dict__.get("_keycache", {}).pop(rel, None)

    def check_file(self, rel: str, force: bool = False) -> Path:
        """The path of bundle file ``rel``, verified against its sha256 once (if verifying)."""
        path = fmt.resolve_inside(self.root, rel)
        digest = self.manifest["files"].get(rel)
        if digest is None:
            raise FlexMergeError(f"bundle {self.root}: file {rel} is not listed in its manifest; the "
                                 "bundle is damaged: re-run 'flexmerge merge'")
        if (force or getattr(self, "_verify", True)) and rel not in self._verified:
            try:
                actual = file_sha256(path)
            except OSError as exc:
                raise FlexMergeError(f"cannot read bundle file {path} ({exc.strerror}); check its "
                                     "permissions or re-run 'flexmerge merge'") from None
            if actual != digest:
                raise FlexMergeError(f"bundle file {path} fails its checksum; the bundle is corrupted: "
                                     "re-run 'flexmerge merge'")
            self._verified.add(rel)
        return path

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            path = self.check_file(file)
            try:
                h = self._handles[file] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:
                raise FlexMergeError(f"cannot read bundle file {path} ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                                     "the bundle is corrupted: re-run 'flexmerge merge'") from None
        return h

    def tensor(self, file: str, key: str) -> torch.Tensor:
        if self._mem is not None:
            return self._mem[file][key]
        h = self._handle(file)
        try:
            t = h.get_tensor(key)
        except Exception:
            raise FlexMergeError(f"bundle file {self.root / file} has no tensor '{key}' (or it cannot be "
                                 "read); the bundle is damaged: re-run 'flexmerge merge'") from None
        return self.checked(file, key, t)

    def checked(self, file: str, key: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` if it is what the manifest says ``file`` stores under ``key``: the recorded shape,
        and finite values for weights. A checksum proves that the files match the manifest; this
        proves that what is handed out matches the model the manifest describes."""
        if self._expected is None:
            self._expected = fmt.stored_shapes(self.manifest)
        where = self.root / file if self.root is not None else file
        expected = self._expected.get((file, key))
        if expected is None:
            raise FlexMergeError(f"bundle file {where}: tensor '{key}' is not described by the manifest; the "
                                 "bundle is damaged: re-run 'flexmerge merge'")
        shape, is_weight = expected
        if tuple(t.shape) != shape:
            raise FlexMergeError(f"bundle file {where}: tensor '{key}' has shape {list(t.shape)}, the manifest "
                                 f"says {list(shape)}; the bundle is damaged: re-run 'flexmerge merge'")
        if is_weight and t.is_floating_point() and not all_finite(t):
            raise FlexMergeError(f"bundle file {where}: tensor '{key}' holds NaN or Inf; the bundle is damaged: "
                                 "re-run 'flexmerge merge'")
        return t

    def asset_dir(self, task: str) -> Path | None:
        """The directory of ``task``'s stored non-tensor files (config, tokenizer), verified; None if
        the task has none (its input was not an HF directory)."""
        self._check_task(task)
        entries = self.manifest.get("assets", {}).get(task) or {}
        if self.root is None or not entries:
            return None
        paths = [self.check_file(rel) for rel in entries.values()]
        folder = paths[0].parent
        unlisted = sorted(p.name for p in folder.iterdir() if p.name not in entries)
        if unlisted:  # transformers reads every file it knows in the folder: only verified ones
            raise FlexMergeError(f"bundle {self.root}: {folder.relative_to(self.root)} holds {unlisted[0]}, which "
                                 "its manifest does not list; remove it or re-run 'flexmerge merge'")
        return folder

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
                out[name] = self.tensor(block.file, fmt.original_key(gi, pos, name))
            elif kind == "merged":
                out[name] = self.tensor(block.file, fmt.merged_key(gi, name))
            else:
                out[name] = self.rebuild_masked(block, gi, pos, name)
        return out

    def rebuild_masked(self, block: BlockEntry, gi: int, pos: int, name: str,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta_0 + gamma * m ⊙ tau`` for member ``pos`` of masked group ``gi`` (into ``out``)."""
        base = self.tensor(block.file, fmt.base_key(name))
        delta = self.tensor(block.file, fmt.delta_key(gi, name)).to(torch.float32)
        key = fmt.mask_key(gi, pos, name)
        if self._has(block.file, key):
            delta = delta * unpack_mask(self.tensor(block.file, key), tuple(base.shape))
        skey = fmt.scalars_key(gi)
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
            cache[file] = set(self._handle(file).keys())
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

    # ---- one tensor at a time (exports that never hold the whole model) ---------------------
    def _locate(self, task: str, name: str) -> tuple[str, str | None, BlockEntry | None, int, int]:
        """Where tensor ``name`` of ``task`` is stored: (kind, file, block, group, member)."""
        self._check_task(task)
        canonical = self.manifest.get("aliases", {}).get(name, name)
        if name not in self.manifest["task_keys"][task]:
            raise FlexMergeError(f"task '{task}' has no tensor '{name}' in this bundle")
        where = self.__dict__.get("_param_block")
        if where is None:
            where = self._param_block = {p: b for b in self.blocks for p in b.params}
        block = where.get(canonical)
        if block is None:
            return "specific", self.manifest["task_specific"][task]["file"], None, 0, 0
        gi, pos = self.group_of(task, block.name)
        return block.groups[gi]["kind"], block.file, block, gi, pos

    def task_tensor(self, task: str, name: str) -> torch.Tensor:
        """Tensor ``name`` of ``task`` alone (tied names give their canonical tensor), rebuilt from
        the one group holding it: an export streams a task with this, one tensor at a time."""
        kind, file, block, gi, pos = self._locate(task, name)
        canonical = self.manifest.get("aliases", {}).get(name, name)
        if kind == "specific":
            return self.tensor(file, canonical)
        if kind == "masked":
            return self.rebuild_masked(block, gi, pos, canonical)
        key = fmt.original_key(gi, pos, canonical) if kind == "original" else fmt.merged_key(gi, canonical)
        return self.tensor(file, key)

    def release_files(self) -> None:
        """Unmap every bundle file opened so far (reads map them again on demand, without
        re-verifying): a mapped file's touched pages count in the process's resident memory, so a
        reader that streams the whole bundle calls this to keep it at about one tensor."""
        self._handles.clear()
        self.__dict__.get("_keycache", {}).clear()

    def task_tensor_specs(self, task: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(name, shape, dtype)`` of every tensor of ``task``, in its original key order, read from
        the manifest and the files' headers only (no tensor data)."""
        from .io import _ST_DTYPES

        out = []
        for name in self.manifest["task_keys"][task]:
            kind, file, block, gi, pos = self._locate(task, name)
            canonical = self.manifest.get("aliases", {}).get(name, name)
            if kind == "specific":
                key = canonical
            elif kind == "masked":
                key = fmt.base_key(canonical)
            else:
                key = fmt.original_key(gi, pos, canonical) if kind == "original" else fmt.merged_key(gi, canonical)
            if self._mem is not None:
                t = self._mem[file][key]
                out.append((name, tuple(t.shape), t.dtype))
                continue
            handle = self._handle(file)  # verified against its checksum first
            try:
                sl = handle.get_slice(key)
                shape, dtype = tuple(int(d) for d in sl.get_shape()), _ST_DTYPES[sl.get_dtype()]
            except Exception:
                raise FlexMergeError(f"bundle file {self.root / file} has no tensor '{key}' (or it cannot be "
                                     "read); the bundle is damaged: re-run 'flexmerge merge'") from None
            out.append((name, shape, dtype))
        return out

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
                        key = fmt.original_key(gi, pos, name) if kind == "original" else fmt.merged_key(gi, name)
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

    def export(self, task: str, out: str | os.PathLike, force: bool = False,
               max_shard_size: int | str = "5GB") -> Path:
        """Write one task as the same kind of checkpoint as its input, atomically, one tensor at a
        time (HF directories: shards of at most ``max_shard_size``, e.g. ``"500MB"``)."""
        from .export import export_task

        return export_task(self, task, out, force=force, max_shard_size=max_shard_size)

    def summary(self) -> dict:
        """Sizes and groups per block, for ``flexmerge inspect``."""
        m = self.manifest
        return {"tasks": self.tasks, "method": m["method"], "size": m["size"], "notes": m.get("notes", []),
                "recalibration": m["plan"].get("recalibration"),
                "blocks": [{"name": b.name, "groups": [g["tasks"] for g in b.groups],
                            "kinds": [g["kind"] for g in b.groups], "store_base": b.store_base}
                           for b in self.blocks]}


def block_entry(sb: StoredBlock, rel: str | None, tasks: list[str], params: list[str] | None = None,
                shapes: dict[str, list[int]] | None = None) -> dict:
    return {"name": sb.name, "params": params or [], "shapes": shapes or {}, "file": rel,
            "store_base": sb.store_base, "bytes": sb.nbytes,
            "groups": [{"tasks": [tasks[t] for t in g.tasks], "kind": g.kind} for g in sb.groups]}
