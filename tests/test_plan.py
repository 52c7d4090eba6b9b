import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flexmerge.blocks import Block, BlockMap
from flexmerge.errors import FlexMergeError
from flexmerge.plan import Plan, make_plan, parse_size
from flexmerge.sizes import CostModel


def blockmap(*sizes):
    return BlockMap([Block(f"b{i}", [f"b{i}.w"], numel=s // 4, nbytes=s) for i, s in enumerate(sizes)])


def grams_from_cos(cos):
    return np.asarray(cos, dtype=float)  # unit-norm task vectors: Gram = cosine


COS3 = [[1.0, 0.9, 0.1],
        [0.9, 1.0, 0.5],
        [0.1, 0.5, 1.0]]


def test_linkages_by_hand():
    bm = blockmap(100)
    cost = CostModel(bm)
    for linkage, second in (("min", 0.1), ("max", 0.5), ("avg", (0.1 + 0.5) / 2)):
        p = make_plan({"b0": grams_from_cos(COS3)}, cost, ["a", "b", "c"], method={"name": "x"},
                      linkage=linkage)
        assert [s.groups for s in p.steps] == [(["a"], ["b"]), (["a", "b"], ["c"])]
        assert p.steps[0].similarity == pytest.approx(0.9)
        assert p.steps[1].similarity == pytest.approx(second)
        assert [s.size_bytes for s in p.steps] == [200, 100]


def test_greedy_picks_most_similar_block_and_sizes_are_exact():
    bm = blockmap(100, 40)
    cos_low = [[1.0, 0.2], [0.2, 1.0]]
    cos_high = [[1.0, 0.8], [0.8, 1.0]]
    p = make_plan({"b0": grams_from_cos(cos_low), "b1": grams_from_cos(cos_high)}, CostModel(bm),
                  ["x", "y"], method={"name": "m"})
    assert [s.block for s in p.steps] == ["b1", "b0"]
    assert p.start_bytes == 280 and [s.size_bytes for s in p.steps] == [240, 140]
    assert p.max_units == 2.0 and p.min_units == 1.0
    assert p.steps[0].size_units == pytest.approx(240 / 140)


def test_at_gives_shortest_prefix_within_target_and_range_errors():
    bm = blockmap(100, 40)
    p = make_plan({"b0": np.eye(2), "b1": np.ones((2, 2))}, CostModel(bm), ["x", "y"], method={"name": "m"})
    assert p.at(2.0).steps == 0
    assert p.at(240 / 140).steps == 1          # exactly the first step's size
    assert p.at(1.9).steps == 1                 # 240 bytes <= 1.9 * 140 = 266
    assert p.at(1.5).steps == 2
    assert p.at("240b").steps == 1
    g = p.at(1.0)
    assert g.groups == {"b0": [(0, 1)], "b1": [(0, 1)]} and g.size_bytes == 140
    with pytest.raises(FlexMergeError, match="possible range 1-2 units"):
        p.at(0.99)
    with pytest.raises(FlexMergeError, match="possible range"):
        p.at(2.5)
    with pytest.raises(FlexMergeError, match="invalid size"):
        p.at("big")


def test_parse_size():
    assert parse_size("2.5") == (2.5, None)
    assert parse_size("40MB") == (None, 40_000_000)
    assert parse_size("1KiB") == (None, 1024)


def test_orders_left_right_right_left_random():
    bm = blockmap(10, 10, 10)
    rng = np.random.default_rng(0)
    grams = {}
    for b in ("b0", "b1", "b2"):
        x = rng.normal(size=(4, 6))
        grams[b] = x @ x.T
    kw = dict(method={"name": "m"})
    tasks = ["t0", "t1", "t2", "t3"]
    lr = make_plan(grams, CostModel(bm), tasks, order="left-right", **kw)
    assert [s.block for s in lr.steps] == ["b0"] * 3 + ["b1"] * 3 + ["b2"] * 3
    rl = make_plan(grams, CostModel(bm), tasks, order="right-left", **kw)
    assert [s.block for s in rl.steps] == ["b2"] * 3 + ["b1"] * 3 + ["b0"] * 3
    r1 = make_plan(grams, CostModel(bm), tasks, order="random", seed=1, **kw)
    r1b = make_plan(grams, CostModel(bm), tasks, order="random", seed=1, **kw)
    r2 = make_plan(grams, CostModel(bm), tasks, order="random", seed=2, **kw)
    assert [s.groups for s in r1.steps] == [s.groups for s in r1b.steps]
    assert [(s.block, s.groups) for s in r1.steps] != [(s.block, s.groups) for s in r2.steps]
    with pytest.raises(FlexMergeError, match="unknown order"):
        make_plan(grams, CostModel(bm), tasks, order="zigzag", **kw)


def test_plan_json_round_trip(tmp_path):
    bm = blockmap(100, 40)
    p = make_plan({"b0": np.array(COS3), "b1": np.eye(3)}, CostModel(bm), ["a", "b", "c"],
                  method={"name": "m", "lambda": 1.0})
    p.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    for s in d["steps"]:
        assert {"block", "groups", "similarity", "size_bytes", "size_units"} <= set(s)
    q = Plan.load(tmp_path / "plan.json")
    assert q.steps == p.steps and q.at(2.0) == p.at(2.0)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FlexMergeError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_mask_cost_model_keeps_originals_when_cheaper():
    # block of 64 bytes fp32 = 16 elements -> masks 2 bytes each
    bm = BlockMap([Block("b0", ["w"], numel=16, nbytes=64)])
    cost = CostModel(bm, stores_masks=True, param_numels={"w": 16})
    # 1+1 merge: originals (128) beat pretrained + merged + 2 masks (64 + 64 + 4 = 132)
    lay = cost.layout(0, [2, 1])
    assert lay.kinds == ("original", "original") and not lay.store_base and lay.nbytes == 192
    lay = cost.layout(0, [3])
    assert lay.kinds == ("masked",) and lay.store_base and lay.nbytes == 64 + 64 + 3 * 2


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 6), nblocks=st.integers(1, 4), seed=st.integers(0, 10**6),
       masked=st.booleans(), linkage=st.sampled_from(["min", "max", "avg"]),
       order=st.sampled_from(["greedy", "left-right", "right-left", "random"]))
def test_sizes_never_grow_and_end_at_one_group(n, nblocks, seed, masked, linkage, order):
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(1, 50)) * 4 for _ in range(nblocks)]
    bm = BlockMap([Block(f"b{i}", [f"w{i}"], numel=s // 4, nbytes=s) for i, s in enumerate(sizes)])
    cost = CostModel(bm, stores_masks=masked, param_numels={f"w{i}": s // 4 for i, s in enumerate(sizes)})
    grams = {}
    for i in range(nblocks):
        x = rng.normal(size=(n, 5))
        grams[f"b{i}"] = x @ x.T
    tasks = [f"t{i}" for i in range(n)]
    p = make_plan(grams, cost, tasks, method={"name": "m"}, linkage=linkage, order=order, seed=seed)
    seq = p.sizes()
    assert all(b <= a for a, b in zip(seq, seq[1:]))
    assert seq[0] == n * sum(sizes)
    assert len(p.steps) == nblocks * (n - 1)
    final = p.grouping(len(p.steps))
    assert all(len(g) == 1 for g in final.groups.values())
    if not masked:
        assert seq[-1] == sum(sizes)
    # determinism
    q = make_plan(grams, cost, tasks, method={"name": "m"}, linkage=linkage, order=order, seed=seed)
    assert q.steps == p.steps
