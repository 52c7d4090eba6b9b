"""Open base + task checkpoints and check everything that can be checked before heavy work.

Checked from headers only (no tensor data read): at least two tasks, the same mergeable names in
base and every task, equal shapes, equal floating dtypes. Names matching ``exclude`` are
task-specific (never merged, may differ in shape). Non-floating tensors (integer buffers such as
``position_ids``) are kept per task like excluded ones. Tied weights (names sharing one storage in
the base, e.g. an LM head tied to the embeddings) are merged once under the first name.
Finiteness needs the values, so :meth:`ModelSet.stream` checks it on the one streaming pass,
before anything is written.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .blocks import BlockMap, build_block_map
from .config import MergeConfig, make_config
from .errors import FlexMergeError
from .io import CheckpointSource, SafetensorsSource, TensorInfo, open_checkpoint


STREAM_CHUNK = 1 << 21
"""Elements per chunk when streaming large tensors (8 MiB of float32 per task; two chunks are in
memory at once, the one in use and the one being read)."""


def _ranges(numel: int, chunk: int | None) -> list[tuple[int, int]]:
    if not chunk or numel <= chunk:
        return [(0, numel)]
    return [(a, min(numel, a + chunk)) for a in range(0, numel, chunk)]


_STAGING = threading.local()


def _staging(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer of ``dtype`` with at least ``numel`` elements, reused by the calling thread
    (the stream's reader thread), grown only when a larger tensor comes."""
    bufs = _STAGING.__dict__.setdefault("buffers", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


_CACHE_PIECE = 1 << 17


def _widen_minus(out: torch.Tensor, stored: torch.Tensor | None, base: torch.Tensor) -> None:
    """``out = stored - base`` (``out -= base`` when ``stored`` is None) in float32, one
    cache-sized piece at a time so that the widened values are subtracted while still in cache
    (9.3 ms against 11.9 ms for 8 x 2M bf16 elements as two whole-tensor ops, on one core)."""
    for a in range(0, out.numel(), _CACHE_PIECE):
        piece = out[a:a + _CACHE_PIECE]
        if stored is not None:
            piece.copy_(stored[a:a + _CACHE_PIECE])
        piece.sub_(base[a:a + _CACHE_PIECE])


@dataclass
class ModelSet:
    """The validated inputs: sources, mergeable tensors, blocks, task-specific tensors."""

    config: MergeConfig
    base: CheckpointSource
    tasks: dict[str, CheckpointSource]
    mergeable: dict[str, TensorInfo]
    blockmap: BlockMap
    task_specific: dict[str, list[str]]  # task -> names kept per task (excluded + buffers)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> canonical name
    closed: bool = field(default=False, init=False, repr=False)  # set by close()

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_specific_bytes(self) -> dict[str, int]:
        return {t: sum(self.tasks[t].info(n).nbytes for n in names)
                for t, names in self.task_specific.items()}

    # ------------------------------------------------------------------------------------
    def stream(self, names: Sequence[str] | None = None, chunk_elems: int | None = None,
               reuse_buffers: bool = False, check_finite: bool = True, prefetch: int = 1,
               readers: int = 1) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """One pass: ``(name, base float32, taus float32 [N, *shape])`` for each mergeable tensor.

        Holds one tensor of the base and of each task at a time (docs/architecture.md, "Invariants").
        With ``chunk_elems``, tensors larger than that come as several flat element ranges
        (``taus`` of shape ``[N, k]``), so memory is bounded by N x chunk. Non-finite values are
        an error naming the task and the tensor; a caller that checks them itself (the Gram pass
        sees any NaN/Inf on its diagonal) passes ``check_finite=False`` and calls
        :meth:`name_non_finite` when it finds one.

        ``prefetch``: how many items the reader thread reads ahead of the caller; ``readers``
        (at most ``prefetch``) threads read them, each into its own item's buffer.
        ``reuse_buffers``: the ``taus`` tensors live in ``prefetch + 1`` preallocated buffers used
        in turn, so the pass does not fault in fresh pages for every chunk (at N = 30 that was a
        quarter of the read time). Only for callers that are done with a ``taus`` when they ask
        for the next.
        """
        items = [(name, start, stop)
                 for name in (names if names is not None else self.blockmap_order())
                 for start, stop in _ranges(self.mergeable[name].numel, chunk_elems)]
        depth = max(1, prefetch)
        buffers: list[torch.Tensor | None] = [None] * (depth + 1)
        if reuse_buffers and items:
            longest = max(stop - start for _, start, stop in items)
            buffers = [torch.empty(self.num_tasks * longest, dtype=torch.float32)
                       for _ in range(depth + 1)]

        def load(k: int):
            # item k lives in buffer k mod (depth + 1): while the caller holds item k, the reader
            # fills items k+1 .. k+depth, never k's buffer
            return self._load(*items[k], out=buffers[k % (depth + 1)], check_finite=check_finite)

        if len(items) <= 1:
            for k in range(len(items)):
                yield load(k)
            return
        # Read ahead (pread and torch release the GIL) while the caller works on the current
        # item, so the pass costs about max(I/O, compute) rather than their sum.
        with ThreadPoolExecutor(max_workers=max(1, min(readers, depth)), thread_name_prefix="flexmerge-read") as pool:
            pending = deque(pool.submit(load, k) for k in range(min(depth, len(items))))
            for k in range(depth, len(items) + depth):
                current = pending.popleft().result()
                if k < len(items):
                    pending.append(pool.submit(load, k))
                yield current
                del current

    def _load(self, name: str, start: int, stop: int, out: torch.Tensor | None = None,
              check_finite: bool = True) -> tuple[str, torch.Tensor, torch.Tensor]:
        numel = self.mergeable[name].numel
        whole = start == 0 and stop == numel
        shape = tuple(self.mergeable[name].shape) if whole else (stop - start,)
        if out is None:
            taus = torch.empty((self.num_tasks, *shape), dtype=torch.float32)
        else:
            taus = out[:self.num_tasks * (stop - start)].view(self.num_tasks, *shape)
        if whole:
            base32 = self.base.get(name).to(torch.float32)
        else:
            base32 = self.base.get_range(name, start, stop).to(torch.float32)
        for i, src in enumerate(self.tasks.values()):
            stored = src.info(name).dtype
            # A half-precision task is read as stored into a reused buffer and widened by copy_:
            # reading into a fresh tensor per call faulted in new pages every time (the bf16
            # Gram pass of bench/bench_llm.py took 3.4x the read time with it).
            into = taus[i] if stored == torch.float32 else _staging(stored, stop - start).view(shape)
            if whole:
                src.get_into(name, into)
            else:
                src.get_range_into(name, start, stop, into)
            _widen_minus(taus[i].view(-1), into.view(-1) if into is not taus[i] else None, base32.view(-1))
        # One reduction instead of an isfinite pass per tensor: any NaN/Inf in the base or a task
        # makes the sum non-finite; only then find and name the culprit.
        if check_finite and not bool(torch.isfinite(taus.sum())):
            self.name_non_finite(name)
        return name, base32, taus

    def name_non_finite(self, name: str) -> None:
        """Raise the error naming the checkpoint whose tensor ``name`` holds NaN/Inf."""
        _check_finite(self.base.get(name), "base", name)
        for task, src in self.tasks.items():
            _check_finite(src.get(name), f"task '{task}'", name)
        # finite weights whose float32 sum overflowed: nothing wrong with the input

    def blockmap_order(self) -> list[str]:
        return [p for b in self.blockmap.blocks for p in b.params]

    def task_vector_stream(self, chunk_elems: int | None = None, reuse_buffers: bool = False):
        """A :data:`~flexmerge.methods.base.TaskVectorStream` for methods' global passes
        (large tensors as flat chunks when ``chunk_elems`` is given). Its ``base(name)`` gives a
        pretrained tensor in float32, for methods whose pass needs it (``larv``).
        ``reuse_buffers`` (see :meth:`stream`): only for a pass that keeps no task vector once it
        asks for the next."""
        def start():
            for name, _base, taus in self.stream(chunk_elems=chunk_elems, reuse_buffers=reuse_buffers,
                                                 prefetch=2 if reuse_buffers else 1):
                yield name, taus
        start.base = lambda name: self.base.get(name).to(torch.float32)
        return start

    def close(self) -> None:
        """Close every checkpoint source (their open files); ``with open_models(cfg) as models:``
        closes on leaving the block."""
        self.closed = True
        self.base.close()
        for s in self.tasks.values():
            s.close()

    def __enter__(self) -> "ModelSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: ``max |x|`` over 1M-element pieces is finite exactly
    then (the maximum propagates NaN). No whole-tensor temporary; 113 ms for 64M bf16 entries,
    against 400 ms for ``isfinite(t).all()`` and 178 ms for a float32 sum, on one core."""
    flat = t.reshape(-1)
    for a in range(0, flat.numel(), 1 << 20):
        if not bool(torch.isfinite(flat[a:a + (1 << 20)].abs().max())):
            return False
    return True


def _check_finite(t: torch.Tensor, who: str, name: str) -> None:
    if t.is_floating_point() and not all_finite(t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise FlexMergeError(f"{who}: tensor '{name}' contains {bad} values; fix or re-export that "
                             "checkpoint (merging needs finite weights)")


def open_models(cfg: MergeConfig | dict) -> ModelSet:
    """Open and validate every checkpoint of ``cfg`` (headers only)."""
    cfg = make_config(cfg)
    base = open_checkpoint(cfg.base, label="base")
    tasks = {t: open_checkpoint(p, label=f"task '{t}'") for t, p in cfg.tasks.items()}
    excl = [re.compile(p) for p in cfg.exclude]

    def excluded(name: str) -> bool:
        return any(rx.search(name) for rx in excl)

    aliases: dict[str, str] = {}
    for group in base.tied_groups():
        for alias in group[1:]:
            aliases[alias] = group[0]

    mergeable: dict[str, TensorInfo] = {}
    buffers: set[str] = set()
    for name in base.names():
        if excluded(name) or name in aliases:
            continue
        info = base.info(name)
        if not info.dtype.is_floating_point:
            buffers.add(name)
            continue
        mergeable[name] = info
    if not mergeable:
        raise FlexMergeError(f"base {base.describe()}: no mergeable floating-point tensors "
                             f"(exclude patterns {cfg.exclude} may match everything)")

    task_specific: dict[str, list[str]] = {}
    for task, src in tasks.items():
        names = set(src.names())
        missing = [n for n in mergeable if n not in names]
        if missing:
            raise FlexMergeError(
                f"task '{task}' ({src.describe()}) lacks tensor '{missing[0]}' of the base"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; give the checkpoint fine-tuned from this base, or add a matching 'exclude' regex")
        extra = [n for n in src.names() if n not in mergeable and n not in aliases
                 and n not in buffers and not excluded(n)]
        if extra:
            raise FlexMergeError(
                f"task '{task}' has tensor '{extra[0]}' that the base lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; if it is task-specific (a head), add a regex for it to 'exclude'")
        for name, binfo in mergeable.items():
            tinfo = src.info(name)
            if tinfo.shape != binfo.shape and len(tinfo.shape) == len(binfo.shape) == 2 \
                    and tinfo.shape[1:] == binfo.shape[1:]:
                raise FlexMergeError(
                    f"task '{task}': tensor '{name}' has {tinfo.shape[0]} rows but the base has "
                    f"{binfo.shape[0]} (was its vocabulary extended?); resize it back to {binfo.shape[0]} rows "
                    "(e.g. model.resize_token_embeddings), or keep the tensor task-specific (not merged) "
                    f"with exclude: ['{re.escape(name)}']")
            if tinfo.shape != binfo.shape:
                raise FlexMergeError(
                    f"task '{task}': tensor '{name}' has shape {list(tinfo.shape)} but the base has "
                    f"{list(binfo.shape)}; if it is task-specific, add it to 'exclude'")
            if tinfo.dtype != binfo.dtype:
                raise FlexMergeError(
                    f"task '{task}': tensor '{name}' is {str(tinfo.dtype).removeprefix('torch.')} but the base "
                    f"is {str(binfo.dtype).removeprefix('torch.')} ({src.file_of(name)} vs {base.file_of(name)}); "
                    "convert the checkpoints to one dtype "
                    f"(e.g. model.to(torch.{str(binfo.dtype).removeprefix('torch.')}).save_pretrained(...))")
        own = [n for n in src.names() if n not in mergeable and n not in aliases]
        task_specific[task] = own
    blockmap = build_block_map(mergeable, cfg.blocks,
                               excluded=sorted({n for v in task_specific.values() for n in v}),
                               key_order=not isinstance(base, SafetensorsSource))  # safetensors sort keys
    return ModelSet(cfg, base, tasks, mergeable, blockmap, task_specific, aliases)
