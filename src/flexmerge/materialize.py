"""Materialise a grouping: run the merge method on every block group, block by block.

Yields, per block, what the bundle stores (:class:`StoredBlock`). Memory stays near
base block + N x block + output (docs/architecture.md, "Invariants"): one block is in memory at a time.
A group of one stores its task's original tensors, read directly from the checkpoint (so the
largest size rebuilds every task bit for bit); mask methods follow :class:`~flexmerge.sizes.CostModel`
for which groups keep their originals.

Normalisation statistics never go through the method: after each block that has them comes a
statistics entry (:func:`statistics_block`) of plain groups under the rule of
:mod:`flexmerge.sizes`: the members' own statistics (exact per task), or for a merged group the
pooled statistics of its members (:func:`pooled_statistics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from . import bundle_format as fmt
from .blocks import Block, is_variance
from .errors import FlexMergeError
from .methods.base import GroupInput, MergeMethod, StoredGroup
from .plan import Grouping
from .similarity import single_thread
from .sizes import CostModel
from .validate import ModelSet


@dataclass
class StoredGroupRecord:
    tasks: list[int]
    kind: str  # original | merged | masked
    keys: dict[str, str] = field(default_factory=dict)  # role -> tensor key prefix


@dataclass
class StoredBlock:
    name: str
    index: int
    store_base: bool
    groups: list[StoredGroupRecord]
    tensors: dict[str, torch.Tensor]
    nbytes: int
    params: list[str] | None = None  # the tensors it holds; None: its block's ``params``
    file_index: int | None = None  # its file's number; None: ``index``


STATISTICS_SUFFIX = ":statistics"
"""A statistics entry is named after its block plus this suffix."""


def pooled_statistics(means: torch.Tensor | None, variances: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mean and variance of the mixture of the members' distributions, in float64: with
    ``mu = mean_i mu_i``, ``var = mean_i (var_i + (mu_i - mu)^2)`` (law of total variance, equal
    weights). ``means``/``variances``: ``[g, C]``; either may be None (then the other is averaged)."""
    mu = means.to(torch.float64).mean(dim=0) if means is not None else None
    if variances is None:
        return mu, None
    v = variances.to(torch.float64)
    if means is not None:
        v = v + (means.to(torch.float64) - mu) ** 2
    return mu, v.mean(dim=0)


def _read_statistics(models: ModelSet, name: str, members) -> torch.Tensor:
    """``[g, *shape]`` statistics of ``members``, checked finite and, for variances, >= 0."""
    tasks = models.task_names
    rows = []
    for t in members:
        x = models.tasks[tasks[t]].get(name)
        if not bool(torch.isfinite(x).all()):  # mergeable tensors are floating point
            models.name_non_finite(name)
        if is_variance(name) and bool((x < 0).any()):
            raise FlexMergeError(f"task '{tasks[t]}': normalisation variance '{name}' has negative entries; "
                                 "fix that checkpoint (a variance is never negative)")
        rows.append(x)
    return torch.stack(rows)


def statistics_block(models: ModelSet, block: Block, bi: int, groups, kinds, cost: CostModel,
                     file_index: int) -> StoredBlock:
    """The statistics entry of ``block``: its groups follow the block's under the ``pooled`` rule
    (originals where the block keeps originals, pooled statistics elsewhere); under ``per_task``
    every task is a group of its own."""
    if cost.statistics == "per_task":
        groups = [(t,) for t in range(models.num_tasks)]
        kinds = ["original"] * len(groups)
    tensors: dict[str, torch.Tensor] = {}
    records: list[StoredGroupRecord] = []
    for gi, (members, kind) in enumerate(zip(groups, kinds)):
        pooled = kind != "original" and len(members) > 1
        records.append(StoredGroupRecord(list(members), "merged" if pooled else "original"))
        stats = {name: _read_statistics(models, name, members) for name in block.statistics}
        for name, x in stats.items():
            if not pooled:
                for pos in range(len(members)):
                    tensors[fmt.original_key(gi, pos, name)] = x[pos].contiguous()
                continue
            if is_variance(name):
                module = name.rpartition(".")[0]
                value = pooled_statistics(stats.get(f"{module}.running_mean" if module else "running_mean"), x)[1]
            else:  # a running mean (or another floating statistic): the mean of the members'
                value = x.to(torch.float64).mean(dim=0)
            tensors[fmt.merged_key(gi, name)] = value.to(x.dtype).contiguous()
    nbytes = sum(int(t.numel()) * t.element_size() for t in tensors.values())
    return StoredBlock(block.name + STATISTICS_SUFFIX, bi, False, records, tensors, nbytes,
                       params=list(block.statistics), file_index=file_index)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ``ceil(numel / 8)`` bytes (numpy ``packbits``, big-endian bits)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.bool_)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.numpy(), count=n).astype(np.bool_)
    return torch.from_numpy(bits).reshape(shape)


def _add_cast(base: torch.Tensor, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(base + merged).to(dtype)`` one piece at a time, ``base`` widened to float32 piece by piece
    (as stored or already float32): no float32 temporary of the whole tensor (131 MB for a
    32000 x 1024 embedding), the same values."""
    out = torch.empty(merged.shape, dtype=dtype)
    flat, b, m = out.view(-1), base.reshape(-1), merged.reshape(-1)
    step = 1 << 20
    for a in range(0, flat.numel(), step):
        flat[a:a + step] = b[a:a + step].to(torch.float32) + m[a:a + step]
    return out


MERGE_CHUNK_BYTES = 8 << 20
"""Task-vector bytes (all N rows, float32) per chunk when a method merges entry by entry; small
for the reason given at :data:`flexmerge.similarity.GRAM_PASS_BYTES` (a method's temporaries of
a chunk's size stay in reused heap pages)."""


READERS = 2
"""Reader threads of the chunked merge. Reading and widening N half-precision rows costs more than
an entry-by-entry merge of them, so two threads read while this one merges."""


def chunkable(method: MergeMethod) -> bool:
    """Whether ``method`` merges entry by entry, transform included (:attr:`MergeMethod.elementwise_merge`)."""
    return method.elementwise_merge and (not method.has_transform or method.elementwise_transform)


def merge_in_chunks(models: ModelSet, method: MergeMethod, block: Block,
                    groups: list[tuple[int, ...]]) -> dict[tuple[int, ...], StoredGroup]:
    """Merge ``groups`` of ``block`` in one streaming pass of flat chunks: memory is N x chunk task
    vectors (:data:`MERGE_CHUNK_BYTES`) plus one merged float32 copy of the block per group,
    whatever N, instead of N copies of the block."""
    chunk = max(1, MERGE_CHUNK_BYTES // (4 * models.num_tasks))
    shapes = {n: tuple(models.mergeable[n].shape) for n in block.params}
    mergers = {g: method.chunked_merge(GroupInput(task_vectors={}, base={}, task_ids=list(g),
                                                  block=block.name, seed=method.seed), shapes)
               for g in groups}
    index = {g: torch.tensor(g) for g in groups}
    whole = len(models.tasks)
    # The reader thread and this one are the two workers; torch's own worker threads on top of
    # them made the memory-bound chunk ops up to 5x slower on 2 busy cores (bench/bench_llm.py).
    with single_thread():
        for name, b32, t in models.stream(block.params, chunk_elems=chunk, reuse_buffers=True, prefetch=2,
                                          readers=READERS):
            flat = t.reshape(t.shape[0], -1)
            flat = method.transform(name, flat) if method.has_transform else flat
            base = b32.reshape(-1)
            for g, merger in mergers.items():
                merger.add(name, flat if len(g) == whole else flat.index_select(0, index[g]), base)
        return {g: m.result() for g, m in mergers.items()}


def materialize(models: ModelSet, method: MergeMethod, grouping: Grouping, cost: CostModel,
                progress: Callable[[int, int], None] | None = None,
                cache: dict | None = None) -> Iterator[StoredBlock]:
    """Yield the stored tensors of every block for ``grouping``.

    ``cache``: a dict kept by the caller across groupings of one plan, ``(block, members) ->``
    the method's :class:`~flexmerge.methods.base.StoredGroup`. A group's merge depends only on
    its block and members, and the groupings of one plan share most groups, so a sweep over
    sizes merges each group once (TSV or Iso-CTS: 30 s per size without it on MiniLM x 8).
    """
    tasks = models.task_names
    blocks = models.blockmap.blocks
    stats_files = 0
    for bi, block in enumerate(blocks):
        groups = grouping.groups[block.name]
        layout = cost.layout(bi, [len(g) for g in groups])
        tensors: dict[str, torch.Tensor] = {}
        records: list[StoredGroupRecord] = []
        to_merge = [tuple(g) for g, k in zip(groups, layout.kinds)
                    if k != "original" and (cache is None or (block.name, tuple(g)) not in cache)]
        base32: dict[str, torch.Tensor] = {}
        taus: dict[str, torch.Tensor] = {}
        chunked: dict[tuple[int, ...], StoredGroup] = {}
        if to_merge and chunkable(method):
            chunked = merge_in_chunks(models, method, block, to_merge)
        elif to_merge:
            for name, b32, t in models.stream(block.params):
                base32[name] = b32
                taus[name] = method.transform(name, t) if method.has_transform else t
        if layout.store_base:
            for name in block.params:
                tensors[fmt.base_key(name)] = models.base.get(name).contiguous()

        def merged_group(members) -> StoredGroup:
            key = (block.name, tuple(members))
            if cache is not None and key in cache:
                return cache[key]
            if tuple(members) in chunked:
                stored = chunked[tuple(members)]
                if cache is not None:
                    cache[key] = stored
                return stored
            if list(members) == list(range(len(tasks))):
                rows = taus  # the whole stack: no copy
            else:
                idx = torch.tensor(list(members))
                rows = {n: taus[n].index_select(0, idx) for n in block.params}
            group = GroupInput(task_vectors={n: rows[n] for n in block.params},
                               base={n: base32[n] for n in block.params}, task_ids=list(members),
                               block=block.name, seed=method.seed)
            stored = method.merge(group)
            if cache is not None:
                cache[key] = stored
            return stored

        for gi, (members, kind) in enumerate(zip(groups, layout.kinds)):
            records.append(StoredGroupRecord(list(members), kind))
            if kind == "original":
                for pos, t in enumerate(members):
                    src = models.tasks[tasks[t]]
                    for name in block.params:
                        tensors[fmt.original_key(gi, pos, name)] = src.get(name).contiguous()
                continue
            stored = merged_group(members)
            for name in block.params:
                dtype = models.mergeable[name].dtype
                merged = stored.merged[name]
                if kind == "merged":
                    if stored.needs_base:  # a mask method whose layout chose plain merging
                        raise RuntimeError("mask method in a plain layout")
                    if name not in base32:  # chunked, or every group came from the cache: the
                        base32[name] = models.base.get(name)  # base as stored, widened by _add_cast
                    tensors[fmt.merged_key(gi, name)] = _add_cast(base32[name], merged, dtype)
                else:
                    tensors[fmt.delta_key(gi, name)] = merged.to(dtype).contiguous()
                    if stored.masks is not None:
                        for pos in range(len(members)):
                            tensors[fmt.mask_key(gi, pos, name)] = pack_mask(stored.masks[name][pos])
            if kind == "masked" and stored.scalars is not None:
                tensors[fmt.scalars_key(gi)] = stored.scalars.to(torch.float32).reshape(-1).contiguous()
        yield StoredBlock(block.name, bi, layout.store_base, records, tensors,
                          layout.nbytes - layout.stats_nbytes)
        if block.statistics:
            stats_files += 1
            sb = statistics_block(models, block, bi, groups, layout.kinds, cost, len(blocks) + stats_files - 1)
            if sb.nbytes != layout.stats_nbytes:  # the size rule and the storage rule must agree
                raise RuntimeError(f"statistics of block '{block.name}': {sb.nbytes} bytes stored, "
                                   f"{layout.stats_nbytes} planned")
            yield sb
        if progress is not None:
            progress(bi + 1, len(blocks))
