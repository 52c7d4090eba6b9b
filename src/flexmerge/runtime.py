"""Serve every task of a bundle at once: shared tensors, mixed batches, rows routed by task.

    from flexmerge import MultiTaskModel
    mt = MultiTaskModel.from_bundle("out/")                          # HF bundles: class from config.json
    mt = MultiTaskModel.from_bundle("out/", model_factory=make_model) # any torch module
    outputs = mt({"sst2": sst2_inputs, "trec": trec_inputs})          # dict task -> outputs

How it works (issue "runtime"; FlexMerge, Dhasade et al., ICLR 2026, Sec. 5 / Table 3: task models
that share tensors cost no inference speed):

* **Loading.** Every stored tensor of the bundle is loaded once: the safetensors files are
  memory-mapped (private, copy-on-write) and each tensor is a view into the mapping, so resident
  memory is the bundle's stored bytes (plus what the mask policy keeps). A task's weight for a
  parameter is the stored tensor of the group holding the task in that parameter's block, so tasks
  of one group hold *the same* tensor object (same ``data_ptr``): no per-task copies.
* **Routing at module level.** The model skeleton is built with its parameters on the ``meta``
  device (no memory). Every module with parameters is replaced by a routed version holding one
  parameter set per *variant* (the distinct tensor sets its tasks use: one per plain group, one per
  member of an ``original`` or ``masked`` group, one per task for task-specific modules).
  Standard modules (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``,
  ``nn.RMSNorm``, ``nn.Conv1d/2d/3d`` and HF's ``Conv1D`` of GPT-2) apply their functional op per
  contiguous run of rows; any other module with parameters of its own (e.g. an RMSNorm class of a
  model family, a ``cls_token`` holder, ``nn.MultiheadAttention``) is run through
  :func:`torch.func.functional_call` once per run, its children seeing only that run's rows.
  So the design holds for any architecture built from these modules, not one model family.
* **Mixed batches.** The tasks' inputs are concatenated along the batch dimension in a fixed task
  order chosen at load time to keep each module's groups contiguous (greedy ordering over the
  modules' group signatures, weighted by parameter bytes). A module whose tasks in the batch all
  share one variant runs **one** op over the whole batch (size 1.0 costs what one merged model
  costs on the concatenated batch); otherwise one op per contiguous run of rows, written into one
  preallocated output for ``Linear``/``Conv1D`` (size N costs what N models cost on their own rows).
  The runs of a ``Linear``/``Conv1D`` are independent products, so they are shared out over the
  intra-op threads, one thread each, the rows cut evenly (inter-op parallelism, like N models
  served side by side) instead of running N products one after another on all threads: this
  avoids one OpenMP fork/join per run and the smaller-product inefficiency of the BLAS (measured
  on 2 shared cores, 8 runs of ``[2048, 384] x [384, 1536]``: 0.40 s one after another on 2
  threads, 0.35 s shared out, 0.34 s for one merged product of all rows). Memory-bound work (mask
  rebuilds, per-run affine parts of norms, concatenations) runs on one thread (:func:`_serial`).
  A ``LayerNorm``/``RMSNorm`` normalises all rows in one op and applies each run's affine part in
  place.
* **Task-specific modules** (the ``exclude``\\ d heads) may differ in shape per task: each task's
  rows use that task's own (unpadded) weights; their outputs are written into a zero-padded
  tensor of the widest task, and :class:`MultiTaskModel` slices every output tensor that *is*
  such a padded output back to the task's own width. A task-specific ``Linear`` whose input is
  wider than its weight (a second head layer after a padded first one) reads only its own columns.
* **Mask methods** (``consensus``/TALL, ``emr``: groups of kind ``masked``, rebuilt as
  ``theta_0 + (gamma_t m_t) ⊙ tau``, equal to :meth:`flexmerge.bundle.Bundle.rebuild_masked`'s
  ``theta_0 + gamma_t (m_t ⊙ tau)`` bit for bit since ``m_t`` is 0 or 1):
  ``rebuild_policy="on_the_fly"`` rebuilds a task's masked weights at every request into
  preallocated buffers, reused by every module (FlexMerge Appendix C.9); for an ``Embedding`` the
  rebuild is done only for the looked-up rows. ``rebuild_policy="cache"`` keeps rebuilt tensors
  per task in an LRU cache of at most ``cache_budget_bytes`` (``None``: no limit, i.e. up to one
  full model per task for the masked blocks); a tensor larger than the budget is rebuilt into the
  buffers as on the fly. Trade-off: ``on_the_fly`` keeps memory at the stored bytes plus one
  buffer per tensor shape and worker thread, and pays the rebuild (a table look-up per mask byte,
  one multiply and one add per element, on one thread) at every request; ``cache`` pays it once
  per task and tensor, then runs at the speed of plain size-N serving, holding up to N x the
  masked blocks. Measured (``bench/bench_runtime.py``, MiniLM, 8 tasks, size 2.25 where every
  task is rebuilt, 2 shared cores): rebuilding every masked tensor of the 8 tasks takes
  0.23-0.28 s; a request of 8 x 32 rows x 64 tokens (~8 s) runs at the same speed under both
  policies (within noise); a request of 8 x 1 row runs 0.75-0.84 s on the fly vs 0.62-0.66 s
  cached; memory kept beyond the 208 MB stored: 10.6 MB of buffers on the fly vs 722 MB cached.
  So ``on_the_fly`` suits large batches or tight memory, ``cache`` (with a budget) small,
  latency-bound requests.

Limits (documented, checked where possible): inference only (forward runs under
``torch.inference_mode`` in eval mode); the batch dimension of every routed module's input is the
first one (or a flattened batch x tokens first dimension, or, failing both, the first other
dimension of that size); a weight used outside its own module's ``forward`` (e.g. an output layer
computed from ``self.embeddings.weight`` directly) sees the first variant only; HF ``labels``
(losses) are not routed: compute losses from the returned per-task logits. Calls of one instance are
serialised by a lock. Thread settings: ``torch.set_num_threads`` acts on the calling thread's
OpenMP and MKL settings and on torch's process-wide default for threads started later; the
runtime's worker threads set one thread each for themselves, and the caller's setting (and the
default) is restored after every call.

Differences from other projects: mergekit, FusionBench and PEFT export or serve one merged model
per task (PEFT's mixed-adapter batches route LoRA adapters, not full weights); here shared blocks
are stored and run once for all tasks of a group.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import mmap
import os
import struct
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bundle import Bundle
from .errors import FlexMergeError

__all__ = ["MultiTaskModel"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


# ------------------------------------------------------------------------------------- storage
class _MappedFile:
    """One safetensors file, memory-mapped once; tensors are views into the mapping (zero-copy)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) \
                    if os.path.getsize(path) > 0 else None
        except (OSError, ValueError, struct.error) as exc:
            raise FlexMergeError(f"cannot read bundle file {path} ({exc}); the bundle is corrupted: "
                                 "re-run 'flexmerge merge'") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def tensor(self, key: str) -> torch.Tensor:
        info = self.header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise FlexMergeError(f"{self.path}: tensor '{key}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self.data_start + begin
        if offset % dtype.itemsize:  # misaligned (never for files written by safetensors): copy
            raw = bytearray(self._mm[offset:self.data_start + end])
            return torch.frombuffer(raw, dtype=dtype).reshape(shape)
        return torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=offset).reshape(shape)


class _Store:
    """Every stored tensor of a bundle, each created once and shared by all who ask for it."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self._files: dict[str, _MappedFile] = {}
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}

    def _file(self, rel: str) -> _MappedFile:
        f = self._files.get(rel)
        if f is None:
            f = self._files[rel] = _MappedFile(self.bundle.root / rel)
        return f

    def has(self, rel: str, key: str) -> bool:
        if self.bundle.root is None:
            try:
                self.bundle.tensor(rel, key)
                return True
            except KeyError:
                return False
        return key in self._file(rel).header

    def shape(self, rel: str, key: str) -> tuple[int, ...]:
        if self.bundle.root is None:
            return tuple(self.bundle.tensor(rel, key).shape)
        return self._file(rel).shape(key)

    def get(self, rel: str, key: str) -> torch.Tensor:
        t = self._tensors.get((rel, key))
        if t is None:
            t = self.bundle.tensor(rel, key) if self.bundle.root is None else self._file(rel).tensor(key)
            self._tensors[(rel, key)] = t
        return t

    def loaded_bytes(self) -> int:
        seen, total = set(), 0
        for t in self._tensors.values():
            ptr = t.data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.numel() * t.element_size()
        return total

    def file_bytes(self) -> int:
        m = self.bundle.manifest
        if self.bundle.root is not None:
            return sum((self.bundle.root / rel).stat().st_size for rel in m.get("files", {}))
        return sum(t.numel() * t.element_size()
                   for f in {b.file for b in self.bundle.blocks if b.file} |
                   {s["file"] for s in m.get("task_specific", {}).values() if s.get("names")}
                   for t in self.bundle._mem.get(f, {}).values())


# ------------------------------------------------------------------------------------- sources
class _Stored:
    """A stored tensor used as is (original, merged, task-specific)."""

    __slots__ = ("tensor", "uid")

    def __init__(self, tensor: torch.Tensor, uid):
        self.tensor, self.uid = tensor, uid

    @property
    def shape(self):
        return tuple(self.tensor.shape)

    @property
    def dtype(self):
        return self.tensor.dtype


class _Masked:
    """``theta_0 + gamma * m ⊙ tau`` of one member of a masked group (TALL / EMR storage)."""

    __slots__ = ("base", "delta", "packed", "scalar", "uid", "_lut")

    def __init__(self, base, delta, packed, scalar, uid):
        self.base, self.delta, self.packed, self.scalar, self.uid = base, delta, packed, scalar, uid
        self._lut = None

    @property
    def shape(self):
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def nbytes(self) -> int:
        return self.base.numel() * self.base.element_size()

    def _factor(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        """``gamma * m`` as float32 for ``n`` elements, by one table look-up per mask byte (a byte
        -> its 8 bits as 0/1 floats, times gamma: exact, since gamma * 1 = gamma)."""
        if self._lut is None:
            self._lut = _BIT_TABLE if self.scalar is None else _BIT_TABLE * self.scalar.to(torch.float32)
        return self._lut.index_select(0, packed.reshape(-1).to(torch.int64)).view(-1)[:n]

    def rebuild(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta_0 + (gamma * m) ⊙ tau``: equal to :meth:`Bundle.rebuild_masked`, which computes
        ``theta_0 + gamma * (m ⊙ tau)`` (the same products, since m is 0 or 1)."""
        f32 = self.base.dtype == torch.float32 and out is not None
        buf = out if f32 else torch.empty(self.base.shape, dtype=torch.float32)
        delta = self.delta if self.delta.dtype == torch.float32 else self.delta.to(torch.float32)
        if self.packed is not None:
            torch.mul(delta, self._factor(self.packed, self.base.numel()).view(self.base.shape), out=buf)
        elif self.scalar is not None:
            torch.mul(delta, self.scalar, out=buf)
        else:
            buf.copy_(delta)
        buf.add_(self.base if self.base.dtype == torch.float32 else self.base.to(torch.float32))
        if f32:
            return buf
        if out is not None:
            out.copy_(buf)
            return out
        return buf.to(self.base.dtype)

    def rebuild_rows(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Rows ``idx`` of the rebuilt 2-d weight (an Embedding lookup), or None if not row-aligned."""
        rows, dim = self.base.shape
        if dim % 8:
            return None
        flat = idx.reshape(-1)
        delta = self.delta.index_select(0, flat)
        if delta.dtype != torch.float32:
            delta = delta.to(torch.float32)
        if self.packed is not None:
            packed = self.packed.view(rows, dim // 8).index_select(0, flat)
            delta.mul_(self._factor(packed, flat.numel() * dim).view(-1, dim))
        elif self.scalar is not None:
            delta.mul_(self.scalar)
        base = self.base.index_select(0, flat)
        out = delta.add_(base) if base.dtype == torch.float32 else (base.to(torch.float32) + delta)
        return out.to(self.base.dtype).view(*idx.shape, dim)


_BIT_TABLE = torch.tensor([[(b >> (7 - i)) & 1 for i in range(8)] for b in range(256)], dtype=torch.float32)
"""Byte -> its 8 bits (numpy ``packbits`` order, most significant first) as floats."""


@contextlib.contextmanager
def _serial():
    """Run memory-bound element-wise work (mask rebuilds, per-run affine parts, concatenations)
    on one intra-op thread: a second thread buys little bandwidth, while every extra OpenMP
    parallel region costs a scheduler time slice when the cores are shared (measured: 8 rebuilds
    of a 1536x384 tensor took 250 ms on 2 threads of a loaded 2-core machine, 8-18 ms on one)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------- router
class _Router:
    """The current batch layout (task index, rows) and what routed modules need per forward."""

    def __init__(self, num_tasks: int, policy: str, budget: int | None):
        self.num_tasks = num_tasks
        self.policy = policy
        self.budget = budget
        self.mappings: list[tuple[int, ...]] = []
        self._mapping_ids: dict[tuple[int, ...], int] = {}
        self.stack: list[tuple[tuple[int, int], ...]] = []
        self._runs: dict[tuple, list[tuple[int, int, int]]] = {}
        self.padded: list[tuple[torch.Tensor, list[int]]] = []
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes = 0
        self.scratch: dict[tuple, torch.Tensor] = {}
        self.rebuilds = 0
        self._lock = threading.RLock()  # cache, scratch and counters (runs may execute concurrently)
        self._local = threading.local()  # .worker: 0 in the caller's thread, 1.. in pool threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    # ---- concurrent runs ---------------------------------------------------------------
    def split_runs(self, runs: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]] | None:
        """Runs shared out over the intra-op threads, one thread each (inter-op parallelism):
        thread ``w`` takes rows ``[w T/k, (w+1) T/k)`` cut at the runs' bounds, so the shares are
        even whatever the run sizes. None (one thread, or a single run): run the ops one after
        another, each on all threads."""
        k = torch.get_num_threads()
        if k <= 1 or len(runs) < 2:
            return None
        total = runs[-1][2] - runs[0][1]
        k = min(k, total)
        cuts = [runs[0][1] + (total * w) // k for w in range(k + 1)]
        shares = []
        for w in range(k):
            lo, hi = cuts[w], cuts[w + 1]
            shares.append([(g, max(s, lo), min(e, hi)) for g, s, e in runs if s < hi and e > lo])
        return [sh for sh in shares if sh]

    def run_concurrently(self, plan: list[list], job: Callable) -> None:
        """``job(item)`` for every item of ``plan[w]`` on worker ``w`` (the caller is worker 0)."""
        k = len(plan)
        n = torch.get_num_threads()  # this thread's setting (OpenMP ICV), restored below
        if self._pool is None or self._pool_size < k:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            counter = iter(range(1, k + 1))
            local = self._local

            def init():
                # one intra-op thread in each worker: sets this thread's OpenMP ICV and MKL local
                # threads, but also torch's process-wide default (restored by the caller below)
                torch.set_num_threads(1)
                local.worker = next(counter)

            self._pool = ThreadPoolExecutor(k, initializer=init, thread_name_prefix="flexmerge-run")
            self._pool_size = k
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work(items):
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for item in items:
                    job(item)

        futures = [self._pool.submit(work, ids) for ids in plan[1:]]
        try:
            with _serial():  # the caller's thread takes the first share, on one thread too
                work(plan[0])
            for f in futures:
                f.result()
        finally:
            torch.set_num_threads(n)  # the process-wide default a new worker's start may have changed

    def mapping_id(self, mapping: tuple[int, ...]) -> int:
        mid = self._mapping_ids.get(mapping)
        if mid is None:
            mid = self._mapping_ids[mapping] = len(self.mappings)
            self.mappings.append(mapping)
        return mid

    @property
    def layout(self) -> tuple[tuple[int, int], ...]:
        return self.stack[-1]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.stack[-1])

    def runs(self, mid: int) -> list[tuple[int, int, int]]:
        """Contiguous runs ``(variant, first row, end row)`` of the current layout for a module."""
        layout = self.stack[-1]
        key = (layout, mid)
        runs = self._runs.get(key)
        if runs is None:
            mapping, runs, row = self.mappings[mid], [], 0
            for t, n in layout:
                if n == 0:
                    continue
                g = mapping[t]
                if runs and runs[-1][0] == g:
                    runs[-1] = (g, runs[-1][1], row + n)
                else:
                    runs.append((g, row, row + n))
                row += n
            self._runs[key] = runs
        return runs

    def sub_layout(self, start: int, end: int) -> tuple[tuple[int, int], ...]:
        out, row = [], 0
        for t, n in self.stack[-1]:
            if row >= start and row + n <= end and n:
                out.append((t, n))
            row += n
        return tuple(out)

    # ---- masked weights ----------------------------------------------------------------
    def weight(self, src, slot: tuple) -> torch.Tensor:
        if isinstance(src, _Stored):
            return src.tensor
        with self._lock if self.policy == "cache" else contextlib.nullcontext():
            return self._masked(src, slot)

    def _masked(self, src, slot: tuple) -> torch.Tensor:
        if self.policy == "cache":
            hit = self.cache.get(src.uid)
            if hit is not None:
                self.cache.move_to_end(src.uid)
                return hit
            nbytes = src.nbytes
            if self.budget is None or nbytes <= self.budget:
                while self.budget is not None and self.cache and self.cache_bytes + nbytes > self.budget:
                    _, old = self.cache.popitem(last=False)
                    self.cache_bytes -= old.numel() * old.element_size()
                self.rebuilds += 1
                with _serial():
                    t = src.rebuild()
                self.cache[src.uid] = t
                self.cache_bytes += nbytes
                return t
        key = (src.shape, src.dtype, getattr(self._local, "worker", 0)) + slot
        with self._lock:
            buf = self.scratch.get(key)
            if buf is None:
                buf = self.scratch[key] = torch.empty(src.shape, dtype=src.dtype)
            self.rebuilds += 1
        with _serial():
            return src.rebuild(out=buf)

    def clear_cache(self) -> None:
        self.cache.clear()
        self.cache_bytes = 0


def _rows(x: torch.Tensor, total: int) -> torch.Tensor:
    """A batch-broadcast input (first dimension 1, e.g. HF position ids) expanded to every row, so
    that each run's rows get their own variant's output."""
    if x.dim() and x.shape[0] == 1 and total > 1:
        return x.expand(total, *x.shape[1:])
    return x


def _row_dim(x: torch.Tensor, total: int, name: str, last_is_feature: bool = True) -> tuple[int, int]:
    """(dimension holding the batch rows, rows per batch row) of a routed module's input."""
    if x.dim() and x.shape[0] == total:
        return 0, 1
    if x.dim() and total and x.shape[0] % total == 0:
        return 0, x.shape[0] // total
    for d in range(1, x.dim() - (1 if last_is_feature else 0)):
        if x.shape[d] == total:
            return d, 1
    raise FlexMergeError(f"module '{name}' got an input of shape {tuple(x.shape)} without a batch "
                         f"dimension of the {total} rows of this request; the runtime needs batch-first "
                         "inputs (or a flattened batch x tokens first dimension)")


# ------------------------------------------------------------------------------------- modules
class _Routed(nn.Module):
    """Base of the routed modules: the original module (``inner``) plus one source per parameter
    per variant; ``inner``'s parameters are set to the first variant's tensors (for code that reads
    ``.weight``, ``.dtype`` or ``.device``), the forward uses each run's own."""

    def __init__(self, name: str, inner: nn.Module, router: _Router, pnames: list[str],
                 variants: list[list], mapping: tuple[int, ...], widths: list[int] | None):
        super().__init__()
        self.inner = inner
        self._name = name
        self._router = router
        self._pnames = pnames
        self._variants = variants
        self._mid = router.mapping_id(mapping)
        self._mapping = mapping
        self._widths = widths  # per variant output width where they differ (task-specific heads)
        self._slot_owner = "std"
        for pname, src in zip(pnames, variants[0]):
            t = src.tensor if isinstance(src, _Stored) else src.base
            if pname in inner._parameters:
                inner._parameters[pname] = nn.Parameter(t, requires_grad=False)
            else:
                inner._buffers[pname] = t

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self._modules["inner"], item)

    def _weights(self, g: int) -> list[torch.Tensor | None]:
        r = self._router
        return [r.weight(src, (self._slot_owner, i)) for i, src in enumerate(self._variants[g])]

    def extra_repr(self) -> str:
        return f"variants={len(self._variants)}"

    # helpers for the per-run ops
    def _by_runs(self, x: torch.Tensor, op: Callable[[torch.Tensor, int], torch.Tensor],
                 last_is_feature: bool = True) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return op(x, runs[0][0])
        x = _rows(x, r.total)
        d, k = _row_dim(x, r.total, self._name, last_is_feature)
        outs = [op(x.narrow(d, s * k, (e - s) * k), g) for g, s, e in runs]
        if self._widths is None:
            with _serial():
                return torch.cat(outs, dim=d)
        width = max(o.shape[-1] for o in outs)
        out = outs[0].new_zeros(*outs[0].shape[:d], x.shape[d], *outs[0].shape[d + 1:-1], width)
        for (g, s, e), o in zip(runs, outs):
            out.narrow(d, s * k, (e - s) * k)[..., : o.shape[-1]] = o
        self._note_padded(out)
        return out

    def _note_padded(self, out: torch.Tensor) -> None:
        r = self._router
        per_task = [self._widths[self._mapping[t]] for t in range(r.num_tasks)]
        r.padded.append((out, per_task))


class _RoutedLinear(_Routed):
    """``nn.Linear`` (``y = x W^T + b``) or HF ``Conv1D`` (``y = x W + b``, W: [in, out])."""

    def __init__(self, *args, transposed: bool = False, **kw):
        super().__init__(*args, **kw)
        self._t = transposed

    def _wb(self, g):
        ws = self._weights(g)
        w = ws[self._pnames.index("weight")]
        b = ws[self._pnames.index("bias")] if "bias" in self._pnames else None
        return (w.t() if self._t else w), b  # as [out, in]

    def _one(self, x, g):
        w, b = self._wb(g)
        if x.shape[-1] > w.shape[1] and self._widths is not None:
            x = x[..., : w.shape[1]]  # a padded input from a wider task-specific layer before
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return self._one(x, runs[0][0])
        total = r.total
        if (self._widths is not None or not x.is_contiguous() or x.dim() < 2 or not total
                or x.shape[0] % total):
            return self._by_runs(x, self._one)
        x2 = x.view(-1, x.shape[-1])
        per = x2.shape[0] // total  # rows of the flattened input per batch row
        src0 = self._variants[runs[0][0]][self._pnames.index("weight")]
        out_f = src0.shape[1] if self._t else src0.shape[0]
        out = x.new_empty(*x.shape[:-1], out_f)
        o2 = out.view(-1, out_f)

        def job(run):
            g, s, e = run
            w, b = self._wb(g)
            xs, os_ = x2[s * per: e * per], o2[s * per: e * per]
            if b is None:
                torch.mm(xs, w.t(), out=os_)
            else:
                torch.addmm(b, xs, w.t(), out=os_)

        shares = self._router.split_runs(runs)
        if shares is None:
            for run in runs:
                job(run)
        else:
            self._router.run_concurrently(shares, job)
        return out


class _RoutedEmbedding(_Routed):
    def _one(self, idx, g):
        m = self.inner
        srcs = self._variants[g]
        src = srcs[0]
        if isinstance(src, _Masked) and self._router.policy == "on_the_fly" and m.max_norm is None:
            with _serial():
                rows = src.rebuild_rows(idx)
            if rows is not None:
                self._router.rebuilds += 1
                return rows
        (w,) = self._weights(g)
        return F.embedding(idx, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return self._one(idx, runs[0][0])
        idx = _rows(idx, r.total)
        d, k = _row_dim(idx, r.total, self._name, last_is_feature=False)
        outs = [self._one(idx.narrow(d, s * k, (e - s) * k), g) for g, s, e in runs]
        if self._widths is None:
            with _serial():
                return torch.cat(outs, dim=d)
        width = max(o.shape[-1] for o in outs)
        out = outs[0].new_zeros(*idx.shape, width)
        for (g, s, e), o in zip(runs, outs):
            out.narrow(d, s * k, (e - s) * k)[..., : o.shape[-1]] = o
        self._note_padded(out)
        return out


class _RoutedNorm(_Routed):
    def _one(self, x, g):
        m = self.inner
        ws = dict(zip(self._pnames, self._weights(g)))
        w, b = ws.get("weight"), ws.get("bias")
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, w, b, m.eps)
        return F.rms_norm(x, m.normalized_shape, w, m.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        m = self.inner
        if len(runs) == 1 or isinstance(m, nn.GroupNorm) or not x.dim() or x.shape[0] != r.total:
            return self._by_runs(x, self._one)
        # LayerNorm / RMSNorm normalise each row on its own: normalise all rows in one op, then
        # apply each run's affine part in place (no per-run outputs to concatenate).
        if isinstance(m, nn.LayerNorm):
            y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        else:
            y = F.rms_norm(x, m.normalized_shape, None, m.eps)
        with _serial():
            for g, s, e in runs:  # (weights fetched one run at a time: on-the-fly rebuilds share buffers)
                ws = dict(zip(self._pnames, self._weights(g)))
                w, b = ws.get("weight"), ws.get("bias")
                ys = y[s:e]
                if w is not None and b is not None:
                    torch.addcmul(b, ys, w, out=ys)
                elif w is not None:
                    ys.mul_(w)
                elif b is not None:
                    ys.add_(b)
        return y


class _RoutedConv(_Routed):
    def _one(self, x, g):
        ws = dict(zip(self._pnames, self._weights(g)))
        return self.inner._conv_forward(x, ws["weight"], ws.get("bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._by_runs(x, self._one, last_is_feature=False)


class _RoutedGeneric(_Routed):
    """Any other module with parameters: ``functional_call`` per run of rows; its children see
    only that run's rows (a sub-layout is pushed while they run)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._slot_owner = id(self)

    def _call(self, g, args, kwargs):
        params = dict(zip(self._pnames, self._weights(g)))
        return torch.func.functional_call(self.inner, params, args, kwargs, strict=False)

    def forward(self, *args, **kwargs):
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return self._call(runs[0][0], args, kwargs)
        total = r.total
        outs, sizes = [], []
        for g, s, e in runs:
            sl = lambda v: v.narrow(0, s, e - s) if (isinstance(v, torch.Tensor) and v.dim()  # noqa: E731
                                                      and v.shape[0] == total) else v
            r.stack.append(r.sub_layout(s, e))
            try:
                outs.append(self._call(g, tuple(sl(a) for a in args),
                                       {k: sl(v) for k, v in kwargs.items()}))
            finally:
                r.stack.pop()
            sizes.append(e - s)
        return _cat_like(outs, sizes)


def _cat_like(outs: list, sizes: list[int]):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() and all(o.shape[0] == n for o, n in zip(outs, sizes)):
            return torch.cat(outs, 0)
        return first
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        return type(first)(_cat_like([o[i] for o in outs], sizes) for i in range(len(first)))
    if isinstance(first, Mapping):
        return type(first)(**{k: _cat_like([o[k] for o in outs], sizes) for k in first})
    return first


_NORMS = tuple(c for c in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if c is not None)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WHOLE = (nn.MultiheadAttention,)  # modules whose forward reads their children's weights


def _hf_conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # pragma: no cover - transformers missing
        return None


def _standard_kind(m: nn.Module) -> str | None:
    def plain(cls):
        return isinstance(m, cls) and type(m).forward is cls.forward

    if plain(nn.Linear):
        return "linear"
    conv1d = _hf_conv1d()
    if conv1d is not None and plain(conv1d):
        return "conv1d_t"
    if plain(nn.Embedding):
        return "embedding"
    if any(plain(c) for c in _NORMS):
        return "norm"
    if any(plain(c) for c in _CONVS):
        return "conv"
    return None


# ------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on ``meta`` (no memory) but real buffers (position ids...)."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _factory_takes_task(factory: Callable) -> bool:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind("task")
        return True
    except TypeError:
        return False


def _hf_config_dir(bundle: Bundle, task: str) -> Path | None:
    src = bundle.manifest.get("sources", {}).get("tasks", {}).get(task, {})
    cands = []
    if src.get("path"):
        p = Path(src["path"])
        cands.append(p if p.is_dir() else p.parent)
    if bundle.root is not None:
        cands += [bundle.root / "configs" / task, bundle.root / task]
    for c in cands:
        if (c / "config.json").is_file():
            return c
    return None


def _hf_builder(bundle: Bundle) -> Callable[[str], nn.Module]:
    def build(task: str) -> nn.Module:
        cdir = _hf_config_dir(bundle, task)
        if cdir is None:
            raise FlexMergeError(f"task '{task}': no config.json found (its source "
                                 f"{bundle.manifest.get('sources', {}).get('tasks', {}).get(task, {}).get('path')} "
                                 "is not an HF model directory or is gone); pass model_factory=")
        try:
            import transformers
        except ImportError:  # pragma: no cover
            raise FlexMergeError("HF bundles need the 'transformers' package; install it or pass "
                                 "model_factory=") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


@dataclass
class _ModuleSpec:
    name: str
    module: nn.Module
    parent: nn.Module | None
    child: str
    kind: str
    pnames: list[str]   # local names (may be dotted for _WHOLE modules)
    fnames: list[str]   # full names in the model / bundle


def _order_tasks(mappings: list[tuple[tuple[int, ...], int]], n: int) -> list[int]:
    """A task order that keeps each module's groups contiguous: greedy nearest neighbour over the
    per-module group signatures (Hamming distance weighted by the module's parameter bytes), the
    best of every start."""
    if n <= 2:
        return list(range(n))

    def dist(a, b):
        return sum(w for m, w in mappings if m[a] != m[b])

    d = [[dist(a, b) for b in range(n)] for a in range(n)]
    best, best_cost = list(range(n)), None
    for start in range(n):
        order, left, cost = [start], set(range(n)) - {start}, 0
        while left:
            nxt = min(left, key=lambda j: (d[order[-1]][j], j))
            cost += d[order[-1]][nxt]
            order.append(nxt)
            left.discard(nxt)
        if best_cost is None or cost < best_cost:
            best, best_cost = order, cost
    return best


# ------------------------------------------------------------------------------------- public
class MultiTaskModel:
    """All tasks of a bundle served from one copy of its stored tensors (see the module doc)."""

    def __init__(self, bundle: Bundle, model: nn.Module, router: _Router, store: _Store,
                 order: list[int], specs: list[_ModuleSpec], routed: dict[str, _Routed],
                 input_kind: str):
        self.bundle = bundle
        self.model = model
        self.tasks: list[str] = list(bundle.tasks)
        self.task_order: list[str] = [self.tasks[i] for i in order]
        self._rank = {t: i for i, t in enumerate(self.task_order)}
        self._router = router
        self._store = store
        self._routed = routed
        self._input_kind = input_kind  # "hf" | "plain"
        self._lock = threading.Lock()

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path_or_bundle: str | os.PathLike | Bundle, model_factory: Callable | None = None,
                    rebuild_policy: str = "on_the_fly", cache_budget_bytes: int | None = None,
                    verify: bool = True) -> "MultiTaskModel":
        """Load a bundle for serving.

        ``model_factory``: builds the (untrained) torch module. Called as ``model_factory(task)``
        if it accepts one positional argument (then once per task, on the ``meta`` device, to
        check each task's parameter names and shapes; the first task's module serves), else as
        ``model_factory()`` (once; task-specific parameters may then differ in shape from the
        module's). It must return a new module: its submodules are replaced by routed ones. Without
        it, an HF bundle builds the class named in ``architectures`` of each task's
        ``config.json`` with ``from_config`` (no download). ``rebuild_policy`` and
        ``cache_budget_bytes``: for mask methods (see the module doc). ``verify``: check every
        bundle file against its sha256 first.
        """
        if rebuild_policy not in ("on_the_fly", "cache"):
            raise FlexMergeError(f"rebuild_policy {rebuild_policy!r} is unknown; use 'on_the_fly' or 'cache'")
        if cache_budget_bytes is not None and cache_budget_bytes < 0:
            raise FlexMergeError("cache_budget_bytes must be >= 0 (or None for no limit)")
        if isinstance(path_or_bundle, Bundle):
            bundle = path_or_bundle
            if verify:
                bundle.verify()
        else:
            bundle = Bundle.load(path_or_bundle, verify=verify)
        if model_factory is None:
            build, per_task, kind = _hf_builder(bundle), True, "hf"
        else:
            if not callable(model_factory):
                raise FlexMergeError("model_factory must be a callable returning a torch module")
            per_task = _factory_takes_task(model_factory)
            build = (lambda t: model_factory(t)) if per_task else (lambda t: model_factory())
            kind = "plain"
        return _load(cls, bundle, build, per_task, kind, rebuild_policy, cache_budget_bytes)

    # ---- serving ------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.forward(batch)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``{task: inputs}`` -> ``{task: outputs}``; inputs: a dict of tensors (HF models: the
        keyword arguments) or a tensor / tuple of tensors (positional arguments); first dim = rows."""
        if not isinstance(batch, Mapping) or not batch:
            raise FlexMergeError("give a non-empty dict {task: inputs}")
        for t in batch:
            if t not in self._rank:
                raise FlexMergeError(f"unknown task '{t}'; this bundle has: {', '.join(self.tasks)}")
        tasks = sorted(batch, key=self._rank.__getitem__)
        args, kwargs, rows = _concat_inputs(tasks, batch)
        if self._input_kind == "hf" and "labels" in kwargs:
            raise FlexMergeError("inputs contain 'labels': losses are not routed per task; pass inputs "
                                 "without labels and compute losses from the returned logits")
        tidx = {t: i for i, t in enumerate(self.tasks)}
        layout = tuple((tidx[t], n) for t, n in zip(tasks, rows))
        r = self._router
        with self._lock, torch.inference_mode():
            r.stack = [layout]
            r._runs.clear()
            r.padded = []
            try:
                out = self.model(*args, **kwargs)
                padded = r.padded
            finally:
                r.stack, r.padded = [], []
        result, start = {}, 0
        for t, n in zip(tasks, rows):
            result[t] = _split(out, start, start + n, sum(rows), padded, tidx[t])
            start += n
        return {t: result[t] for t in batch}

    # ---- facts --------------------------------------------------------------------------
    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """The tensors ``task`` runs with, by parameter name: stored tensors themselves (shared
        with every task of the group, no copy); masked ones rebuilt (fresh tensors)."""
        if task not in self._rank:
            raise FlexMergeError(f"unknown task '{task}'; this bundle has: {', '.join(self.tasks)}")
        ti = self.tasks.index(task)
        out = {}
        for m in self._routed.values():
            g = m._mapping[ti]
            for fname, src in zip(m._fnames, m._variants[g]):
                out[fname] = src.tensor if isinstance(src, _Stored) else src.rebuild()
        return out

    def variants(self, name: str) -> int:
        """How many distinct weight sets the module ``name`` holds."""
        return len(self._routed[name]._variants)

    def stats(self) -> dict:
        r = self._router
        return {"tasks": len(self.tasks), "policy": r.policy,
                "stored_bytes": self._store.file_bytes(), "loaded_bytes": self._store.loaded_bytes(),
                "cache_bytes": r.cache_bytes, "cache_entries": len(r.cache),
                "scratch_bytes": sum(t.numel() * t.element_size() for t in r.scratch.values()),
                "rebuilds": r.rebuilds}

    def clear_cache(self) -> None:
        self._router.clear_cache()

    def __repr__(self) -> str:
        return (f"MultiTaskModel({len(self.tasks)} tasks, {self.bundle.size_units:.3g} units, "
                f"policy={self._router.policy})")


# ------------------------------------------------------------------------------------- load
def _load(cls, bundle: Bundle, build, per_task: bool, input_kind: str, policy: str,
          budget: int | None) -> MultiTaskModel:
    m = bundle.manifest
    tasks = list(bundle.tasks)
    store = _Store(bundle)
    aliases = m.get("aliases", {}) or {}
    block_of: dict[str, Any] = {}
    for b in bundle.blocks:
        for p in b.params:
            block_of[p] = b
    spec = m.get("task_specific", {}) or {}
    spec_names = {t: set((spec.get(t) or {}).get("names") or []) for t in tasks}

    def source(name: str, task: str, sources: dict):
        name = ties.get(name, name)
        canon = aliases.get(name, name)
        if canon in spec_names[task]:
            key = ("spec", spec[task]["file"], canon)
            if key not in sources:
                sources[key] = _Stored(store.get(spec[task]["file"], canon), key)
            return sources[key]
        b = block_of.get(canon)
        if b is None:
            return None
        gi, pos = bundle.group_of(task, b.name)
        kind = b.groups[gi]["kind"]
        if kind in ("original", "merged"):
            k = f"g{gi}/m{pos}/{canon}" if kind == "original" else f"g{gi}/merged/{canon}"
            key = ("stored", b.file, k)
            if key not in sources:
                sources[key] = _Stored(store.get(b.file, k), key)
            return sources[key]
        key = ("masked", b.file, gi, pos, canon)
        if key not in sources:
            mk, sk = f"g{gi}/mask{pos}/{canon}", f"g{gi}/scalars"
            sources[key] = _Masked(store.get(b.file, f"base/{canon}"),
                                   store.get(b.file, f"g{gi}/delta/{canon}"),
                                   store.get(b.file, mk) if store.has(b.file, mk) else None,
                                   store.get(b.file, sk)[pos] if store.has(b.file, sk) else None, key)
        return sources[key]

    def bundle_shape(name: str, task: str) -> tuple[int, ...]:
        canon = aliases.get(name, name)
        if canon in spec_names[task]:
            return store.shape(spec[task]["file"], canon)
        b = block_of[canon]
        gi, pos = bundle.group_of(task, b.name)
        kind = b.groups[gi]["kind"]
        k = {"original": f"g{gi}/m{pos}/{canon}", "merged": f"g{gi}/merged/{canon}"}.get(kind,
                                                                                         f"base/{canon}")
        return store.shape(b.file, k)

    # ---- build and check the skeleton(s) ----------------------------------------------
    def make(task):
        with _params_on_meta():
            model = build(task)
        if not isinstance(model, nn.Module):
            raise FlexMergeError(f"model_factory returned a {type(model).__name__}, not a torch module")
        return model

    all_keys = set().union(*[set(m["task_keys"][t]) for t in tasks])
    skeleton = make(tasks[0])
    ties = _model_ties(skeleton, all_keys)
    checks = {tasks[0]: skeleton}
    if per_task:
        for t in tasks[1:]:
            checks[t] = make(t)
    for t in tasks:
        _check_names(checks.get(t, skeleton), t, bundle, aliases, bundle_shape, exact_specific=per_task,
                     spec_names=spec_names[t], ties=ties)
    del checks

    skeleton.eval()
    sources: dict = {}
    router = _Router(len(tasks), policy, budget)
    specs = _module_specs(skeleton, all_keys)
    routed: dict[str, _Routed] = {}
    weights: list[tuple[tuple[int, ...], int]] = []
    for sp in specs:
        variants, mapping, keys = [], [], {}
        for t in tasks:
            srcs = [source(f, t, sources) for f in sp.fnames]
            if any(s is None for s in srcs):
                missing = sp.fnames[[s is None for s in srcs].index(True)]
                raise FlexMergeError(f"model parameter '{missing}' is not in the bundle for task '{t}'; "
                                     "the model factory does not match the bundle")
            key = tuple(s.uid for s in srcs)
            if key not in keys:
                keys[key] = len(variants)
                variants.append(srcs)
            mapping.append(keys[key])
        widths = _widths(sp, variants)
        kw = dict(name=sp.name, inner=sp.module, router=router, pnames=sp.pnames, variants=variants,
                  mapping=tuple(mapping), widths=widths)
        if sp.kind == "linear":
            mod = _RoutedLinear(**kw)
        elif sp.kind == "conv1d_t":
            mod = _RoutedLinear(**kw, transposed=True)
        elif sp.kind == "embedding":
            mod = _RoutedEmbedding(**kw)
        elif sp.kind == "norm":
            mod = _RoutedNorm(**kw)
        elif sp.kind == "conv":
            mod = _RoutedConv(**kw)
        else:
            mod = _RoutedGeneric(**kw)
        mod._fnames = sp.fnames
        routed[sp.name] = mod
        nbytes = sum(int(torch.Size(s.shape).numel()) * s.dtype.itemsize for s in variants[0])
        weights.append((tuple(mapping), nbytes))
    root = skeleton
    for sp in specs:
        if sp.parent is None:
            root = routed[sp.name]
        else:
            sp.parent._modules[sp.child] = routed[sp.name]
    leftover = [n for n, p in root.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise FlexMergeError(f"model parameter '{leftover[0]}' got no tensor from the bundle; the model "
                             "factory does not match the bundle")
    order = _order_tasks(weights, len(tasks))
    return cls(bundle, root, router, store, order, specs, routed, input_kind)


def _model_ties(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """Parameter names the model ties (one Parameter under several names, e.g. an LM head tied to
    the embeddings) -> the tied name the bundle has, for names the bundle lacks (HF drops them)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    out = {}
    for names in by_id.values():
        present = [n for n in names if n in keys]
        if present:
            for n in names:
                if n not in keys:
                    out[n] = present[0]
    return out


def _check_names(model: nn.Module, task: str, bundle: Bundle, aliases: dict, bundle_shape,
                 exact_specific: bool, spec_names: set, ties: dict[str, str]) -> None:
    """Parameter names and shapes of the model against the bundle's tensors for ``task``."""
    keys = list(bundle.manifest["task_keys"][task])
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    missing = [n for n in params if n not in set(keys) and ties.get(n) not in set(keys)]
    if missing:
        raise FlexMergeError(f"model parameter '{missing[0]}' (and {len(missing) - 1} more) is not in the "
                             f"bundle for task '{task}'; the model factory does not match the bundle")
    extra = [k for k in keys if k not in params and k not in buffers]
    if extra:
        raise FlexMergeError(f"bundle tensor '{extra[0]}' (and {len(extra) - 1} more) of task '{task}' has "
                             "no parameter or buffer in the model; the model factory does not match the bundle")
    for k in keys:
        ref = params.get(k, buffers.get(k))
        shape = tuple(bundle_shape(k, task))
        if tuple(ref.shape) == shape:
            continue
        specific = aliases.get(k, k) in spec_names
        if specific and (not exact_specific) and len(shape) == ref.dim():
            continue  # a task-specific tensor of another width than the shared module's
        raise FlexMergeError(f"tensor '{k}' of task '{task}' has shape {list(shape)} in the bundle but "
                             f"{list(ref.shape)} in the model; the model factory does not match the bundle")


def _module_specs(model: nn.Module, bundle_keys: set[str]) -> list[_ModuleSpec]:
    """Every module holding parameters (or bundle-provided buffers) of its own, parents first."""
    specs, skip = [], []
    mods = dict(model.named_modules(remove_duplicate=False))
    seen = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if any((s == "" and name != "") or name.startswith(s + ".") for s in skip):
            continue
        prefix = name + "." if name else ""
        whole = isinstance(mod, _WHOLE)
        if whole:
            pnames = [n for n, _ in mod.named_parameters(remove_duplicate=False)]
            pnames += [n for n, _ in mod.named_buffers(remove_duplicate=False) if prefix + n in bundle_keys]
            skip.append(name)
        else:
            pnames = [n for n, p in mod._parameters.items() if p is not None]
            pnames += [n for n, b in mod._buffers.items() if b is not None and prefix + n in bundle_keys]
        if not pnames:
            continue
        if id(mod) in seen:
            raise FlexMergeError(f"module '{name}' is used at two places in the model; the runtime "
                                 "routes each module object once: give each place its own module")
        seen.add(id(mod))
        kind = "generic" if whole else (_standard_kind(mod) or "generic")
        if kind in ("linear", "conv1d_t") and "weight" not in pnames:
            kind = "generic"
        if kind != "generic" and any(n not in ("weight", "bias") for n in pnames):
            kind = "generic"
        parent_name, _, child = name.rpartition(".")
        parent = mods[parent_name] if name else None
        specs.append(_ModuleSpec(name, mod, parent, child if name else "", kind, pnames,
                                 [prefix + n for n in pnames]))
    return specs


def _widths(sp: _ModuleSpec, variants: list[list]) -> list[int] | None:
    """Per-variant output widths where the variants' shapes differ (task-specific heads)."""
    shapes = [tuple(tuple(s.shape) for s in v) for v in variants]
    if len(set(shapes)) <= 1:
        return None
    w_index = sp.pnames.index("weight") if "weight" in sp.pnames else None
    if sp.kind == "linear":
        return [v[w_index].shape[0] for v in variants]
    if sp.kind in ("conv1d_t", "embedding"):
        return [v[w_index].shape[1] for v in variants]
    raise FlexMergeError(f"task-specific module '{sp.name}' ({type(sp.module).__name__}) differs in shape "
                         "across tasks; only Linear, Embedding and Conv1D heads may differ in width")


def _concat_inputs(tasks: list[str], batch: Mapping[str, Any]):
    """Concatenate the tasks' inputs along the batch dimension; check that they agree."""
    first = batch[tasks[0]]

    def leaves(x, t):
        if isinstance(x, torch.Tensor):
            return [("input", x)]
        if isinstance(x, Mapping):
            return list(x.items())
        if isinstance(x, (tuple, list)):
            return [(f"input[{i}]", v) for i, v in enumerate(x)]
        raise FlexMergeError(f"inputs of task '{t}' are a {type(x).__name__}; give a tensor, a tuple of "
                             "tensors or a dict of tensors")

    structure = [k for k, _ in leaves(first, tasks[0])]
    per_task, rows = [], []
    for t in tasks:
        items = leaves(batch[t], t)
        if type(batch[t]) is not type(first) and not (isinstance(batch[t], Mapping) and isinstance(first, Mapping)) \
                or [k for k, _ in items] != structure:
            raise FlexMergeError(f"inputs of task '{t}' have entries {[k for k, _ in items]} but task "
                                 f"'{tasks[0]}' has {structure}; give every task the same inputs")
        n = None
        for k, v in items:
            if isinstance(v, torch.Tensor):
                if v.dim() == 0:
                    raise FlexMergeError(f"input '{k}' of task '{t}' is a scalar; inputs need a batch dimension")
                if n is None:
                    n = v.shape[0]
                elif v.shape[0] != n:
                    raise FlexMergeError(f"inputs of task '{t}' disagree on the batch size: '{k}' has "
                                         f"{v.shape[0]} rows, others {n}")
        if n is None:
            raise FlexMergeError(f"inputs of task '{t}' hold no tensor")
        rows.append(n)
        per_task.append(items)
    merged = []
    for i, k in enumerate(structure):
        vals = [items[i][1] for items in per_task]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            for t, v in zip(tasks, vals):
                if not isinstance(v, torch.Tensor) or v.shape[1:] != v0.shape[1:] or v.dtype != v0.dtype:
                    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise FlexMergeError(f"input '{k}' of task '{t}' has shape {shape} but task '{tasks[0]}' has "
                                         f"{tuple(v0.shape)} ({v0.dtype}); all dimensions but the first (batch) "
                                         "must agree: pad to one sequence length")
            merged.append((k, torch.cat(vals, 0) if len(vals) > 1 else v0))
        else:
            for t, v in zip(tasks, vals):
                if v != v0:
                    raise FlexMergeError(f"input '{k}' of task '{t}' is {v!r} but {v0!r} for task "
                                         f"'{tasks[0]}'; non-tensor inputs must be the same for all tasks")
            merged.append((k, v0))
    if isinstance(first, torch.Tensor):
        return (merged[0][1],), {}, rows
    if isinstance(first, Mapping):
        return (), dict(merged), rows
    return tuple(v for _, v in merged), {}, rows


def _split(obj, start: int, end: int, total: int, padded, tidx: int):
    """One task's share of the model's outputs: rows ``start:end``; padded head outputs sliced
    back to the task's own width."""
    if isinstance(obj, torch.Tensor):
        if not obj.dim():
            return obj
        for ref, widths in padded:
            if obj is ref or (obj.data_ptr() == ref.data_ptr() and obj.shape == ref.shape):
                return obj[start:end, ..., : widths[tidx]]
        if obj.shape[0] == total:
            return obj[start:end]
        if total and obj.shape[0] % total == 0:
            k = obj.shape[0] // total
            return obj[start * k: end * k]
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_split(v, start, end, total, padded, tidx) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_split(v, start, end, total, padded, tidx) for v in obj)
    if isinstance(obj, Mapping):
        items = {k: _split(v, start, end, total, padded, tidx) for k, v in obj.items()}
        try:
            return type(obj)(**items)
        except TypeError:
            return dict(items)
    return obj
