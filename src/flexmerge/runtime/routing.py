"""The batch layout of the current request and what routed modules share per forward: contiguous
runs of rows per variant, the worker threads the runs are shared out over, the masked-weight
buffers and cache (``rebuild_policy``; see :mod:`flexmerge.runtime`)."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .sources import _Stored

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
