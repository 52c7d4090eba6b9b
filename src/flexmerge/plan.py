"""Merge plans: ordered block-group merges from N model units down to the minimum.

Greedy order (FlexMerge, Dhasade et al., ICLR 2026, Algorithm 1): at every step merge the
(block, pair of groups) with the highest group similarity. Group similarity uses a linkage over
the precomputed cosine matrix of the block's *original* task vectors:

* ``min`` (paper default, complete linkage): ``sim(A, B) = min_{i in A, j in B} cos_ij``
* ``max`` (single linkage) and ``avg`` (UPGMA, mean over all cross pairs).

After a merge the linkage is updated Lance-Williams style from the matrix alone; tensors are never
read again. Ties are broken deterministically: highest similarity, then earliest block, then the
groups with the smallest task indices. Ablation orders: ``left-right`` / ``right-left`` merge one
block fully (most similar pair first) before the next; ``random`` picks a uniformly random
(block, pair of groups) at each step from a seeded generator.

``Plan.at(size)`` never exceeds the target. With ``fit = "prefix"`` (the ``similarity`` planner's
default) it returns the grouping of the *shortest* prefix whose size is at most the target: the
fewest merges that fit the budget (every later step only removes accuracy). With ``fit = "fill"``
(the size-aware planners' default) it walks the trajectory and, where a step would cross below the
target, records that ending, skips the step together with every later step of its block, and goes
on taking the steps that stay above the target; of the endings (the first is the prefix's) it
returns the one of lowest predicted loss (:func:`flexmerge.planners.predicted_loss`; ties: the
larger size, then the earlier). Landing closest is not the rule: on the 4-task demo the closest
ending below 3.5 units skips the embedding merge and merges many small blocks instead, at 18
times the predicted loss (0.227 against 0.012). Blocks are independent, so every block's steps stay a prefix of its own steps
and every size is exact. Planners other than
the paper's greedy criterion are in :mod:`flexmerge.planners`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .errors import FlexMergeError
from .outputs import json_format_of, write_json_atomic
from .plan_file import FITS, PLAN_FORMAT, PLAN_VERSION, PlanFile, read_plan
from .similarity import cosine_from_gram
from .sizes import CostModel

_EPS = 1e-9


@dataclass
class MergeStep:
    block: str
    groups: tuple[list[str], list[str]]
    similarity: float
    size_bytes: int
    size_units: float


@dataclass
class Grouping:
    """Per-block groups (tuples of task indices) after ``steps`` merges, and the size."""

    groups: dict[str, list[tuple[int, ...]]]
    steps: int
    size_bytes: int
    size_units: float
    planner: str | None = None  # for an ``auto`` plan: the candidate chosen at this size


@dataclass
class Plan:
    tasks: list[str]
    blocks: list[str]
    block_bytes: list[int]
    block_mask_bytes: list[int]
    start_bytes: int
    unit_bytes: int
    steps: list[MergeStep]
    method: dict
    linkage: str
    order: str
    seed: int
    grams: dict[str, list[list[float]]] = field(repr=False, default_factory=dict)
    task_specific_bytes: dict[str, int] = field(default_factory=dict)
    planner: str = "similarity"
    fit: str = "prefix"
    alternatives: dict[str, dict] = field(repr=False, default_factory=dict)
    """``auto`` plans: the other candidates, ``{planner: {"fit": fit, "steps": [MergeStep]}}``."""

    # ---- sizes --------------------------------------------------------------------------
    @property
    def max_bytes(self) -> int:
        return self.start_bytes

    @property
    def min_bytes(self) -> int:
        return self.steps[-1].size_bytes if self.steps else self.start_bytes

    def units(self, nbytes: int) -> float:
        return nbytes / self.unit_bytes

    @property
    def min_units(self) -> float:
        return self.units(self.min_bytes)

    @property
    def max_units(self) -> float:
        return self.units(self.max_bytes)

    def sizes(self) -> list[int]:
        return [self.start_bytes] + [s.size_bytes for s in self.steps]

    def target_bytes(self, size: float | int | str | None = None, *, units: float | None = None,
                     nbytes: int | None = None) -> int:
        """Resolve a target (units as a number, or a string like ``"2.5"``, ``"40MB"``, ``"123b"``)."""
        if size is not None:
            units, nbytes = parse_size(size)
        if (units is None) == (nbytes is None):
            raise FlexMergeError("give the target size either in model units or in bytes")
        if units is not None:
            if not math.isfinite(units):
                raise FlexMergeError(f"size {units} is not a number; give e.g. --size 2.5")
            target = units * self.unit_bytes
            label = f"{units:g} units"
        else:
            target = float(nbytes)
            label = f"{nbytes} bytes"
        lo, hi = self.min_bytes, self.max_bytes
        tol = _EPS * self.unit_bytes
        if target < lo - tol or target > hi + tol:
            raise FlexMergeError(
                f"size {label} is outside the possible range {self.min_units:.6g}-{self.max_units:.6g} "
                f"units ({lo}-{hi} bytes) for {len(self.tasks)} tasks with method "
                f"'{self.method.get('name')}'; choose a size in that range")
        return int(math.floor(target + tol))

    def prefix_for(self, size=None, *, units=None, nbytes=None) -> int:
        """Number of steps of the shortest prefix whose size is at most the target."""
        target = self.target_bytes(size, units=units, nbytes=nbytes)
        sizes = self.sizes()
        for k, s in enumerate(sizes):
            if s <= target:
                return k
        return len(sizes) - 1  # unreachable: target >= min_bytes

    def at(self, size=None, *, units=None, nbytes=None, fit: str | None = None) -> Grouping:
        """The grouping of every block for a target size (units or bytes), never above it;
        ``fit`` (default: the plan's) ``"prefix"`` or ``"fill"`` (module docstring)."""
        if self.planner == "auto" and fit is None:
            return self._auto_at(self.target_bytes(size, units=units, nbytes=nbytes))
        fit = fit or self.fit
        if fit not in FITS:
            raise FlexMergeError(f"unknown fit '{fit}'; use prefix or fill")
        if fit == "prefix":
            return self.grouping(self.prefix_for(size, units=units, nbytes=nbytes))
        return self.grouping_of(self.fill_steps(self.target_bytes(size, units=units, nbytes=nbytes)))

    def candidates(self) -> dict[str, "Plan"]:
        """An ``auto`` plan's candidate trajectories as plans of their own (first: the main one)."""
        from dataclasses import replace

        from .planners import AUTO_CANDIDATES

        main = AUTO_CANDIDATES[0][0]
        out = {main: replace(self, planner=main, alternatives={})}
        for name, alt in self.alternatives.items():
            out[name] = replace(self, planner=name, fit=alt["fit"], steps=list(alt["steps"]), alternatives={})
        return out

    def _auto_at(self, target: int) -> Grouping:
        """The candidate grouping of lowest predicted loss (:func:`flexmerge.planners.predicted_loss`)
        at ``target`` bytes; ties go to the earlier candidate."""
        from .planners import predicted_loss

        best = None
        for name, cand in self.candidates().items():
            g = cand.at(nbytes=target)
            loss = predicted_loss(self.grams, g.groups)
            if best is None or loss < best[0]:
                best = (loss, g, name)
        best[1].planner = best[2]
        return best[1]

    def fill_steps(self, target: int) -> list[int]:
        """Indices of the steps the ``fill`` rule takes for ``target`` bytes (module docstring)."""
        from .planners import predicted_loss

        sizes = self.sizes()
        if sizes[0] <= target:
            return []
        frozen: set[str] = set()
        taken: list[int] = []
        size = sizes[0]
        endings: list[tuple[int, list[int]]] = []
        for k, step in enumerate(self.steps):
            if step.block in frozen:
                continue
            new = size + sizes[k + 1] - sizes[k]  # the block's own steps so far are all taken
            if new > target:
                taken.append(k)
                size = new
                continue
            endings.append((new, taken + [k]))
            if new == target:
                break
            frozen.add(step.block)
        assert endings  # the full trajectory reaches min_bytes <= target
        if len(endings) == 1 or not self.grams:
            return max(endings, key=lambda e: e[0])[1]  # the first of the largest
        best = None
        for new, idx in endings:  # lowest predicted loss; ties: larger, then earlier
            loss = predicted_loss(self.grams, self._groups([self.steps[k] for k in idx]))
            if best is None or (loss, -new) < best[0]:
                best = ((loss, -new), idx)
        return best[1]

    def grouping_of(self, indices: Iterable[int]) -> Grouping:
        """The grouping after the steps ``indices`` (each block's must be a prefix of its steps)."""
        indices = sorted(indices)
        if indices == list(range(len(indices))):
            return self.grouping(len(indices))
        sizes = self.sizes()
        size = sizes[0] + sum(sizes[k + 1] - sizes[k] for k in indices)
        g = self._groups([self.steps[k] for k in indices])
        return Grouping(g, len(indices), size, self.units(size))

    def grouping(self, steps: int) -> Grouping:
        """The grouping after the first ``steps`` merges."""
        groups = self._groups(self.steps[:steps])
        size = self.start_bytes if steps == 0 else self.steps[steps - 1].size_bytes
        return Grouping(groups, steps, size, self.units(size))

    def _groups(self, steps: Iterable[MergeStep]) -> dict[str, list[tuple[int, ...]]]:
        index = {t: i for i, t in enumerate(self.tasks)}
        uf = {b: list(range(len(self.tasks))) for b in self.blocks}

        def find(parent, x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for step in steps:
            parent = uf[step.block]
            a, b = (find(parent, index[g[0]]) for g in step.groups)
            parent[max(a, b)] = min(a, b)
        groups = {}
        for blk, parent in uf.items():
            members: dict[int, list[int]] = {}
            for t in range(len(self.tasks)):
                members.setdefault(find(parent, t), []).append(t)
            groups[blk] = sorted(tuple(m) for m in members.values())
        return groups

    # ---- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "tasks": self.tasks,
             "method": self.method, "planner": self.planner, "fit": self.fit,
             "linkage": self.linkage, "order": self.order, "seed": self.seed,
             "unit_bytes": self.unit_bytes,
             "start": {"size_bytes": self.start_bytes, "size_units": self.units(self.start_bytes)},
             "min": {"size_bytes": self.min_bytes, "size_units": self.min_units},
             "task_specific_bytes": self.task_specific_bytes,
             "blocks": [{"name": b, "bytes": nb, "mask_bytes": mb}
                        for b, nb, mb in zip(self.blocks, self.block_bytes, self.block_mask_bytes)],
             "steps": [asdict(s) | {"groups": [list(g) for g in s.groups]} for s in self.steps],
             "grams": self.grams}
        if self.alternatives:
            d["alternatives"] = {k: {"fit": v["fit"], "steps": [asdict(x) | {"groups": [list(g) for g in x.groups]}
                                                                for x in v["steps"]]}
                                 for k, v in self.alternatives.items()}
        return d

    def save(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write the plan as JSON; an existing file is replaced only if it is a flexmerge plan."""
        write_json_atomic(path, self.to_dict(), what="plan file", force=force, hint="choose a new file name",
                          replaceable=lambda p: json_format_of(p) == PLAN_FORMAT)

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        """A plan from its JSON form, checked against :class:`PlanFile` (every violation is one
        line naming the field)."""
        f = PlanFile.check(d, where)
        def steps_of(entries):
            return [MergeStep(s.block, (list(s.groups[0]), list(s.groups[1])), float(s.similarity),
                              int(s.size_bytes), float(s.size_units)) for s in entries]

        steps = steps_of(f.steps)
        alternatives = {k: {"fit": v.fit, "steps": steps_of(v.steps)} for k, v in f.alternatives.items()}
        return cls(tasks=list(f.tasks), blocks=[b.name for b in f.blocks],
                   block_bytes=[b.bytes for b in f.blocks], block_mask_bytes=[b.mask_bytes for b in f.blocks],
                   start_bytes=f.start.size_bytes, unit_bytes=f.unit_bytes, steps=steps,
                   method=dict(f.method), linkage=f.linkage, order=f.order, seed=f.seed,
                   grams={k: [list(r) for r in v] for k, v in f.grams.items()},
                   task_specific_bytes=dict(f.task_specific_bytes), planner=f.planner, fit=f.fit,
                   alternatives=alternatives)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """A plan read from ``path`` (:func:`flexmerge.plan_file.read_plan`) and checked."""
        return cls.from_dict(read_plan(path), where=str(path))


_SIZE_RX = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(size: float | int | str) -> tuple[float | None, int | None]:
    """``2.5`` / ``"2.5"`` / ``"2.5u"`` -> units; ``"40MB"``, ``"123b"`` -> bytes."""
    hint = "give model units (e.g. 2.5) or bytes (e.g. 40MB)"
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise FlexMergeError(f"invalid size {size!r}; {hint}")
    if isinstance(size, (int, float)):
        try:
            value = float(size)
        except OverflowError:  # an int beyond float range
            value = math.inf
        unit = ""
    else:
        m = _SIZE_RX.match(size)
        if not m:
            raise FlexMergeError(f"invalid size {size[:40]!r}; {hint}")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value):  # sizes <= 0 are left to the range checks, which give the range
        raise FlexMergeError(f"invalid size {size[:40] if isinstance(size, str) else value!r}: it must be a finite "
                             f"number; {hint}")
    if unit in ("", "u", "units", "x"):
        return value, None
    if unit in _BYTE_UNITS:
        return None, int(round(value * _BYTE_UNITS[unit]))
    raise FlexMergeError(f"invalid size unit '{m.group(2)}' in {size!r}; use units (2.5) or B, KB, MB, GB, KiB, MiB, GiB")


# ------------------------------------------------------------------------------------------
# planning


class _BlockState:
    """Groups of one block and their pairwise linkage similarities."""

    def __init__(self, cos: np.ndarray, linkage: str):
        n = cos.shape[0]
        self.linkage = linkage
        self.sim = cos.astype(np.float64).copy()
        self.members: dict[int, list[int]] = {i: [i] for i in range(n)}  # rep -> task indices
        self._best: tuple[float, int, int] | None = None  # cached until this block merges

    @property
    def num_groups(self) -> int:
        return len(self.members)

    def best_pair(self) -> tuple[float, int, int] | None:
        """Most similar pair of groups ``(similarity, a, b)``; ties go to the first pair in
        (a, b) order. Only a merge in this block changes it, so it is cached until then."""
        if self._best is None:
            self._best = self._find_best_pair()
        return self._best

    def _find_best_pair(self) -> tuple[float, int, int] | None:
        reps = sorted(self.members)
        best = None
        for ai, a in enumerate(reps):
            for b in reps[ai + 1:]:
                s = self.sim[a, b]
                if best is None or s > best[0]:
                    best = (float(s), a, b)
        return best

    def pairs(self) -> list[tuple[int, int]]:
        reps = sorted(self.members)
        return [(a, b) for i, a in enumerate(reps) for b in reps[i + 1:]]

    def merge(self, a: int, b: int) -> None:
        """Merge group ``b`` into ``a`` (a < b) and update linkage rows (Lance-Williams)."""
        self._best = None
        na, nb = len(self.members[a]), len(self.members[b])
        for c in self.members:
            if c in (a, b):
                continue
            if self.linkage == "min":
                v = min(self.sim[a, c], self.sim[b, c])
            elif self.linkage == "max":
                v = max(self.sim[a, c], self.sim[b, c])
            else:  # avg (UPGMA): size-weighted mean of cross-pair averages
                v = (na * self.sim[a, c] + nb * self.sim[b, c]) / (na + nb)
            self.sim[a, c] = self.sim[c, a] = v
        self.members[a] = sorted(self.members[a] + self.members.pop(b))


def make_plan(grams: dict[str, np.ndarray], cost: CostModel, tasks: Sequence[str], *,
              method: dict, linkage: str = "min", order: str = "greedy", seed: int = 0,
              task_specific_bytes: dict[str, int] | None = None, planner: str = "similarity",
              fit: str | None = None) -> Plan:
    """Build the whole trajectory from N units to the minimum from Gram matrices alone.

    ``planner``: ``similarity`` (the paper's greedy, with ``order`` and ``linkage``) or a
    size-aware criterion of :mod:`flexmerge.planners` (greedy only; ``linkage`` then only labels
    the similarity recorded in each step). ``fit``: how :meth:`Plan.at` fits a target (default
    ``prefix`` for ``similarity``, ``fill`` for the others)."""
    from .planners import check_planner, linkage_similarity, size_aware_trajectory

    check_planner(planner)
    if planner == "auto":
        from .planners import AUTO_CANDIDATES

        kw = dict(method=method, linkage=linkage, order=order, seed=seed, task_specific_bytes=task_specific_bytes)
        if order != "greedy":
            raise FlexMergeError(f"order '{order}' is an ablation of the similarity planner; use "
                                 "planner similarity with it, or order greedy with planner auto")
        subs = [make_plan(grams, cost, tasks, planner=name, fit=f, **kw) for name, f in AUTO_CANDIDATES]
        main = subs[0]
        main.planner = "auto"
        main.alternatives = {p.planner: {"fit": p.fit, "steps": p.steps} for p in subs[1:]}
        return main
    fit = fit or ("prefix" if planner == "similarity" else "fill")
    if fit not in FITS:
        raise FlexMergeError(f"unknown fit '{fit}'; use prefix or fill")
    if planner != "similarity" and order != "greedy":
        raise FlexMergeError(f"order '{order}' is an ablation of the similarity planner; use "
                             f"planner similarity with it, or order greedy with planner {planner}")
    if linkage not in ("min", "max", "avg"):
        raise FlexMergeError(f"unknown linkage '{linkage}'; use min, max or avg")
    if order not in ("greedy", "left-right", "right-left", "random"):
        raise FlexMergeError(f"unknown order '{order}'; use greedy, left-right, right-left or random")
    blocks = [b.name for b in cost.blockmap.blocks]
    n = len(tasks)
    states = [_BlockState(cosine_from_gram(np.asarray(grams[b])), linkage) for b in blocks]
    group_sizes = [[1] * n for _ in blocks]
    costs = [cost.block_cost(i, group_sizes[i]) for i in range(len(blocks))]
    start = sum(costs)
    size = start
    steps: list[MergeStep] = []
    rng = np.random.default_rng(seed)

    def candidates_greedy(indices: Iterable[int]):
        best = None
        for bi in indices:
            st = states[bi]
            if st.num_groups < 2:
                continue
            p = st.best_pair()
            key = (p[0], -bi, -p[1], -p[2])
            if best is None or key > best[0]:
                best = (key, bi, p[1], p[2], p[0])
        return best

    sequence = {"left-right": list(range(len(blocks))),
                "right-left": list(range(len(blocks)))[::-1]}.get(order)
    total_steps = len(blocks) * (n - 1)
    if planner != "similarity":
        gram_list = [np.asarray(grams[b], dtype=np.float64) for b in blocks]
        cos_list = [cosine_from_gram(g) for g in gram_list]
        for bi, ia, ib, sizes_after in size_aware_trajectory(gram_list, cost, planner):
            new_cost = cost.block_cost(bi, sizes_after)
            size += new_cost - costs[bi]
            costs[bi] = new_cost
            s = linkage_similarity(cos_list[bi], ia, ib, linkage)
            steps.append(MergeStep(blocks[bi], ([tasks[t] for t in ia], [tasks[t] for t in ib]), s,
                                   int(size), size / cost.unit_bytes))
        total_steps = 0
    for _ in range(total_steps):
        if order == "greedy":
            _, bi, a, b, s = candidates_greedy(range(len(blocks)))
        elif order == "random":
            options = [(bi, a, b) for bi, st in enumerate(states) for (a, b) in st.pairs()]
            bi, a, b = options[int(rng.integers(len(options)))]
            s = float(states[bi].sim[a, b])
        else:
            bi = next(i for i in sequence if states[i].num_groups > 1)
            _, bi, a, b, s = candidates_greedy([bi])
        st = states[bi]
        ga = [tasks[t] for t in st.members[a]]
        gb = [tasks[t] for t in st.members[b]]
        st.merge(a, b)
        group_sizes[bi] = [len(m) for _, m in sorted(st.members.items())]
        new_cost = cost.block_cost(bi, group_sizes[bi])
        size += new_cost - costs[bi]
        costs[bi] = new_cost
        steps.append(MergeStep(blocks[bi], (ga, gb), float(s), int(size), size / cost.unit_bytes))
    return Plan(tasks=list(tasks), blocks=blocks, block_bytes=list(cost.block_bytes),
                block_mask_bytes=list(cost.block_mask_bytes), start_bytes=int(start),
                unit_bytes=cost.unit_bytes, steps=steps, method=dict(method), linkage=linkage,
                order=order, seed=int(seed),
                grams={b: np.asarray(grams[b]).tolist() for b in blocks},
                task_specific_bytes=dict(task_specific_bytes or {}), planner=planner, fit=fit)
