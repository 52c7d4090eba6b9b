"""Planner criteria: which (block, pair of groups) to merge next, from the Gram matrices alone.

Every planner builds a trajectory from N model units down to the minimum; :meth:`Plan.at
<flexmerge.plan.Plan.at>` then picks the grouping for a target size. Notation: block ``b``,
tasks ``i, j``, block task vectors ``tau_i^b``, the plan pass's Gram matrix
``G^b_ij = <tau_i^b, tau_j^b>``, a group ``A`` of tasks with ``g = |A|`` members and mean
``m_A = (1/g) sum_{i in A} tau_i^b``.

``similarity`` (the paper's criterion, FlexMerge Algorithm 1, Dhasade et al., ICLR 2026)
    merge the pair of highest linkage cosine similarity, whatever the merge saves. Implemented in
    :func:`flexmerge.plan.make_plan`; its plans are today's plans, step for step.

``distortion`` (size-aware, data-free)
    the predicted loss of a merge per byte it saves. A task served by group ``A`` in block ``b``
    sees its block vector replaced by ``m_A``; its error there is ``||tau_i^b - m_A||^2``. Each task
    is normalised by its whole task vector, ``w_i = 1 / sum_b G^b_ii``, so that tasks with small
    or large task vectors weigh alike and ``sum_b w_i ||tau_i^b - m||^2`` is task ``i``'s relative
    reconstruction error over the whole model. From the Gram matrix alone::

        D^b(A) = sum_{i in A} w_i ||tau_i^b - m_A||^2
               = sum_{i in A} w_i G_ii - (2/g) sum_{i in A} w_i sum_{j in A} G_ij
                 + (W_A / g^2) sum_{j,k in A} G_jk,            W_A = sum_{i in A} w_i

    (with all ``w_i`` equal this is ``w (sum_i G_ii - (1/g) sum_ij G_ij)``). The score of merging
    ``A`` and ``B`` in block ``b`` is::

        score = (D^b(A u B) - D^b(A) - D^b(B)) / saved^b(A, B)

    where ``saved^b`` is the bytes the merge removes under the method's storage rule
    (:class:`flexmerge.sizes.CostModel`; ``B_b`` bytes for plain methods, possibly 0 for a mask
    method's first merges). The lowest score goes first; merges that save nothing come after
    every merge that saves bytes, by increase of ``D``. For methods with a global transform (TIES
    trim, DARE drop) the Gram matrices are those of the transformed vectors, so ``D`` measures
    what the method actually merges. The merged direction is the mean; a method's scaling
    (``lambda``) is not part of ``D`` (it would charge a loss for merging identical vectors).

``hybrid`` (size-aware similarity)
    the same ratio, with each task's error measured relative to its *own block* vector,
    ``w^b_i = 1 / G^b_ii``, so that every block counts alike whatever its norm::

        D_h^b(A) = sum_{i in A} ||tau_i^b - m_A||^2 / ||tau_i^b||^2
        score = (D_h^b(A u B) - D_h^b(A) - D_h^b(B)) / saved^b(A, B)

    For two tasks of equal block norms ``D_h^b = 1 - cos_ij``: the paper's dissimilarity per byte
    saved, so a large block of nearly orthogonal task vectors (a word embedding) no longer waits
    behind every small similar block. A zero block vector gets weight 0 (it loses nothing).

Ties are broken deterministically: lowest score, then earliest block, then the groups with the
smallest task indices. Plans depend on the Gram matrices, the cost model and nothing else.

:func:`predicted_loss` scores any grouping by the ``distortion`` measure (the mean over tasks of
the relative reconstruction error; ``A(i, b)`` is task ``i``'s group in block ``b``; a mask
method's masks, which restore part of each task, are not counted)::

    L = (1/N) sum_i sum_b ||tau_i^b - m_{A(i,b)}||^2 / ||tau_i||^2

``auto`` (data-free choice per size)
    builds the trajectories of :data:`AUTO_CANDIDATES` and, for each target size, returns the
    candidate grouping (each fitted by its own rule) of lowest ``L``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import FlexMergeError

PLANNERS = ("similarity", "distortion", "hybrid", "auto")
"""Planner names: ``similarity`` is the paper's greedy criterion; ``distortion`` is the default
(:class:`flexmerge.config.MergeConfig`; the measurements behind it: docs/results/text8.md)."""

AUTO_CANDIDATES = (("distortion", "fill"), ("hybrid", "fill"), ("similarity", "prefix"))
"""The ``auto`` planner's candidates ``(planner, fit)``; the first is the plan's main trajectory."""


def check_planner(planner: str) -> str:
    if planner not in PLANNERS:
        raise FlexMergeError(f"unknown planner '{planner}'; use {', '.join(PLANNERS)}")
    return planner


def task_weights(grams: Sequence[np.ndarray], planner: str) -> list[np.ndarray]:
    """Per block, the weight ``w^b_i`` of each task's squared error (see the module docstring)."""
    grams = [np.asarray(g, dtype=np.float64) for g in grams]
    if planner == "distortion":
        total = sum(np.diag(g) for g in grams) if grams else np.zeros(0)
        w = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        return [w.copy() for _ in grams]
    if planner == "hybrid":
        out = []
        for g in grams:
            d = np.diag(g)
            out.append(np.divide(1.0, d, out=np.zeros_like(d), where=d > 0))
        return out
    raise FlexMergeError(f"planner '{planner}' has no task weights")


def group_distortion(gram: np.ndarray, w: np.ndarray, members: Sequence[int]) -> float:
    """``D(A) = sum_{i in A} w_i ||tau_i - m_A||^2`` from the Gram matrix (module docstring)."""
    idx = np.asarray(members, dtype=np.int64)
    g = len(idx)
    sub = np.asarray(gram, dtype=np.float64)[np.ix_(idx, idx)]
    wa = np.asarray(w, dtype=np.float64)[idx]
    return float((wa * np.diag(sub)).sum() - (2.0 / g) * (wa * sub.sum(axis=1)).sum()
                 + (wa.sum() / g ** 2) * sub.sum())


class GroupSums:
    """Groups of one block and the sums that give ``D`` of any union in O(1)::

        S[a, b] = sum_{i in a, j in b} G_ij        U[a, b] = sum_{i in a} w_i sum_{j in b} G_ij
        dw[a] = sum_{i in a} w_i G_ii              W[a] = sum_{i in a} w_i

    so ``D(a u b) = dw - (2/g) (U_aa + U_ab + U_ba + U_bb) + (W/g^2) (S_aa + 2 S_ab + S_bb)``.
    """

    def __init__(self, gram: np.ndarray, w: np.ndarray):
        g = np.asarray(gram, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        n = g.shape[0]
        self.S = g.copy()
        self.U = w[:, None] * g
        self.dw = w * np.diag(g)
        self.W = w.copy()
        self.count = np.ones(n)
        self.D = np.zeros(n)
        self.members: dict[int, list[int]] = {i: [i] for i in range(n)}
        self._best = None  # cached until this block merges

    @property
    def num_groups(self) -> int:
        return len(self.members)

    def reps(self) -> list[int]:
        return sorted(self.members)

    def pair_increase(self) -> tuple[list[int], np.ndarray]:
        """Reps and the matrix of ``D(a u b) - D(a) - D(b)`` over pairs of current groups."""
        r = np.fromiter(sorted(self.members), dtype=np.intp)
        rr = r[:, None]
        S, U = self.S[rr, r], self.U[rr, r]
        ds, du = np.diag(S), np.diag(U)
        cnt = self.count[r]
        g = cnt[:, None] + cnt[None, :]
        wsum = self.W[r][:, None] + self.W[r][None, :]
        dw = self.dw[r][:, None] + self.dw[r][None, :]
        uc = du[:, None] + du[None, :] + U + U.T
        sc = ds[:, None] + ds[None, :] + 2.0 * S
        d_union = dw - (2.0 / g) * uc + (wsum / g ** 2) * sc
        d = self.D[r]
        return list(r.tolist()), d_union - d[:, None] - d[None, :]

    def union_distortion(self, a: int, b: int) -> float:
        g = self.count[a] + self.count[b]
        uc = self.U[a, a] + self.U[a, b] + self.U[b, a] + self.U[b, b]
        sc = self.S[a, a] + 2.0 * self.S[a, b] + self.S[b, b]
        return float(self.dw[a] + self.dw[b] - (2.0 / g) * uc + ((self.W[a] + self.W[b]) / g ** 2) * sc)

    def merge(self, a: int, b: int) -> None:
        """Merge group ``b`` into ``a`` (a < b)."""
        self._best = None
        self.D[a] = self.union_distortion(a, b)
        for m in (self.S, self.U):
            m[a, :] += m[b, :]
            m[:, a] += m[:, b]
        self.dw[a] += self.dw[b]
        self.W[a] += self.W[b]
        self.count[a] += self.count[b]
        self.members[a] = sorted(self.members[a] + self.members.pop(b))


_TRIU: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _triu(k: int) -> tuple[np.ndarray, np.ndarray]:
    if k not in _TRIU:
        _TRIU[k] = np.triu_indices(k, 1)
    return _TRIU[k]


def best_in_block(cost, block: int, st: GroupSums, current: int):
    """``(key, a, b, increase, saved)`` of the block's best merge; ``key`` sorts ascending.

    ``key = (0, increase / saved)`` for merges that save bytes, ``(1, increase)`` for the rest."""
    if st._best is not None:
        return st._best
    reps, inc = st.pair_increase()
    k = len(reps)
    iu = _triu(k)  # pairs (x < y) in (x, y) order: smallest task indices first
    if not cost.masked and cost.block_bytes[block] > 0:  # every merge saves the block's bytes
        nbytes = cost.block_bytes[block]
        inc_pairs = inc[iu]
        ratio = inc_pairs / float(nbytes)
        i = int(np.argmin(ratio))  # argmin: the first of equal minima
        st._best = ((0, float(ratio[i])), reps[int(iu[0][i])], reps[int(iu[1][i])],
                    float(inc_pairs[i]), int(nbytes))
        return st._best
    if not cost.masked:
        saved = np.full((k, k), float(cost.block_bytes[block]))
    else:  # the saving depends on the two groups' sizes only (and the block's other groups)
        cnt = [len(st.members[r]) for r in reps]
        arr = np.asarray(cnt)
        base = k + 1 + max(cnt)
        codes = np.minimum.outer(arr, arr) * base + np.maximum.outer(arr, arr)
        saved = np.zeros((k, k))
        for code in np.unique(codes[iu]).tolist():
            sa, sb = divmod(code, base)
            after = list(cnt)
            after.remove(sa)
            after.remove(sb)
            after.append(sa + sb)
            saved[codes == code] = current - cost.block_cost(block, after)
    s_pairs, inc_pairs = saved[iu], inc[iu]
    gain = s_pairs > 0
    primary = np.where(gain, 0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        secondary = np.where(gain, inc_pairs / np.where(gain, s_pairs, 1.0), inc_pairs)
    cand = np.flatnonzero(primary == primary.min())
    i = int(cand[np.argmin(secondary[cand])])  # argmin: the first of equal minima
    x, y = int(iu[0][i]), int(iu[1][i])
    st._best = ((int(primary[i]), float(secondary[i])), reps[x], reps[y], float(inc_pairs[i]), int(s_pairs[i]))
    return st._best


def linkage_similarity(cos: np.ndarray, ga: Sequence[int], gb: Sequence[int], linkage: str) -> float:
    """Linkage cosine between two groups of original tasks (recorded in each step)."""
    cross = np.asarray(cos)[np.asarray(ga)[:, None], np.asarray(gb)]
    if linkage == "min":
        return float(cross.min())
    if linkage == "max":
        return float(cross.max())
    return float(cross.mean())


def size_aware_trajectory(grams: Sequence[np.ndarray], cost, planner: str):
    """Yield ``(block, a_members, b_members, group_sizes_after)`` for every merge of the plan, in
    order, by the ``distortion`` or ``hybrid`` criterion (module docstring)."""
    weights = task_weights(grams, planner)
    states = [GroupSums(g, w) for g, w in zip(grams, weights)]
    costs = [cost.block_cost(i, [1] * st.num_groups) for i, st in enumerate(states)]
    def entry(bi):
        st = states[bi]
        if st.num_groups < 2:
            return None
        key, a, b, _inc, _saved = best_in_block(cost, bi, st, costs[bi])
        return (key, bi, a, b)

    entries = [entry(bi) for bi in range(len(states))]
    total = sum(st.num_groups - 1 for st in states)
    for _ in range(total):
        _, bi, a, b = min(e for e in entries if e is not None)
        st = states[bi]
        ga, gb = list(st.members[a]), list(st.members[b])
        st.merge(a, b)
        sizes_after = [len(st.members[r]) for r in st.reps()]
        costs[bi] = cost.block_cost(bi, sizes_after)
        entries[bi] = entry(bi)
        yield bi, ga, gb, sizes_after


def predicted_loss(grams: dict, groups: dict[str, list[tuple[int, ...]]]) -> float:
    """Mean over tasks of the relative reconstruction error ``sum_b ||tau_i^b - m_{A(i,b)}||^2 /
    ||tau_i||^2`` of a grouping (the ``distortion`` measure, module docstring); 0 at size N."""
    names = list(groups)
    gs = [np.asarray(grams[b], dtype=np.float64) for b in names]
    if not gs:
        return 0.0
    w = task_weights(gs, "distortion")[0]
    total = 0.0
    for g, blk in zip(gs, names):
        for members in groups[blk]:
            if len(members) > 1:
                total += group_distortion(g, w, members)
    return total / g.shape[0]
