"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): mask outliers and negligible entries per
layer, then task arithmetic.

For every task ``t`` and every tensor (the paper's "layer") the entries are ranked by ``|tau_t|``;
the top ``beta`` fraction (large outliers) and the bottom ``gamma`` fraction (negligible
perturbations) are masked (paper Sec. 3, mask ``m^{beta,gamma}``):
``n_top = floor(beta * d)``, ``n_bottom = floor(gamma * d)``, and exactly the
``d - n_top - n_bottom`` middle-ranked entries survive (ties in ``|tau|`` broken by position, so
the count is exact). The masking is a :meth:`Breadcrumbs.transform` -- per task, independent of
the group -- so similarity and merging both see the breadcrumbs, as for TIES and DARE. Then
FlexMerge's block-level task arithmetic: ``theta = theta_0 + lambda * mean_t breadcrumbs_t``.

Names and defaults, and where they differ:

* ``beta`` (top fraction masked) is the paper's beta and **mergekit's ``gamma``**; ``gamma``
  (bottom fraction masked) is the paper's gamma; mergekit's ``density`` = ``1 - beta - gamma``.
* Defaults ``beta`` = 0.01 (mergekit's default for its outlier fraction) and ``gamma`` = 0.85
  (the authors' released search starts from keeping the top 15% after the outliers); the paper
  tunes both with the scaling factor, so treat them as starting points.
* The paper and mergekit add ``alpha * sum_t``; we use ``lambda * mean_t`` (FlexMerge's form,
  so groups of different sizes keep the same scale): their ``alpha`` is our ``lambda / g``.
* The authors' code ranks along the last dimension (per row of a weight matrix); we rank over
  the whole tensor, as the paper's "layer" and mergekit do.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from pydantic import Field, model_validator

from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup
from .registry import register


def _rank_boundary(bits: torch.Tensor, cum_hist: torch.Tensor, rank: int):
    """For the int32 patterns ``bits`` of non-negative float32 values (ordered as the values),
    with ``cum_hist`` the cumulative histogram of their high 16 bits: ``(value, smaller, equal)``
    where ``value`` is the pattern at 0-based stable rank ``rank``, ``smaller`` the count of
    smaller entries and ``equal`` the positions (ascending) of the entries equal to it."""
    hi = int(torch.searchsorted(cum_hist, rank, right=True))  # bin holding that rank
    before = int(cum_hist[hi - 1]) if hi > 0 else 0
    pos = torch.nonzero((bits >> 16) == hi).squeeze(1)
    inside = bits[pos]
    value = int(inside.kthvalue(rank - before + 1).values)
    smaller = before + int((inside < value).sum())
    return value, smaller, pos[inside == value]


def breadcrumbs_mask(taus: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Bool mask ``[N, *shape]``: per row, the entries ranked (by ``|tau|``, ascending, stable)
    in ``[floor(gamma * d), d - floor(beta * d))``.

    Equal to masking a stable argsort, without the sort: the float32 patterns of ``|tau|`` are
    ordered as the values, so a histogram of their high 16 bits locates the two boundary ranks
    and a selection inside each bin gives the boundary values. Entries strictly between them are
    kept; entries equal to a boundary value get their exact stable rank (smaller entries +
    position among the equal ones). Measured: 1 s instead of 17 s for MiniLM's 11.7M-entry
    embedding over 8 tasks."""
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    d = flat.shape[1]
    n_top = int(Fraction(repr(float(beta))) * d)
    n_bottom = int(Fraction(repr(float(gamma))) * d)
    if n_top == 0 and n_bottom == 0:
        return torch.ones_like(taus, dtype=torch.bool)
    lo_rank, hi_rank = n_bottom, d - n_top  # keep stable ranks in [lo_rank, hi_rank)
    keep = torch.zeros(n, d, dtype=torch.bool, device=taus.device)
    if hi_rank <= lo_rank:
        return keep.reshape(taus.shape)
    for t in range(n):  # one task at a time bounds the temporaries to one row
        bits = flat[t].to(torch.float32).abs().contiguous().view(torch.int32)
        cum_hist = torch.bincount(bits >> 16, minlength=1 << 15).cumsum(0)
        row = keep[t]
        row.fill_(True)
        bounds = []
        if lo_rank > 0:
            lo, lo_smaller, lo_equal = _rank_boundary(bits, cum_hist, lo_rank)
            row &= bits > lo
            bounds.append((lo_smaller, lo_equal))
        if hi_rank < d:
            hi, hi_smaller, hi_equal = _rank_boundary(bits, cum_hist, hi_rank - 1)
            row &= bits < hi
            bounds.append((hi_smaller, hi_equal))
        for smaller, equal in bounds:  # boundary ties: keep those whose stable rank is inside
            rank = smaller + torch.arange(equal.numel())
            row[equal[(rank >= lo_rank) & (rank < hi_rank)]] = True
    return keep.reshape(taus.shape)


class BreadcrumbsParams(MethodParams):
    beta: float = Field(0.01, ge=0, lt=1,
                        description="top fraction of |tau| per task and tensor masked (outliers)")
    gamma: float = Field(0.85, ge=0, lt=1,
                         description="bottom fraction of |tau| per task and tensor masked")
    lam: float = Field(1.0, alias="lambda", gt=0, le=MAX_SCALE, description="scaling of the mean of the breadcrumbs")

    @model_validator(mode="after")
    def _something_kept(self):
        if self.beta + self.gamma >= 1:
            raise ValueError(
                f"beta + gamma must be < 1 (got {self.beta} + {self.gamma}); nothing would be kept")
        return self


@register
class Breadcrumbs(MergeMethod):
    """Per task and tensor, mask the top ``beta`` and bottom ``gamma`` of ``|tau|``; lambda * mean."""

    name = "breadcrumbs"
    Params = BreadcrumbsParams

    def transform(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        return taus * breadcrumbs_mask(taus, self.params.beta, self.params.gamma)

    def merge(self, group: GroupInput) -> StoredGroup:
        lam = self.params.lam
        return StoredGroup(merged={n: lam * t.mean(dim=0) for n, t in group.task_vectors.items()})
