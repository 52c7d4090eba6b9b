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
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import BlockMap

SCALAR_BYTES = 4


def mask_bytes(numel: int) -> int:
    return (numel + 7) // 8


@dataclass(frozen=True)
class BlockLayout:
    """How one block is stored for given group sizes: pretrained block stored?, per-group kind."""

    store_base: bool
    kinds: tuple[str, ...]  # per group: "original" | "merged" | "masked"
    nbytes: int


class CostModel:
    """Bytes of each block for a grouping, for one method's storage rule."""

    def __init__(self, blockmap: BlockMap, stores_masks: bool = False, stores_scalars: bool = False,
                 param_numels: dict[str, int] | None = None):
        self.blockmap = blockmap
        self.masked = bool(stores_masks or stores_scalars)
        self.stores_masks = stores_masks
        self.stores_scalars = stores_scalars
        self.block_bytes = [b.nbytes for b in blockmap.blocks]
        if param_numels is None:
            self.block_mask_bytes = [0] * len(blockmap.blocks)
        else:
            self.block_mask_bytes = [sum(mask_bytes(param_numels[p]) for p in b.params)
                                     for b in blockmap.blocks]

    @classmethod
    def for_method(cls, blockmap: BlockMap, method, infos: dict) -> "CostModel":
        return cls(blockmap, method.stores_masks, method.stores_scalars,
                   {n: i.numel for n, i in infos.items()})

    @property
    def unit_bytes(self) -> int:
        return sum(self.block_bytes)

    def layout(self, block: int, group_sizes: list[int]) -> BlockLayout:
        b = self.block_bytes[block]
        if not self.masked:
            kinds = tuple("original" if g == 1 else "merged" for g in group_sizes)
            return BlockLayout(False, kinds, b * len(group_sizes))
        per_member = (self.block_mask_bytes[block] if self.stores_masks else 0) + \
            (SCALAR_BYTES if self.stores_scalars else 0)
        all_originals = b * sum(group_sizes)
        kinds, cost = [], b
        for g in group_sizes:
            masked = b + g * per_member
            if g >= 2 and masked < g * b:
                kinds.append("masked")
                cost += masked
            else:
                kinds.append("original")
                cost += g * b
        if "masked" not in kinds or all_originals <= cost:
            return BlockLayout(False, ("original",) * len(group_sizes), all_originals)
        return BlockLayout(True, tuple(kinds), cost)

    def block_cost(self, block: int, group_sizes: list[int]) -> int:
        return self.layout(block, group_sizes).nbytes

    def units(self, nbytes: int) -> float:
        return nbytes / self.unit_bytes
