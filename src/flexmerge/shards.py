"""Sharded safetensors weights as transformers writes them: the one owner of that output format.

An exported HF directory holds its weights as::

    model.safetensors                          one file, when the weights fit in one shard
    model-00001-of-0000n.safetensors ...       otherwise n shards of at most ``max_shard_size`` bytes
    model.safetensors.index.json               {"metadata": {"total_size": bytes, "producer": ...},
                                                "weight_map": {tensor name: shard file}}

which ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Shards are cut as
``save_pretrained`` cuts them: tensors in the given order, a new shard when the next tensor would
overflow the limit, a tensor larger than the limit in a shard of its own. Inside a shard tensors
are laid out by decreasing element size (as safetensors lays them out, so that every tensor's
offset is aligned for its dtype). Every header is planned from names, shapes and dtypes before any
data is written, and each tensor is written with ``pwrite`` at its planned offset as it arrives,
in any order: memory holds one tensor, never a shard or the model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .errors import FlexMergeError
from .io import _ST_DTYPES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers' save_pretrained
_SHARD_RX = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
_DTYPE_CODES = {v: k for k, v in _ST_DTYPES.items()}
_SIZE_RX = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

Entry = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype


def parse_shard_size(size: int | str) -> int:
    """``"500MB"``, ``"5GB"``, ``"2GiB"`` or plain bytes -> bytes (units as transformers reads
    them: KB/MB/GB are powers of ten, KiB/MiB/GiB powers of two)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE_RX.match(str(size))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise FlexMergeError(f"max shard size {str(size)[:40]!r} is not a size; give bytes, e.g. 500MB, "
                                 "5GB or 1000000")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise FlexMergeError(f"max shard size {size!r} must be more than 0 bytes; give e.g. 5GB")
    return value


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


def split_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """``save_pretrained``'s rule: fill a shard in order; a tensor that would overflow it starts
    the next; a tensor over the limit gets a shard of its own."""
    shards: list[list[Entry]] = []
    current: list[Entry] = []
    used = 0
    for e in entries:
        size = _nbytes(e[1], e[2])
        if size > max_bytes:
            shards.append([e])
            continue
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(e)
        used += size
    if current or not shards:
        shards.append(current)
    return shards


class _Layout:
    """One safetensors file planned ahead: its header bytes and every tensor's data offset."""

    def __init__(self, entries: list[Entry], metadata: dict[str, str]):
        order = sorted(entries, key=lambda e: -e[2].itemsize)  # stable: aligned offsets
        header: dict = {"__metadata__": dict(metadata)}
        self.where: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in order:
            if dtype not in _DTYPE_CODES:
                raise FlexMergeError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.where[name] = (offset, n, tuple(shape), dtype)
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.header = len(text).to_bytes(8, "little") + text
        self.data_bytes = offset


class ShardedWriter:
    """Writes the tensors ``entries`` names into ``folder`` as :data:`SINGLE_FILE` or as shards
    plus :data:`INDEX_FILE` (``single``: write one file at that path instead, whatever its size).
    Call :meth:`write` once per name in any order, then :meth:`close`; ``with`` closes the files
    either way (the caller's atomic temporary directory is what makes a failure leave nothing)."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_bytes: int | str,
                 metadata: dict[str, str], single: Path | None = None):
        names = [e[0] for e in entries]
        if len(set(names)) != len(names):
            raise FlexMergeError("a tensor name repeats in the weights to write")  # a bug, said plainly
        self.metadata = dict(metadata)
        shards = [entries] if single is not None else split_shards(entries, parse_shard_size(max_shard_bytes))
        if single is not None:
            self.files = [Path(single)]
        elif len(shards) == 1:
            self.files = [Path(folder) / SINGLE_FILE]
        else:
            self.files = [Path(folder) / shard_name(k + 1, len(shards)) for k in range(len(shards))]
        self.folder = Path(folder)
        self.layouts = [_Layout(s, self.metadata) for s in shards]
        self.file_of = {e[0]: k for k, s in enumerate(shards) for e in s}
        self.total_size = sum(lay.data_bytes for lay in self.layouts)
        self._fds: dict[int, int] = {}
        self._written: set[str] = set()

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            fd = os.open(self.files[k], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            self._fds[k] = fd
            lay = self.layouts[k]
            _pwrite_all(fd, lay.header, 0)
            os.ftruncate(fd, len(lay.header) + lay.data_bytes)
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``name``'s data at its planned place (shape and dtype must be as planned)."""
        k = self.file_of.get(name)
        if k is None or name in self._written:
            raise FlexMergeError(f"tensor '{name}' is not expected (or written twice) in {self.folder}")
        offset, n, shape, dtype = self.layouts[k].where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise FlexMergeError(f"tensor '{name}' is {list(tensor.shape)} {tensor.dtype}, planned as "
                                 f"{list(shape)} {dtype}; the weights changed while being written")
        fd = self._fd(k)
        if n:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(fd, memoryview(data), len(self.layouts[k].header) + offset)
        self._written.add(name)

    def close(self) -> list[Path]:
        """Check that every tensor was written, close the files, write the index (shards only)."""
        missing = [n for n in self.file_of if n not in self._written]
        if missing:
            raise FlexMergeError(f"tensor '{missing[0]}' was never written to {self.folder}")
        for k in range(len(self.files)):
            self._fd(k)  # a shard of empty tensors still gets its file
        self._close_fds()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size, **self.metadata},
                     "weight_map": {n: self.files[k].name for n, k in self.file_of.items()}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            return [*self.files, self.folder / INDEX_FILE]
        return list(self.files)

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._close_fds()


def write_hashed(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as one safetensors file at ``path``, front to back, and return its sha256,
    hashed from the bytes as they are written. ``safetensors.torch.save_file`` first copies every
    tensor into a bytes object and the file then had to be read again for its sha256: on a 131 MB
    block that was the block twice more in memory and one more read (bench/bench_llm.py)."""
    import hashlib

    layout = _Layout([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], metadata or {})
    order = sorted(layout.where, key=lambda n: layout.where[n][0])
    h = hashlib.sha256(layout.header)
    with open(path, "wb") as fh:
        fh.write(layout.header)
        for name in order:
            if not layout.where[name][1]:
                continue
            data = memoryview(tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            h.update(data)
            fh.write(data)
    return h.hexdigest()


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view[: 1 << 30], offset)
        view, offset = view[n:], offset + n


def weight_names(folder: Path, names: set[str]) -> set[str] | None:
    """The weight files among ``names`` (file names in ``folder``) if they form one complete
    sharded or single-file set, with an index naming exactly those shards; None otherwise."""
    shards = {n for n in names if _SHARD_RX.fullmatch(n)}
    if SINGLE_FILE in names:
        return None if shards or INDEX_FILE in names else {SINGLE_FILE}
    if not shards or INDEX_FILE not in names:
        return None
    totals = {_SHARD_RX.fullmatch(n).group(2) for n in shards}
    if len(totals) != 1 or len(shards) != int(next(iter(totals))):
        return None
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
        listed = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {*shards, INDEX_FILE} if listed == shards else None


def index_metadata(folder: Path) -> dict:
    """The ``metadata`` of ``folder``'s index json ({} if unreadable)."""
    try:
        meta = json.loads((folder / INDEX_FILE).read_text()).get("metadata")
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}
