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

``Plan.at(size)`` returns the grouping of the *shortest* prefix whose size is at most the target:
the fewest merges that fit the budget (every later step only removes accuracy).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .errors import FlexMergeError
from .io import write_json_atomic
from .similarity import cosine_from_gram
from .sizes import CostModel

PLAN_FORMAT = "flexmerge-plan"
PLAN_VERSION = 1
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

    def at(self, size=None, *, units=None, nbytes=None) -> Grouping:
        """The grouping of every block for a target size (units or bytes)."""
        return self.grouping(self.prefix_for(size, units=units, nbytes=nbytes))

    def grouping(self, steps: int) -> Grouping:
        """The grouping after the first ``steps`` merges."""
        index = {t: i for i, t in enumerate(self.tasks)}
        uf = {b: list(range(len(self.tasks))) for b in self.blocks}

        def find(parent, x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for step in self.steps[:steps]:
            parent = uf[step.block]
            a, b = (find(parent, index[g[0]]) for g in step.groups)
            parent[max(a, b)] = min(a, b)
        groups = {}
        for blk, parent in uf.items():
            members: dict[int, list[int]] = {}
            for t in range(len(self.tasks)):
                members.setdefault(find(parent, t), []).append(t)
            groups[blk] = sorted(tuple(m) for m in members.values())
        size = self.start_bytes if steps == 0 else self.steps[steps - 1].size_bytes
        return Grouping(groups, steps, size, self.units(size))

    # ---- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "tasks": self.tasks,
             "method": self.method, "linkage": self.linkage, "order": self.order, "seed": self.seed,
             "unit_bytes": self.unit_bytes,
             "start": {"size_bytes": self.start_bytes, "size_units": self.units(self.start_bytes)},
             "min": {"size_bytes": self.min_bytes, "size_units": self.min_units},
             "task_specific_bytes": self.task_specific_bytes,
             "blocks": [{"name": b, "bytes": nb, "mask_bytes": mb}
                        for b, nb, mb in zip(self.blocks, self.block_bytes, self.block_mask_bytes)],
             "steps": [asdict(s) | {"groups": [list(g) for g in s.groups]} for s in self.steps],
             "grams": self.grams}
        return d

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise FlexMergeError(f"{where} is not a flexmerge plan (no 'format: {PLAN_FORMAT}'); "
                                 "make one with 'flexmerge plan'")
        if d.get("version") != PLAN_VERSION:
            raise FlexMergeError(f"{where}: plan version {d.get('version')} is not supported "
                                 f"(expected {PLAN_VERSION}); re-run 'flexmerge plan'")
        try:
            steps = [MergeStep(s["block"], tuple(list(g) for g in s["groups"]), float(s["similarity"]),
                               int(s["size_bytes"]), float(s["size_units"])) for s in d["steps"]]
            return cls(tasks=list(d["tasks"]), blocks=[b["name"] for b in d["blocks"]],
                       block_bytes=[int(b["bytes"]) for b in d["blocks"]],
                       block_mask_bytes=[int(b.get("mask_bytes", 0)) for b in d["blocks"]],
                       start_bytes=int(d["start"]["size_bytes"]), unit_bytes=int(d["unit_bytes"]),
                       steps=steps, method=dict(d["method"]), linkage=d["linkage"], order=d["order"],
                       seed=int(d["seed"]), grams=d.get("grams", {}),
                       task_specific_bytes=d.get("task_specific_bytes", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise FlexMergeError(f"{where} is damaged ({exc!r} missing or invalid); re-run 'flexmerge plan'") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            with open(path) as fh:
                d = json.load(fh)
        except FileNotFoundError:
            raise FlexMergeError(f"plan file not found: {path}; make one with 'flexmerge plan'") from None
        except json.JSONDecodeError as exc:
            raise FlexMergeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                                 "re-run 'flexmerge plan'") from None
        return cls.from_dict(d, where=str(path))


_SIZE_RX = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(size: float | int | str) -> tuple[float | None, int | None]:
    """``2.5`` / ``"2.5"`` / ``"2.5u"`` -> units; ``"40MB"``, ``"123b"`` -> bytes."""
    if isinstance(size, bool):
        raise FlexMergeError(f"invalid size {size!r}")
    if isinstance(size, (int, float)):
        return float(size), None
    m = _SIZE_RX.match(str(size))
    if not m:
        raise FlexMergeError(f"invalid size {size!r}; give model units (e.g. 2.5) or bytes (e.g. 40MB)")
    value, unit = float(m.group(1)), m.group(2).lower()
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
              task_specific_bytes: dict[str, int] | None = None) -> Plan:
    """Build the whole trajectory from N units to the minimum from Gram matrices alone."""
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
                task_specific_bytes=dict(task_specific_bytes or {}))
