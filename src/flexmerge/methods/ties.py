"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. **Trim** (Sec. 3 / Alg. 1, "trim"): each task vector keeps its ``k`` fraction of largest magnitudes,
   ``tau_t <- tau_t * 1[|tau_t| >= thr_t]``, with ``thr_t`` the ``m``-th largest ``|tau_t|`` over the
   *whole* task vector (every mergeable tensor of task ``t``), ``m = max(1, floor(k * D))``.
   As in FlexMerge (Dhasade et al., ICLR 2026, Appendix B.1) the trim runs once, globally, before
   planning, and the trimmed vectors are what both similarity and merging see
   (:meth:`Ties.global_pass` + :meth:`Ties.transform`).
2. **Elect** (Alg. 1, "elect"): ``gamma = sign(sum_t tau_t)`` per entry ("mass" election). Entries whose sum
   is exactly zero take the group's majority sign ``sign(sum gamma)`` (+1 on a tie), as the
   reference code's ``resolve_zero_signs(..., "majority")``.
3. **Disjoint merge** (Alg. 1, "disjoint merge"): ``tau_m = sum_{t in A} tau_t / |A|`` with
   ``A = {t : sign(tau_t) = gamma}`` (zeros never count); ``theta = theta_0 + lambda * tau_m``.

Where this differs from other code, and why:

* Threshold: the reference implementation (``topk_values_mask``, also used by FlexMerge's and
  FusionBench's code) takes ``kthvalue(D - floor(k D))``, i.e. the ``floor(kD)+1``-th largest,
  keeping one entry more than it says. We keep exactly the top ``floor(kD)`` (ties at the
  threshold are all kept, as there).
* The threshold is found without concatenating the model: a 32768-bin histogram of the high
  16 bits of ``|tau|``'s float32 pattern (monotone in ``|tau|`` for non-negative floats) in one
  streaming pass, then a 65536-bin histogram of the low 16 bits inside the chosen bin in a
  second pass -- exact, with ``O(N * 2^16)`` memory.
* The zero-sum majority sign is taken over the group's block (all its tensors); the reference
  code takes it over the whole flattened model, which does not exist at block level.
* mergekit's ``ties`` trims per tensor (``density``) and sums weighted vectors (optionally
  normalised); ours trims globally as the paper and FlexMerge do, and takes the disjoint mean.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Iterable

import torch
from pydantic import Field

from ..errors import FlexMergeError
from .base import MAX_SCALE, ChunkedMerge, GroupInput, MergeMethod, MethodParams, StoredGroup, TaskVectorStream
from .registry import register

_HI_BINS = 1 << 15  # |x| has sign bit 0: the high 16 bits of its float32 pattern are < 2**15
_LO_BINS = 1 << 16
_CHUNK = 1 << 20  # elements per bincount call (temporaries of 4 MiB: larger ones are fresh pages each time)


# -- helpers other methods import -----------------------------------------------------------------

def keep_count(fraction: float, total: int) -> int:
    """``max(1, floor(fraction * total))`` computed exactly (``0.3 * 10`` is 3, not 2 or 4)."""
    if total <= 0:
        return 0
    return max(1, min(total, int(Fraction(repr(float(fraction))) * total)))


def elect_sign(taus: torch.Tensor) -> torch.Tensor:
    """TIES sign election by mass: ``sign(sum_t tau_t)`` over dim 0 of ``[g, *shape]`` (0 where
    the sum is 0; see :func:`resolve_zero_signs`)."""
    return torch.sign(taus.sum(dim=0))


def resolve_zero_signs(signs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give entries with no elected sign the majority sign of all ``signs`` together (+1 on a
    tie), as the reference code's ``resolve_zero_signs(..., "majority")``."""
    majority = -1.0 if sum(sign_balance(s) for s in signs.values()) < 0 else 1.0
    return {n: torch.where(s == 0, torch.full_like(s, majority), s) for n, s in signs.items()}


def sign_balance(signs: torch.Tensor) -> int:
    """Number of +1 minus number of -1 entries, counted exactly (a float32 sum of more than 2**24
    signs rounds; a float64 sum of +-1 is exact below 2**53 entries)."""
    return int(signs.sum(dtype=torch.float64))


def disjoint_mean(taus: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint mean: mean over the tasks whose entry has the elected ``sign`` (+1 or -1;
    zeros excluded); 0 where no task agrees.

    ``taus * sign`` is positive exactly where a task agrees, so the agreeing sum is
    ``sign * sum_t max(sign * tau_t, 0)`` (negation is exact, so this equals summing the agreeing
    entries themselves) with one ``[g, *shape]`` temporary instead of three."""
    s = taus * sign.unsqueeze(0)
    count = (s > 0).sum(dim=0).clamp_(min=1).to(taus.dtype)
    return s.clamp_(min=0).sum(dim=0).mul_(sign).div_(count)


def ties_merge(task_vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Elect + disjoint mean (no trim, no lambda) of one group: ``{name: [g, *shape]}`` ->
    ``{name: merged}``. The zero-sum majority sign is taken over all tensors given."""
    signs = resolve_zero_signs({n: elect_sign(t) for n, t in task_vectors.items()})
    return {n: disjoint_mean(t, signs[n]) for n, t in task_vectors.items()}


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|x|`` (float32); their order is the order of ``|x|``."""
    return x.detach().to(torch.float32).abs().contiguous().view(torch.int32)


def _rows(stream: TaskVectorStream, num_tasks: int) -> Iterable[tuple[int, torch.Tensor]]:
    """``(task, int32 bits of a chunk of |tau_task|)`` over one pass of ``stream``."""
    for name, taus in stream():
        if taus.shape[0] != num_tasks:
            raise FlexMergeError(
                f"tensor '{name}': expected task vectors of {num_tasks} tasks, got {taus.shape[0]}")
        flat = taus.reshape(num_tasks, -1)
        for t in range(num_tasks):
            row = flat[t]
            for start in range(0, row.numel(), _CHUNK):
                yield t, _abs_bits(row[start:start + _CHUNK])


def global_topk_thresholds(stream: TaskVectorStream, num_tasks: int, k: float) -> torch.Tensor:
    """Per task, the exact ``m``-th largest ``|tau_t|`` over all tensors of ``stream``,
    ``m = max(1, floor(k * D))`` (D = elements per task), in two streaming passes.

    Pass 1 counts the high 16 bits of each ``|tau|`` float32 pattern; the bin holding the ``m``-th
    largest is found from the top. Pass 2 counts the low 16 bits of the entries in that bin.
    Returns float32 ``[num_tasks]`` (0 for an empty stream).
    """
    hi_hist = torch.zeros(num_tasks, _HI_BINS, dtype=torch.int64)
    for t, bits in _rows(stream, num_tasks):
        hi_hist[t] += torch.bincount(bits >> 16, minlength=_HI_BINS)
    total = int(hi_hist[0].sum()) if num_tasks else 0
    if total == 0:
        return torch.zeros(num_tasks, dtype=torch.float32)
    m = keep_count(k, total)

    # counts of entries with high bits >= b, for b from the top bin down
    at_or_above = hi_hist.flip(1).cumsum(1)
    j = (at_or_above >= m).to(torch.int8).argmax(dim=1)  # first index reaching m
    hi_bin = _HI_BINS - 1 - j
    above = at_or_above.gather(1, j[:, None]).squeeze(1) - hi_hist.gather(1, hi_bin[:, None]).squeeze(1)
    rank_in_bin = m - above  # 1-based rank from the top inside the chosen bin

    lo_hist = torch.zeros(num_tasks, _LO_BINS, dtype=torch.int64)
    for t, bits in _rows(stream, num_tasks):
        inside = bits[(bits >> 16) == int(hi_bin[t])]
        if inside.numel():
            lo_hist[t] += torch.bincount(inside & 0xFFFF, minlength=_LO_BINS)
    lo_at_or_above = lo_hist.flip(1).cumsum(1)
    j2 = (lo_at_or_above >= rank_in_bin[:, None]).to(torch.int8).argmax(dim=1)
    lo = _LO_BINS - 1 - j2
    pattern = ((hi_bin << 16) | lo).to(torch.int32)
    return pattern.view(torch.float32).clone()


def trim_rows(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``taus[t] * 1[|taus[t]| >= thresholds[t]]`` for ``taus`` of shape ``[N, *shape]``."""
    thr = thresholds.to(device=taus.device, dtype=taus.dtype).reshape(-1, *([1] * (taus.dim() - 1)))
    return taus * (taus.abs() >= thr)


# -- the method ------------------------------------------------------------------------------------

class TiesParams(MethodParams):
    k: float = Field(0.2, gt=0, le=1,
                     description="fraction of each task vector kept by the global top-k trim")
    lam: float = Field(1.0, alias="lambda", gt=0, le=MAX_SCALE, description="scaling of the merged task vector")


@register
class Ties(MergeMethod):
    """TIES-Merging: global top-k trim (once), elect sign by mass, disjoint mean, times lambda."""

    name = "ties"
    Params = TiesParams
    elementwise_transform = True  # a trim by per-task thresholds
    elementwise_merge = True  # entry by entry, except the block's zero-sum majority (_TiesChunks)

    def __init__(self, seed: int = 0, **params):
        super().__init__(seed=seed, **params)
        self.thresholds: torch.Tensor | None = None
        """Per-task trim thresholds ``[N]`` set by :meth:`global_pass` (``None`` before)."""

    def global_pass(self, stream: TaskVectorStream, num_tasks: int) -> None:
        if self.params.k >= 1:
            self.thresholds = None  # nothing to trim
            return
        self.thresholds = global_topk_thresholds(stream, num_tasks, self.params.k)

    def transform(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        if self.params.k >= 1:
            return taus
        if self.thresholds is None:
            raise FlexMergeError(
                "method 'ties': the global top-k trim has not run; call global_pass(stream, N) "
                "before transform (the engine does this before planning)")
        if taus.shape[0] != self.thresholds.numel():
            raise FlexMergeError(
                f"method 'ties': tensor '{name}' has {taus.shape[0]} task rows but the trim was "
                f"computed for {self.thresholds.numel()} tasks; rerun global_pass")
        return trim_rows(taus, self.thresholds)

    def merge(self, group: GroupInput) -> StoredGroup:
        lam = self.params.lam
        return StoredGroup(merged={n: lam * t for n, t in ties_merge(group.task_vectors).items()})

    def chunked_merge(self, group: GroupInput, shapes: dict[str, tuple[int, ...]]) -> ChunkedMerge:
        return _TiesChunks(self, group, shapes)


class _TiesChunks(ChunkedMerge):
    """TIES fed chunk by chunk, equal to :func:`ties_merge` on the whole block: entries whose sign
    sum is zero take +1 provisionally; where a member is non-zero their mean for -1 is kept aside
    and used if the block's sign balance (:func:`sign_balance`, counted over all chunks) is
    negative. Zero-sum entries are few (exact cancellations), so this holds little memory."""

    def __init__(self, *args):
        super().__init__(*args)
        self.balance = 0
        self.negative: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def merge_chunk(self, name: str, start: int, taus: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        lam = self.method.params.lam
        sign = elect_sign(taus)
        self.balance += sign_balance(sign)
        zero = sign == 0
        idx = zero.nonzero().squeeze(1)
        if idx.numel():
            sub = taus.index_select(1, idx)
            some = (sub != 0).any(dim=0)  # all-zero entries merge to 0 whatever the sign
            if bool(some.any()):
                idx, sub = idx[some], sub[:, some]
                self.negative.append((name, idx + start, lam * disjoint_mean(sub, -torch.ones(idx.numel()))))
        return lam * disjoint_mean(taus, sign.masked_fill_(zero, 1.0))

    def result(self) -> StoredGroup:
        if self.balance < 0:
            for name, idx, values in self.negative:
                self.merged[name].index_copy_(0, idx, values)
        return super().result()
