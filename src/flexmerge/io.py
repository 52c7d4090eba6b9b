"""Reading checkpoints lazily (one tensor, or one range of elements, at a time).

Supported inputs: HF model directories (``config.json`` + ``model.safetensors``,
sharded ``*.safetensors`` with ``model.safetensors.index.json``, or ``pytorch_model.bin``), single
``.safetensors`` files, and torch ``.pt``/``.bin`` state dicts. Safetensors are memory-mapped and
read one tensor at a time; torch pickles are loaded with ``mmap=True`` so that only touched
tensors are paged in. In-memory state dicts are wrapped by :class:`StateDictSource` (tests, the
benchmark).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch

from .errors import FlexMergeError

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


class TensorInfo:
    __slots__ = ("shape", "dtype")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointSource:
    """A read-only, lazy view of one checkpoint: names, shapes, dtypes, and one tensor at a time."""

    kind: str = "state_dict"  # "hf_dir" | "safetensors" | "torch" | "state_dict"
    path: Path | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``name`` into the preallocated ``out`` (converting the dtype if needed)."""
        out.copy_(self.get(name))
        return out

    def get_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``name`` (a 1-D tensor)."""
        return self.get(name).reshape(-1)[start:stop]

    def get_range_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        out.copy_(self.get_range(name, start, stop))
        return out

    def tied_groups(self) -> list[list[str]]:
        """Names that are one tensor in this checkpoint (shared storage); the first-appearing name
        is the canonical one (HF keeps the embedding and drops the tied head)."""
        return []

    def files(self) -> list[Path]:
        return []

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (its shard, for sharded checkpoints), for messages."""
        return self.describe()

    def fingerprint(self) -> str:
        """Cheap identity (paths, sizes, mtimes) for caching plans; not a checksum."""
        parts = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.files()]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def sha256(self) -> str:
        """sha256 over the weight files (in name order); the manifest records it."""
        h = hashlib.sha256()
        for p in sorted(self.files()):
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()

    def describe(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory state dict>"

    def close(self) -> None:
        pass


class StateDictSource(CheckpointSource):
    """An in-memory ``{name: tensor}`` mapping."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "<state dict>"):
        self._sd = dict(state_dict)
        self._label = label
        for name, t in self._sd.items():
            if not isinstance(t, torch.Tensor):
                raise FlexMergeError(f"{label}: entry '{name}' is a {type(t).__name__}, not a tensor")

    def names(self) -> list[str]:
        return list(self._sd)

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        return TensorInfo(t.shape, t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def tied_groups(self) -> list[list[str]]:
        return _shared_storage_groups(self._sd)

    def describe(self) -> str:
        return self._label

    def fingerprint(self) -> str:
        return f"mem-{id(self._sd):x}"

    def sha256(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._sd):
            h.update(name.encode())
            h.update(self._sd[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if self._sd[name].numel() else b"")
        return h.hexdigest()


class _SafetensorsFile:
    """One safetensors file: the JSON header parsed once, tensors read with ``pread``.

    The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets}}`` and the raw data. Reading each tensor with one ``pread`` into a fresh buffer
    (instead of keeping the file memory-mapped) means only the tensors in use are resident: a
    memory map of N checkpoints would count every touched page in the process's RSS until unmapped.
    """

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and not path.is_file():
            raise FlexMergeError(f"{path} is not a regular file (a pipe or device); give a checkpoint file")
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FlexMergeError(f"checkpoint file not found: {path}; check the path") from None
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            if len(head) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(os.pread(self.fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self.data_start = 8 + n
            self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
            for name, e in header.items():
                begin, stop = (int(x) for x in e["data_offsets"])
                info = TensorInfo(tuple(e["shape"]), _st_dtype(e["dtype"], name, path))
                if stop - begin != info.nbytes or self.data_start + stop > size:
                    raise ValueError(f"tensor '{name}' has {stop - begin} bytes for shape {e['shape']} "
                                     f"{e['dtype']} or lies past the end of the file")
                self.entries[name] = (info, self.data_start + begin, stop - begin)
        except FlexMergeError:
            os.close(self.fd)
            raise
        except Exception as exc:
            os.close(self.fd)
            raise FlexMergeError(f"cannot read {path} as safetensors ({_first_line(exc)}); the file is "
                                 "corrupted or not a safetensors file: re-create it") from None

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info, offset, nbytes = self.entries[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        if nbytes:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = os.preadv(self.fd, [view], offset)
            if got != nbytes:
                raise FlexMergeError(f"{self.path}: tensor '{name}' is truncated ({got} of {nbytes} "
                                     "bytes); the file is corrupted: re-create it")
        return out

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        info, offset, _ = self.entries[name]
        item = info.dtype.itemsize
        if out is None:
            out = torch.empty(stop - start, dtype=info.dtype)
        view = memoryview(out.view(torch.uint8).numpy())
        want = (stop - start) * item
        if want and os.preadv(self.fd, [view], offset + start * item) != want:
            raise FlexMergeError(f"{self.path}: tensor '{name}' is truncated; the file is corrupted: re-create it")
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class SafetensorsSource(CheckpointSource):
    """One or more safetensors files (shards); each tensor is read on demand, one at a time."""

    def __init__(self, files: list[Path], path: Path, kind: str):
        self.path = path
        self.kind = kind
        self._files = files
        self._where: dict[str, _SafetensorsFile] = {}
        for f in files:
            handle = _SafetensorsFile(f)
            for name in handle.entries:
                if name in self._where:
                    raise FlexMergeError(f"{f}: tensor '{name}' also appears in {self._where[name].path}; "
                                         "remove the duplicate shard")
                self._where[name] = handle

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def file_of(self, name: str) -> str:
        return str(self._where[name].path) if name in self._where else self.describe()

    def get_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._where[name].read_range(name, start, stop)

    def get_range_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        if out.dtype == self.info(name).dtype and out.is_contiguous():
            return self._where[name].read_range(name, start, stop, out)
        out.copy_(self.get_range(name, start, stop))
        return out

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self.info(name)
        if out.dtype == info.dtype and out.is_contiguous() and tuple(out.shape) == info.shape:
            return self._where[name].read(name, out)
        out.copy_(self._where[name].read(name))
        return out

    def files(self) -> list[Path]:
        return list(self._files)

    def close(self) -> None:
        for h in set(self._where.values()):
            h.close()


class TorchSource(CheckpointSource):
    """A torch pickle state dict (``.pt``/``.bin``), loaded ``weights_only`` and memory-mapped."""

    def __init__(self, file: Path, path: Path, kind: str):
        self.path = path
        self.kind = kind
        self._file = file
        try:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # old (non-zip) format cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(file, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FlexMergeError(f"checkpoint file not found: {file}; check the path") from None
        except Exception as exc:
            if "weights only" in str(exc).lower() or "weights_only" in str(exc):
                raise FlexMergeError(f"{file} holds Python objects other than tensors (refused: loading them "
                                     "could run code); save model.state_dict() with torch.save, or use "
                                     ".safetensors") from None
            raise FlexMergeError(f"cannot load {file} as a torch state dict ({_first_line(exc)}); "
                                 "the file is corrupted or not a state dict: re-save it with "
                                 "torch.save(model.state_dict(), path)") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FlexMergeError(f"{file} does not hold a state dict of tensors; save "
                                 "model.state_dict() rather than the model object")
        self._sd = obj

    def names(self) -> list[str]:
        return list(self._sd)

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        return TensorInfo(t.shape, t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def tied_groups(self) -> list[list[str]]:
        return _shared_storage_groups(self._sd)

    def files(self) -> list[Path]:
        return [self._file]


def open_checkpoint(path: str | os.PathLike | Mapping[str, torch.Tensor] | CheckpointSource,
                    label: str = "checkpoint") -> CheckpointSource:
    """Open ``path`` (an HF dir, a ``.safetensors`` file, a ``.pt``/``.bin`` file) or wrap a dict."""
    if isinstance(path, CheckpointSource):
        return path
    if isinstance(path, Mapping):
        return StateDictSource(path, label=f"{label} (state dict)")
    p = Path(path).expanduser()
    if not p.exists():
        raise FlexMergeError(f"{label}: path not found: {p}; give an HF model directory, a "
                             ".safetensors file or a .pt/.bin state dict")
    if p.is_dir():
        return _open_hf_dir(p, label)
    if not p.is_file():
        raise FlexMergeError(f"{label}: {p} is not a regular file (a pipe or device); give a checkpoint file "
                             "or directory")
    if p.suffix == ".safetensors":
        return SafetensorsSource([p], p, "safetensors")
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return TorchSource(p, p, "torch")
    raise FlexMergeError(f"{label}: unsupported checkpoint file {p.name}; use a .safetensors, "
                         ".pt or .bin file, or an HF model directory")


def _open_hf_dir(p: Path, label: str) -> CheckpointSource:
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except Exception:
            raise FlexMergeError(f"{index} is not a valid safetensors index (needs 'weight_map'); "
                                 "re-save the model") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f and "/" not in f
                                                       and f not in (".", "..") for f in weight_map.values()):
            raise FlexMergeError(f"{index} maps tensors to something other than shard file names in {p}; "
                                 "re-save the model")
        shards = sorted({p / f for f in weight_map.values()})
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise FlexMergeError(f"{label}: shard(s) {', '.join(missing)} listed in {index.name} are "
                                 f"missing from {p}; copy them there")
        source = SafetensorsSource(shards, p, "hf_dir")
        for name, f in weight_map.items():  # the index and the shards' own headers must agree
            held = source._where.get(name)
            if held is None or held.path.name != f:
                source.close()
                raise FlexMergeError(f"{label}: {index.name} says shard {f} holds tensor '{name}', but "
                                     + (f"{held.path.name} does" if held else "no shard does")
                                     + f"; the index does not match the shards in {p}: re-save the model "
                                     "or restore the original files")
        extra = [n for n in source.names() if n not in weight_map]
        if extra:
            source.close()
            raise FlexMergeError(f"{label}: shard {source._where[extra[0]].path.name} holds tensor '{extra[0]}', "
                                 f"which {index.name} does not list; the index does not match the shards in {p}: "
                                 "re-save the model or restore the original files")
        return source
    if (p / "model.safetensors").exists():
        return SafetensorsSource([p / "model.safetensors"], p, "hf_dir")
    loose = sorted(p.glob("*.safetensors"))
    if loose:
        return SafetensorsSource(loose, p, "hf_dir")
    if (p / "pytorch_model.bin").exists():
        return TorchSource(p / "pytorch_model.bin", p, "hf_dir")
    raise FlexMergeError(f"{label}: no weights in {p}: expected model.safetensors, sharded "
                         "*.safetensors with model.safetensors.index.json, or pytorch_model.bin")


def _shared_storage_groups(sd: Mapping[str, torch.Tensor]) -> list[list[str]]:
    by_ptr: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        by_ptr.setdefault(key, []).append(name)
    return [v for v in by_ptr.values() if len(v) > 1]  # first-appearing name first


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


def _st_dtype(code: str, name: str, file: Path) -> torch.dtype:
    try:
        return _ST_DTYPES[code]
    except KeyError:
        raise FlexMergeError(f"{file}: tensor '{name}' has unsupported dtype {code}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
