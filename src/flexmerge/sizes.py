"""Exact sizes: what a grouping of blocks stores, in bytes, and in model units.

Every stored tensor counts in its stored dtype (the checkpoint's dtype); masks count one bit per
element (bit-packed, rounded up to whole bytes per tensor); scalars count 4 bytes (float32).
Model units = stored bytes of the mergeable part / bytes of one model's mergeable part, so N means
every task keeps its own block and 1.0 one shared model. Task-specific
(excluded) tensors are reported separately.

Plain methods store one tensor set per group: a block with k groups costs ``k * B``.
Mask methods (TALL/consensus, EMR) store, per group, whichever is smaller: the members' originals
(``g * B``) or the merged vector + one mask (+ one scalar) per member (``B + g * (M + S)``); the
pretrained block (``B``) is stored once per block if any group uses masks. This generalises the
FlexMerge rule that a 1+1 merge keeps both originals (Appendix C.9) and keeps sizes honest.

Normalisation statistics (:attr:`flexmerge.blocks.Block.statistics`, ``S`` bytes per block) are
stored beside their block under one of two rules (:data:`STATISTICS_RULES`):

* ``pooled`` (default): a group that stores its members' originals stores their own statistics
  (``g * S``); any other group stores one set, the pooled statistics of its members (``S``).
* ``per_task``: every task keeps its own statistics whatever its group (``N * S`` per block).

One model unit counts one model's weights *and* statistics. ``block_bytes[b]`` is what each
merge in block ``b`` saves under a plain method: ``B + S`` pooled, ``B`` per task.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import BlockMap
from .errors import FlexMergeError

SCALAR_BYTES = 4
STATISTICS_RULES = ("pooled", "per_task")


def mask_bytes(numel: int) -> int:
    return (numel + 7) // 8


@dataclass(frozen=True)
class BlockLayout:
    """How one block is stored for given group sizes: pretrained block stored?, per-group kind."""

    store_base: bool
    kinds: tuple[str, ...]  # per group: "original" | "merged" | "masked"
    nbytes: int  # weights and statistics
    stats_nbytes: int = 0  # the statistics' share of ``nbytes``


class CostModel:
    """Bytes of each block for a grouping, for one method's storage rule and statistics rule."""

    def __init__(self, blockmap: BlockMap, stores_masks: bool = False, stores_scalars: bool = False,
                 param_numels: dict[str, int] | None = None, statistics: str = "pooled"):
        if statistics not in STATISTICS_RULES:
            raise FlexMergeError(f"unknown statistics rule '{statistics}'; use {' or '.join(STATISTICS_RULES)}")
        self.blockmap = blockmap
        self.statistics = statistics
        self.masked = bool(stores_masks or stores_scalars)
        self.stores_masks = stores_masks
        self.stores_scalars = stores_scalars
        self.weight_bytes = [b.nbytes for b in blockmap.blocks]
        self.stats_bytes = [b.stats_nbytes for b in blockmap.blocks]
        pooled = statistics == "pooled"
        self.block_bytes = [w + (s if pooled else 0) for w, s in zip(self.weight_bytes, self.stats_bytes)]
        if param_numels is None:
            self.block_mask_bytes = [0] * len(blockmap.blocks)
        else:
            self.block_mask_bytes = [sum(mask_bytes(param_numels[p]) for p in b.params)
                                     for b in blockmap.blocks]

    @classmethod
    def for_method(cls, blockmap: BlockMap, method, infos: dict, statistics: str = "pooled") -> "CostModel":
        return cls(blockmap, method.stores_masks, method.stores_scalars,
                   {n: i.numel for n, i in infos.items()}, statistics=statistics)

    @property
    def unit_bytes(self) -> int:
        """One model's weights and statistics."""
        return sum(self.weight_bytes) + sum(self.stats_bytes)

    def stats_cost(self, block: int, group_sizes: list[int], kinds) -> int:
        """Bytes of the statistics of ``block`` (module docstring)."""
        s = self.stats_bytes[block]
        if self.statistics == "per_task":
            return s * sum(group_sizes)
        return sum(s if k != "original" else g * s for g, k in zip(group_sizes, kinds))

    def layout(self, block: int, group_sizes: list[int]) -> BlockLayout:
        b, s = self.weight_bytes[block], self.stats_bytes[block]
        pooled = self.statistics == "pooled"
        if not self.masked:
            kinds = tuple("original" if g == 1 else "merged" for g in group_sizes)
            stats = self.stats_cost(block, group_sizes, kinds)
            return BlockLayout(False, kinds, b * len(group_sizes) + stats, stats)
        per_member = (self.block_mask_bytes[block] if self.stores_masks else 0) + \
            (SCALAR_BYTES if self.stores_scalars else 0)
        all_originals = (b + s) * sum(group_sizes)
        kinds, cost = [], b
        for g in group_sizes:
            masked = b + g * per_member + (s if pooled else g * s)
            if g >= 2 and masked < g * (b + s):
                kinds.append("masked")
                cost += masked
            else:
                kinds.append("original")
                cost += g * (b + s)
        if "masked" not in kinds or all_originals <= cost:
            return BlockLayout(False, ("original",) * len(group_sizes), all_originals, s * sum(group_sizes))
        return BlockLayout(True, tuple(kinds), cost, self.stats_cost(block, group_sizes, kinds))

    def block_cost(self, block: int, group_sizes: list[int]) -> int:
        return self.layout(block, group_sizes).nbytes

    def units(self, nbytes: int) -> float:
        return nbytes / self.unit_bytes
