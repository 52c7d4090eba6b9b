"""CostModel by hand: the storage rule of :mod:`flexmerge.sizes` at its boundaries (ties, scalars
without masks, groups whose masks cost more than their originals)."""

from flexmerge.blocks import Block, BlockMap
from flexmerge.sizes import BlockLayout, CostModel, mask_bytes


def one_block(nbytes: int, numel: int) -> BlockMap:
    return BlockMap([Block("b0", ["w"], numel=numel, nbytes=nbytes)])


def test_plain_cost_and_units():
    bm = BlockMap([Block("b0", ["w0"], numel=25, nbytes=100), Block("b1", ["w1"], numel=10, nbytes=40)])
    cost = CostModel(bm)
    assert cost.block_mask_bytes == [0, 0] and cost.unit_bytes == 140
    assert cost.layout(0, [2, 1, 1]) == BlockLayout(False, ("merged", "original", "original"), 300)
    assert cost.block_cost(1, [4]) == 40
    assert cost.units(280) == 2.0 and cost.units(70) == 0.5


def test_mask_bytes_round_up_per_tensor():
    assert [mask_bytes(n) for n in (1, 8, 9, 16)] == [1, 1, 2, 2]
    bm = BlockMap([Block("b0", ["a", "b"], numel=18, nbytes=72)])
    assert CostModel(bm, stores_masks=True, param_numels={"a": 9, "b": 9}).block_mask_bytes == [4]


def test_scalars_without_masks_cost_four_bytes_per_member():
    cost = CostModel(one_block(64, 16), stores_scalars=True, param_numels={"w": 16})
    # pretrained 64 + merged 64 + 3 scalars
    assert cost.layout(0, [3]) == BlockLayout(True, ("masked",), 64 + 64 + 3 * 4)


def test_ties_keep_the_originals():
    # 8-byte block, 4-byte scalars: a group of 2 costs 8 + 2 * 4 = 16 masked = 16 as originals
    cost = CostModel(one_block(8, 2), stores_scalars=True, param_numels={"w": 2})
    assert cost.layout(0, [2, 10]) == BlockLayout(True, ("original", "masked"), 8 + 16 + (8 + 40))
    # a group of 4: pretrained 8 + masked 8 + 16 = 32 = four originals
    assert cost.layout(0, [4]) == BlockLayout(False, ("original",), 32)


def test_groups_whose_masks_cost_more_than_their_originals_keep_them():
    # one float32 element with a 1-byte mask and a scalar: 4 + 2 * 5 = 14 > 8 bytes of originals
    cost = CostModel(one_block(4, 1), stores_masks=True, stores_scalars=True, param_numels={"w": 1})
    assert cost.layout(0, [2]) == BlockLayout(False, ("original",), 8)
    assert cost.layout(0, [1, 1]) == BlockLayout(False, ("original", "original"), 8)
    big = CostModel(one_block(64, 16), stores_masks=True, stores_scalars=True, param_numels={"w": 16})
    # pretrained + (merged + 2 masks and scalars) + one original = 64 + 76 + 64 > 3 originals
    assert big.layout(0, [2, 1]).kinds == ("original", "original")
    assert big.layout(0, [3, 1]) == BlockLayout(True, ("masked", "original"), 64 + (64 + 3 * 6) + 64)


def test_pairs_are_masked_when_that_is_cheaper():
    cost = CostModel(one_block(64, 16), stores_masks=True, param_numels={"w": 16})
    # pretrained 64 + two groups of (merged 64 + 2 masks of 2 bytes) = 200 < 4 originals (256)
    assert cost.layout(0, [2, 2]) == BlockLayout(True, ("masked", "masked"), 200)
