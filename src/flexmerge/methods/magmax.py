"""MagMax (Marczak et al., ECCV 2024): per parameter, the task-vector entry of largest magnitude.

``tau_m[i] = tau_{t*}[i]`` with ``t* = argmax_t |tau_t[i]|`` (paper Sec. 3, "maximum magnitude
selection"); ``theta = theta_0 + lambda * tau_m``. Ties in ``|tau|`` go to the later task of the
group, as the authors' ``merge_max_abs`` (``>=`` while scanning tasks in order) -- this matters
only for equal magnitudes of opposite sign. The authors' 8-dataset script scales by 0.5; our
default ``lambda`` is 1.0 (the selected entries are full fine-tuning updates, and at 1.0 merging
identical task vectors returns them). FusionBench and mergekit do not ship MagMax.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup
from .registry import register


def max_magnitude(taus: torch.Tensor) -> torch.Tensor:
    """``taus [g, *shape]`` -> the entry of largest ``|tau|`` per position (last task on ties)."""
    g = taus.shape[0]
    last_first = taus.flip(0)
    pick = last_first.abs().argmax(dim=0, keepdim=True)  # first max in reversed order = last task
    return last_first.gather(0, pick).squeeze(0) if g else taus.sum(0)


class MagMaxParams(MethodParams):
    lam: float = Field(1.0, alias="lambda", gt=0, le=MAX_SCALE, description="scaling of the selected task vector")


@register
class MagMax(MergeMethod):
    """Per parameter, keep the task vector entry with the largest magnitude; times lambda."""

    name = "magmax"
    Params = MagMaxParams
    order_invariant = False  # ties in |tau| go to the later member
    elementwise_merge = True

    def merge(self, group: GroupInput) -> StoredGroup:
        lam = self.params.lam
        return StoredGroup(merged={n: lam * max_magnitude(t) for n, t in group.task_vectors.items()})
