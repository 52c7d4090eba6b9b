"""Averaging and task arithmetic at block level.

Task arithmetic (Ilharco et al. 2023) adds ``lambda * sum_t tau_t``; FlexMerge (Dhasade et al.,
ICLR 2026, Sec. 3) uses the block-level form with the *mean* of the group's task vectors,
``theta_0 + lambda * mean_t tau_t``, so that groups of different sizes keep the same scale.
lambda = 1.5 is the default of the paper's released vision scripts; at lambda = 1 this equals
``average``. (mergekit's ``task_arithmetic`` sums weighted task vectors; FusionBench's uses a
sum scaled by ``scaling_factor``. With the mean, their ``lambda`` corresponds to ours / N.)
"""

from __future__ import annotations

from pydantic import Field

from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup, group_mean
from .registry import register


class AverageParams(MethodParams):
    pass


@register
class Average(MergeMethod):
    """``theta_0 + mean_t tau_t`` (weight averaging, Wortsman et al. 2022)."""

    name = "average"
    Params = AverageParams
    elementwise_merge = True

    def merge(self, group: GroupInput) -> StoredGroup:
        return StoredGroup(merged=group_mean(group))


class TaskArithmeticParams(MethodParams):
    lam: float = Field(1.5, alias="lambda", gt=0, le=MAX_SCALE, description="scaling of the mean task vector")


@register
class TaskArithmetic(MergeMethod):
    """``theta_0 + lambda * mean_t tau_t`` (FlexMerge Sec. 3, block-level task arithmetic)."""

    name = "task_arithmetic"
    Params = TaskArithmeticParams
    elementwise_merge = True

    def merge(self, group: GroupInput) -> StoredGroup:
        lam = self.params.lam
        return StoredGroup(merged={n: lam * t for n, t in group_mean(group).items()})
