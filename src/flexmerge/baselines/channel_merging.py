"""Channel Merging baseline (Zhang et al., "Channel Merging: Preserving Specialization for Merged
Experts", AAAI 2025), in the per-tensor form that the FlexMerge paper compares against.

For a target of ``k`` model units (an integer, 1 <= k <= N): for every mergeable tensor, cluster
the N tasks' task vectors of that tensor into ``k`` clusters by k-means with cosine distance, then
merge within each cluster by task arithmetic, ``theta_0 + lambda * mean_{t in C} tau_t`` (FlexMerge
Sec. 3, block-level task arithmetic); a cluster of one keeps its task's original tensor. Every
tensor then stores exactly ``k`` copies, so the size is exactly ``k`` units.

The result is a :class:`~flexmerge.plan.Grouping` over a ``blocks: tensor`` :class:`FlexMerge`, so
the engine's own materialize -> bundle path stores it and counts its bytes.

k-means with cosine distance, run on the tensor's N x N Gram matrix only (the one streaming pass
of :meth:`FlexMerge.grams`, no tensor is read twice): a cluster centre is the normalised sum
``c_j = X^T w_j / ||X^T w_j||`` of its members (``w_j`` the 0/1 membership vector), so
``cos(x_i, c_j) = (G w_j)_i / (||x_i|| sqrt(w_j^T G w_j))``. Same as the FlexMerge paper's code
(``kmeans_cosine`` in sacs-epfl/flexmerge ``Utils/merging_utils.py``, used per state-dict key by
``channel_merge`` in ``main_merge.py``): k-means++ initialisation with probabilities proportional to
the squared cosine distance to the nearest chosen centre, Lloyd iterations, centres = normalised
member means (a mean and a sum have the same direction). Differences, and why:

* Granularity: the original Channel Merging clusters each *output channel* (row) of a weight
  matrix separately and looks channels up at inference time; the FlexMerge paper's baseline (and
  this one) clusters whole tensors, so that the result is an ordinary model
  per task, deployable through the same bundle.
* Seeding: a generator per tensor keyed by (seed, tensor name) (the paper's code reseeds torch's
  global generator with the same seed for every tensor): deterministic, independent of order.
* Convergence: stop when the assignment no longer changes (or ``max_iters``), instead of a centre
  shift below 1e-4; at a fixed point both coincide.
* Empty clusters: the paper's code re-initialises an empty centre to a random point and can end
  with fewer than ``k`` clusters while still reporting ``k`` units. Here an empty cluster takes the
  member farthest (lowest cosine) from its centre among clusters of two or more, so every tensor
  has exactly ``k`` groups and the size is exactly ``k`` units.
* Zero task vectors (a frozen tensor) follow flexmerge's similarity rule (two zero vectors are
  perfectly similar, zero vs non-zero is orthogonal) instead of dividing by zero.
* Merging is task arithmetic only (the paper's code also offers TIES with a global trim); the
  clustering always sees the raw task vectors, as in the paper's code.
"""

from __future__ import annotations

import math
import os
import zlib
from typing import Any, Mapping

import numpy as np

from ..errors import FlexMergeError
from ..plan import Grouping, parse_size
from ..similarity import cosine_from_gram

NAME = "channel_merging"


def integer_size(size: float | int | str, num_tasks: int) -> int:
    """``size`` in model units as an integer ``k`` in ``1..N``; anything else is an error."""
    units, nbytes = parse_size(size)
    if units is None:
        raise FlexMergeError(f"channel_merging takes sizes in model units (1..{num_tasks}), not bytes "
                             f"({size!r}); give e.g. --sizes 1,2,3")
    if not math.isfinite(units) or abs(units - round(units)) > 1e-9:
        raise FlexMergeError(f"channel_merging supports integer sizes only (1..{num_tasks} units), got "
                             f"{size!r}; use a whole number of models")
    k = int(round(units))
    if not 1 <= k <= num_tasks:
        raise FlexMergeError(f"channel_merging size {k} is outside 1..{num_tasks} units for {num_tasks} "
                             "tasks; choose a size in that range")
    return k


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (1 << 32), zlib.crc32(key.encode())])


def _center_cosines(gram: np.ndarray, weights: np.ndarray, norms: np.ndarray, zero_tol: float) -> np.ndarray:
    """``[n, k]`` cosine between each point and each centre ``X^T w_j`` (zero-vector rule)."""
    dots = gram @ weights.T                                   # x_i . s_j
    cnorm = np.sqrt(np.clip(np.einsum("jn,nm,jm->j", weights, gram, weights), 0.0, None))
    pz = norms <= zero_tol
    cz = cnorm <= zero_tol
    denom = np.outer(norms, cnorm)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    cos[np.outer(pz, cz)] = 1.0
    cos[np.logical_xor.outer(pz, cz)] = 0.0
    return cos


def kmeans_cosine_gram(gram: Any, k: int, *, seed: int = 0, key: str = "", max_iters: int = 100) -> np.ndarray:
    """Cluster N vectors, given only their ``N x N`` Gram matrix, into exactly ``k`` clusters by
    k-means with cosine distance (see the module docstring). Returns ``labels[N]`` with clusters
    numbered by their smallest member (the cluster of task 0 is 0)."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    if g.shape != (n, n) or n == 0:
        raise FlexMergeError(f"Gram matrix must be square and non-empty, got shape {g.shape}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise FlexMergeError(f"k-means needs an integer number of clusters in 1..{n}, got {k!r}")
    if k == n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    zero_tol = 1e-12 * max(float(norms.max()), 1e-300)
    point_cos = cosine_from_gram(g)
    rng = _rng(seed, key)

    # k-means++ (Arthur & Vassilvitskii 2007) with squared cosine distances, as the paper's code.
    chosen = [int(rng.integers(n))]
    while len(chosen) < k:
        dist = np.clip(1.0 - point_cos[:, chosen].max(axis=1), 0.0, None)
        dist[chosen] = 0.0
        probs = dist ** 2
        total = probs.sum()
        if total <= 0.0:  # every remaining point duplicates a centre: pick uniformly among them
            rest = [i for i in range(n) if i not in chosen]
            chosen.append(int(rest[int(rng.integers(len(rest)))]))
        else:
            chosen.append(int(rng.choice(n, p=probs / total)))
    weights = np.zeros((k, n))
    weights[np.arange(k), chosen] = 1.0

    labels = None
    for _ in range(max(1, int(max_iters))):
        cos = _center_cosines(g, weights, norms, zero_tol)
        new = np.argmax(cos, axis=1)  # = argmin cosine distance; ties -> lowest centre
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():  # an empty cluster keeps its previous centre
                weights[j] = members.astype(np.float64)
    cos = _center_cosines(g, weights, norms, zero_tol)
    own = cos[np.arange(n), labels]

    # Exactly k clusters: an empty one takes the point farthest from its centre (cluster size >= 2).
    counts = np.bincount(labels, minlength=k)
    for j in range(k):
        if counts[j]:
            continue
        movable = [i for i in range(n) if counts[labels[i]] >= 2]
        i = min(movable, key=lambda t: (own[t], t))
        counts[labels[i]] -= 1
        labels[i] = j
        counts[j] = 1
        own[i] = 1.0
    remap: dict[int, int] = {}
    for lab in labels:
        remap.setdefault(int(lab), len(remap))
    return np.array([remap[int(lab)] for lab in labels], dtype=np.int64)


class ChannelMerging:
    """Channel Merging at integer sizes over the tasks of a merge config.

    ``config``: a YAML path, dict or :class:`~flexmerge.config.MergeConfig` (its ``blocks`` is
    replaced by ``tensor`` and its method by ``task_arithmetic``; a ``lambda`` given in the config's
    own task-arithmetic method is kept unless ``lam`` is given). ``seed`` defaults to the config's.
    """

    name = NAME

    def __init__(self, config: str | os.PathLike | Mapping[str, Any] | Any, *, lam: float | None = None,
                 seed: int | None = None, max_iters: int = 100, progress: bool = False):
        from ..engine import FlexMerge

        params = {} if lam is None else {"lambda": lam}
        self.fm = FlexMerge(config, method="task_arithmetic", method_params=params,
                            overrides={"blocks": "tensor"}, progress=progress)
        self.seed = self.fm.config.seed if seed is None else int(seed)
        self.max_iters = int(max_iters)
        self._grams: dict | None = None
        self._labels: dict[int, dict[str, np.ndarray]] = {}

    @property
    def tasks(self) -> list[str]:
        return self.fm.tasks

    @property
    def num_tasks(self) -> int:
        return len(self.fm.tasks)

    def describe(self) -> dict:
        return {"name": NAME, "lambda": self.fm.method.params.lam, "seed": self.seed,
                "clustering": "kmeans-cosine per tensor", "max_iters": self.max_iters}

    def grams(self) -> dict:
        """Per-tensor N x N Gram matrices of the raw task vectors (one streaming pass, cached)."""
        if self._grams is None:
            self._grams = self.fm.grams()
        return self._grams

    def labels(self, size: float | int | str) -> dict[str, np.ndarray]:
        """``{tensor: cluster label per task}`` for ``size`` = k units."""
        k = integer_size(size, self.num_tasks)
        if k not in self._labels:
            grams = self.grams()
            self._labels[k] = {b.name: kmeans_cosine_gram(grams[b.name], k, seed=self.seed, key=b.name,
                                                           max_iters=self.max_iters)
                               for b in self.fm.blockmap.blocks}
        return self._labels[k]

    def grouping(self, size: float | int | str) -> Grouping:
        """The per-tensor grouping for ``size`` = k units, with its exact size."""
        labels = self.labels(size)
        groups: dict[str, list[tuple[int, ...]]] = {}
        total, merges = 0, 0
        for bi, block in enumerate(self.fm.blockmap.blocks):
            lab = labels[block.name]
            members: dict[int, list[int]] = {}
            for t, c in enumerate(lab):
                members.setdefault(int(c), []).append(t)
            groups[block.name] = sorted(tuple(m) for m in members.values())
            total += self.fm.cost.block_cost(bi, [len(m) for m in groups[block.name]])
            merges += self.num_tasks - len(members)
        return Grouping(groups, merges, int(total), self.fm.cost.units(int(total)))

    def merge(self, size: float | int | str, out: str | os.PathLike | None = None):
        """A bundle of ``size`` = k units (in memory, or written to ``out``)."""
        return self.fm.merge(out=out, grouping=self.grouping(size))
