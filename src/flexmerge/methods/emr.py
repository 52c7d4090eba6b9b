"""EMR-Merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free
High-Performance Model Merging", Sec. 3.2, Eq. 2-6).

For a group of ``g`` tasks, per element:

* Elect (Eq. 2-3): ``eps = sgn(sum_t tau_t)``, ``tau_uni = eps * max_t{|tau_t| : tau_t * eps > 0}``
  (0 where no task agrees with ``eps``).
* Mask (Eq. 4): ``m_t = [tau_t * tau_uni > 0]``, equivalently ``tau_t`` has the elected sign.
* Rescale (Eq. 5): ``gamma_t = sum|tau_t| / sum|m_t * tau_uni|``.

Task ``t`` rebuilds ``theta_0 + gamma_t * m_t * tau_uni`` (Eq. 6); the engine stores ``tau_uni``,
one bit-packed mask per task, one float32 ``gamma_t`` per task and the pretrained block.

Semantics, and where they differ from the authors' code (harveyhuang18/EMR_Merging, copied into
the FlexMerge code):

* Where the sum is exactly 0 the elected sign is ``-1``, as in the authors' code
  (``flag = (sum > 0) * 2 - 1``).
* ``gamma_t`` is one scalar per task *per block group*, with the sums taken over every element of
  the block (Eq. 5 with the block in place of the whole model). The paper rescales once per
  model. At size 1.0 the engine still merges block by block, so a whole-model EMR here has one
  ``gamma_t`` per block (finer, never coarser). The authors' code sums per-tensor *means* of
  ``|tau|`` rather than sums of elements, which weights small tensors more. Eq. 5 is used here.
* If ``sum|m_t * tau_uni| = 0`` (task ``t`` agrees with no elected sign, or is zero) its mask is
  all zero and ``gamma_t = 1``: the task rebuilds ``theta_0``, whatever ``gamma_t`` is, and no
  NaN or inf is stored. The authors' code divides by zero there.
* Sums are taken in float64; stored tensors are float32.
"""

from __future__ import annotations

import torch

from .base import GroupInput, MergeMethod, MethodParams, StoredGroup
from .registry import register


class EMRParams(MethodParams):
    pass


_CHUNK = 1 << 20


def emr_elect(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau_uni, masks)`` for one tensor's stack ``[g, *shape]`` (Eq. 2-4)."""
    flag = torch.where(taus.sum(dim=0) > 0, 1.0, -1.0).to(taus.dtype)
    masks = taus * flag > 0
    magnitude = (taus.abs() * masks).amax(dim=0)
    return magnitude * flag, masks


@register
class EMRMerge(MergeMethod):
    """EMR-Merging (Huang et al. 2024): unified vector, per-task masks and rescalers."""

    name = "emr"
    Params = EMRParams
    stores_masks = True
    stores_scalars = True

    def merge(self, group: GroupInput) -> StoredGroup:
        g = group.size
        numer = torch.zeros(g, dtype=torch.float64)
        denom = torch.zeros(g, dtype=torch.float64)
        merged: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for name, taus in group.task_vectors.items():
            uni, mask = emr_elect(taus)
            merged[name] = uni.to(torch.float32)
            masks[name] = mask
            flat, mflat, uflat = taus.reshape(g, -1), mask.reshape(g, -1), uni.reshape(1, -1)
            # float64 sums, in column chunks so that no float64 copy of the whole stack exists
            for start in range(0, flat.shape[1], _CHUNK):
                cols = slice(start, start + _CHUNK)
                numer += flat[:, cols].to(torch.float64).abs().sum(dim=1)
                denom += (mflat[:, cols] * uflat[:, cols].to(torch.float64)).abs().sum(dim=1)
        safe = denom > 0
        gamma = torch.where(safe, numer / torch.where(safe, denom, 1.0), 1.0)
        density = (
            sum(float(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
        )
        return StoredGroup(
            merged=merged,
            masks=masks,
            scalars=gamma.to(torch.float32),
            extra={"mask_density": density},
        )
