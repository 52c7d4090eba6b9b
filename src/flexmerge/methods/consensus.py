"""Consensus / TALL masks in their compression form (Wang et al., ICML 2024, "Localizing Task
Information for Improved Model Merging and Compression", Sec. 3, Eq. 4), as used by FlexMerge.

For a block group of ``g`` tasks, an inner data-free method (default ``ties``) gives the merged
vector ``tau_merged``. Each member gets a TALL mask (Eq. 4)::

    m_t = 1[ |tau_t| >= lambda_c * |tau_merged - tau_t| ]

and rebuilds ``theta_0 + m_t * tau_merged``. The engine stores ``tau_merged``, one bit-packed mask
per member and the pretrained block. ``lambda_c = 0.3`` is the default of the FlexMerge code
(``consensus_lambda``); the TALL paper picks it per task from {0.2, ..., 0.6} on validation data.

The inner method's global pass and transform (e.g. TIES's global top-k trim) are forwarded, so
similarity, the merged vector and the masks all see the same task vectors, as in the FlexMerge
code, which compares the trimmed task vectors with the TIES-merged one. (The TALL paper compares
the untrimmed ``tau_t``; with ``inner: task_arithmetic`` there is no trim and the two agree.)
``tau_merged`` includes the inner method's own scaling (TIES/task-arithmetic ``lambda``), as in the
FlexMerge code.

Differences: the paper writes ``>=``, the TALL and FlexMerge code use ``>``. They differ only
where both sides are 0, i.e. ``tau_t = 0`` and ``tau_merged = 0``, where the mask bit does not
change the rebuilt weight. ``>=`` is used here. Inner methods that store masks or scalars
themselves (``emr``, ``consensus``) are rejected.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from pydantic import Field

from ..errors import FlexMergeError
from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup, TaskVectorStream
from .registry import make_method, register


class ConsensusParams(MethodParams):
    lambda_c: float = Field(
        0.3, ge=0, le=MAX_SCALE,
        description="TALL-mask threshold (paper range 0.2-0.6; 0 keeps every element)"
    )
    inner: Union[str, dict[str, Any]] = Field(
        "ties", description="the method giving tau_merged: a name or {name: ..., params}"
    )


def tall_masks(taus: torch.Tensor, merged: torch.Tensor, lambda_c: float) -> torch.Tensor:
    """Bool ``[g, *shape]``: ``|tau_t| >= lambda_c * |merged - tau_t|`` (TALL Eq. 4)."""
    return taus.abs() >= lambda_c * (merged.unsqueeze(0) - taus).abs()


@register
class Consensus(MergeMethod):
    """TALL masks over an inner merge (Wang et al. 2024, compression form used by FlexMerge)."""

    name = "consensus"
    Params = ConsensusParams
    stores_masks = True

    def __init__(self, seed: int = 0, **params):
        super().__init__(seed=seed, **params)
        inner = self.params.inner
        inner_name = inner.get("name") if isinstance(inner, dict) else inner
        if inner_name == self.name:
            raise FlexMergeError(
                "method 'consensus': inner method cannot be 'consensus'; use e.g. ties or task_arithmetic"
            )
        try:
            self.inner = make_method(inner, seed=self.seed)
        except FlexMergeError as exc:
            raise FlexMergeError(f"method 'consensus', inner method: {exc}") from None
        if self.inner.stores_masks or self.inner.stores_scalars:
            raise FlexMergeError(
                f"method 'consensus': inner method '{self.inner.name}' stores masks or scalars itself;"
                " use a plain method such as ties or task_arithmetic"
            )
        self.randomized = self.inner.randomized  # e.g. inner dare
        self.elementwise_transform = self.inner.elementwise_transform
        self.order_invariant = self.inner.order_invariant

    # The inner method decides what similarity and merging see.
    @property
    def has_global_pass(self) -> bool:
        return self.inner.has_global_pass

    @property
    def has_transform(self) -> bool:
        return self.inner.has_transform

    def global_pass(self, stream: TaskVectorStream, num_tasks: int) -> None:
        self.inner.global_pass(stream, num_tasks)

    def transform(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        return self.inner.transform(name, taus)

    def describe(self) -> dict:
        return {"name": self.name, "lambda_c": self.params.lambda_c, "inner": self.inner.describe()}

    def merge(self, group: GroupInput) -> StoredGroup:
        inner = self.inner.merge(group)
        lam = self.params.lambda_c
        merged: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        kept = total = 0
        for name, taus in group.task_vectors.items():
            tau_m = inner.merged[name].to(torch.float32)
            merged[name] = tau_m
            masks[name] = tall_masks(taus.to(torch.float32), tau_m, lam)
            kept += int(masks[name].sum())
            total += masks[name].numel()
        extra = dict(inner.extra)
        extra["mask_density"] = kept / max(1, total)
        return StoredGroup(merged=merged, masks=masks, extra=extra)
