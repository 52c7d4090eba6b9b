"""Oracles for the ``similarity`` planner's greedy order (FlexMerge Algorithm 1) on random Gram
matrices: every step is the global best pair under the linkage recomputed from scratch (no
Lance-Williams update), with the documented tie-break, and each block's merge tree is
``scipy.cluster.hierarchy.linkage`` on the distance ``1 - cos`` (min = complete, max = single,
avg = average linkage)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.cluster import hierarchy  # test-only: the dev extra installs scipy
from scipy.spatial.distance import squareform

from flexmerge.blocks import Block, BlockMap
from flexmerge.plan import make_plan
from flexmerge.similarity import cosine_from_gram
from flexmerge.sizes import CostModel

SCIPY_METHOD = {"min": "complete", "max": "single", "avg": "average"}
LINKAGES = sorted(SCIPY_METHOD)


def linkage_of(cos: np.ndarray, a: tuple[int, ...], b: tuple[int, ...], linkage: str) -> float:
    """Group similarity from scratch: min / max / mean of the cross-pair cosines."""
    cross = cos[np.ix_(a, b)]
    return float({"min": cross.min, "max": cross.max, "avg": cross.mean}[linkage]())


def random_grams(seed: int, n: int, nblocks: int, integer: bool) -> dict[str, np.ndarray]:
    """Gram matrices X X^T; small integer entries make ties, zero and repeated vectors common."""
    rng = np.random.default_rng(seed)
    grams = {}
    for i in range(nblocks):
        x = rng.integers(-1, 2, size=(n, 3)).astype(float) if integer else rng.normal(size=(n, 6))
        grams[f"b{i}"] = x @ x.T
    return grams


def plan_for(grams: dict, linkage: str, masked: bool = False, sizes=None):
    names = list(grams)
    sizes = sizes or [4 * (i + 3) for i in range(len(names))]
    bm = BlockMap([Block(b, [f"{b}.w"], numel=s // 4, nbytes=s) for b, s in zip(names, sizes)])
    cost = CostModel(bm, stores_masks=masked, param_numels={f"{b}.w": s // 4 for b, s in zip(names, sizes)})
    n = next(iter(grams.values())).shape[0]
    return make_plan(grams, cost, [f"t{i}" for i in range(n)], method={"name": "m"}, linkage=linkage), cost


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 7), nblocks=st.integers(1, 3),
       linkage=st.sampled_from(LINKAGES), integer=st.booleans(), masked=st.booleans())
def test_each_greedy_step_is_the_global_best_pair_recomputed_from_scratch(seed, n, nblocks, linkage, integer, masked):
    grams = random_grams(seed, n, nblocks, integer)
    plan, cost = plan_for(grams, linkage, masked)
    blocks = list(grams)
    cos = {b: cosine_from_gram(grams[b]) for b in blocks}
    groups = {b: [(t,) for t in range(n)] for b in blocks}
    index = {f"t{i}": i for i in range(n)}
    assert len(plan.steps) == nblocks * (n - 1)
    for k, step in enumerate(plan.steps):
        # every candidate (similarity, block, groups) under the linkage from scratch
        cands = [(linkage_of(cos[b], a, c, linkage), bi, a, c)
                 for bi, b in enumerate(blocks) for i, a in enumerate(groups[b]) for c in groups[b][i + 1:]]
        best = max(s for s, *_ in cands)
        a, c = (tuple(index[t] for t in g) for g in step.groups)
        chosen = linkage_of(cos[step.block], a, c, linkage)
        assert a in groups[step.block] and c in groups[step.block] and min(a) < min(c), k
        if linkage == "avg":  # Lance-Williams means round differently from a fresh mean
            assert chosen >= best - 1e-12 and step.similarity == pytest.approx(chosen, abs=1e-12), k
            near = [x for x in cands if x[0] >= best - 1e-9]
            if len(near) == 1:
                assert (blocks.index(step.block), a, c) == near[0][1:], k
        else:  # min / max of the same floats: exact, and ties go to the earliest block, then the
            # groups with the smallest task indices
            assert step.similarity == chosen == best, k
            first = min((bi, x, y) for s, bi, x, y in cands if s == best)
            assert (blocks.index(step.block), a, c) == first, k
        g = groups[step.block]
        g.remove(a)
        g.remove(c)
        g.append(tuple(sorted(a + c)))
        g.sort()
        bi = blocks.index(step.block)
        # sizes: the plan's running size is the sum of the blocks' exact costs
        size = sum(cost.block_cost(i, [len(x) for x in groups[b]]) for i, b in enumerate(blocks))
        assert step.size_bytes == size and step.size_units == size / cost.unit_bytes, k
        after = plan.grouping(k + 1)
        assert (after.groups, after.steps, after.size_bytes) == (groups, k + 1, size), k
    assert all(len(g) == 1 for g in groups.values())
    # the similarity planner fits a target with the shortest prefix whose size is within it
    assert (plan.planner, plan.fit) == ("similarity", "prefix")
    sizes = plan.sizes()
    for target in sorted(set(sizes) | {(a + b) // 2 for a, b in zip(sizes, sizes[1:])}):
        assert plan.at(nbytes=target).steps == min(k for k, s in enumerate(sizes) if s <= target), target
    start = plan.grouping(0)
    assert start.size_bytes == plan.start_bytes == cost.unit_bytes * n and start.size_units == n
    assert start.groups == {b: [(t,) for t in range(n)] for b in blocks}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 8), nblocks=st.integers(1, 3),
       linkage=st.sampled_from(LINKAGES))
def test_each_blocks_merge_tree_is_scipys_hierarchical_clustering(seed, n, nblocks, linkage):
    grams = random_grams(seed, n, nblocks, integer=False)  # continuous: no ties, one tree
    plan, _ = plan_for(grams, linkage)
    index = {f"t{i}": i for i in range(n)}
    for b, gram in grams.items():
        dist = 1.0 - cosine_from_gram(gram)
        np.fill_diagonal(dist, 0.0)
        z = hierarchy.linkage(squareform(dist, checks=False), method=SCIPY_METHOD[linkage])
        clusters = {i: frozenset([i]) for i in range(n)}
        want = []
        for row, (i, j, height, count) in enumerate(z):
            merged = clusters[int(i)] | clusters[int(j)]
            clusters[n + row] = merged
            want.append((frozenset([clusters[int(i)], clusters[int(j)]]), height))
        got = [(frozenset(frozenset(index[t] for t in g) for g in s.groups), 1.0 - s.similarity)
               for s in plan.steps if s.block == b]
        assert [m for m, _ in got] == [m for m, _ in want], (b, linkage)
        np.testing.assert_allclose([h for _, h in got], [h for _, h in want], rtol=0, atol=1e-9)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_ties_go_to_the_earliest_block_then_the_smallest_task_indices(linkage):
    """Identical blocks and tasks {0, 1} == {2, 3} (cos 1): the first block, then tasks 0 and 1."""
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    grams = {"b0": x @ x.T, "b1": x @ x.T}
    plan, _ = plan_for(grams, linkage, sizes=[40, 40])
    assert (plan.steps[0].block, plan.steps[0].groups) == ("b0", (["t0"], ["t1"]))
    assert (plan.steps[1].block, plan.steps[1].groups) == ("b0", (["t2"], ["t3"]))
    assert (plan.steps[2].block, plan.steps[2].groups) == ("b1", (["t0"], ["t1"]))
