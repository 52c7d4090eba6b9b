"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces").

**Iso-C** (Sec. 4.1, Eq. 6): per 2-D tensor, take the task-arithmetic *sum*
``Delta = sum_t tau_t = U S V^T`` and flatten its spectrum,
``tau_merged = alpha * sigma_bar * U V^T`` with ``sigma_bar = mean(diag S)``.

**Iso-CTS** (Sec. 4.2, Alg. 1): keep the top ``c`` directions of ``Delta`` as the common subspace
(``c = common_space_fraction * k``, ``k = min(rows, cols)``, adjusted so that the remaining
``k - c`` directions split evenly over the ``g`` tasks); give each task ``(k - c) / g``
directions, the top singular triplets of its own matrix with the common left subspace projected
out, ``tau_t - U_c U_c^T tau_t``; stack common and task-specific triplets, orthogonalise the
stacked ``U`` and ``V`` by their polar factors (as TSV-M does) and use the mean of all stacked
singular values as the isotropic spectrum: ``tau_merged = alpha * sigma_bar * U_perp V_perp^T``.
Defaults as the authors' code and FusionBench: ``common_space_fraction = 0.8``, ``alpha = 1.0``
(the paper tunes ``alpha`` on validation data; no data is used here).

Tensors that are not matrices are averaged (mean, not sum), and every tensor is scaled by
``alpha``, as in the authors' code (danielm1405/iso-merging) and FusionBench's ``iso_c`` /
``iso_cts``. Convolution kernels ``[out, in, *k]`` are the matrices ``[out, in * prod(k)]`` (a 1x1
convolution exactly its linear layer) and depthwise kernels (``in == 1``) are averaged, as in
:mod:`.tsv` (:func:`.tsv.as_matrices`); the authors' code averages every non-2-D tensor.

Differences from that code: singular directions whose singular value is numerically zero
(``s <= max(rows, cols) * eps32 * s_max``) are left out. The mean is taken over the rest, and the
polar factors are taken on their range (see :func:`.tsv.partial_polar`). For the full-rank
matrices of real fine-tuning this changes nothing. For a rank-deficient sum (identical or merged
LoRA task vectors), the authors' code spreads ``sigma_bar`` over arbitrary null-space vectors
returned by LAPACK. Here the result is well defined, e.g. a single direction ``u v^T`` maps to
itself. SVDs run in float64; the result is float32.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup
from .registry import register
from .tsv import CONV_NOTE, as_matrices, depthwise_fallback, partial_polar, rank_tolerance


def iso_c_matrix(taus: torch.Tensor) -> torch.Tensor:
    """Iso-C of one stack ``[g, rows, cols]`` (Eq. 6), float64, unscaled."""
    total = taus.to(torch.float64).sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    keep = s > rank_tolerance(s[0], tuple(total.shape))
    if not bool(keep.any()):
        return torch.zeros_like(total)
    return s[keep].mean() * (u[:, keep] @ vh[keep])


def iso_cts_split(k: int, g: int, common_space_fraction: float) -> tuple[int, int]:
    """``(common, per_task)`` directions with ``common + g * per_task == k``, as the authors'
    code: common ``= int(k * f)``, then the remainder rounded to a multiple of ``g``."""
    per_task = round((k - int(k * common_space_fraction)) / g)
    while per_task * g > k:  # guard the rounding (the authors' code could go negative)
        per_task -= 1
    return k - per_task * g, per_task


def iso_cts_matrix(taus: torch.Tensor, common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS of one stack ``[g, rows, cols]`` (Alg. 1), float64, unscaled."""
    x = taus.to(torch.float64)
    g, rows, cols = x.shape
    shape = (rows, cols)
    common, per_task = iso_cts_split(min(rows, cols), g, common_space_fraction)
    u, s, vh = torch.linalg.svd(x.sum(dim=0), full_matrices=False)
    keep = s[:common] > rank_tolerance(s[0], shape)
    u_c = u[:, :common][:, keep]
    us, ss, vhs = [u_c], [s[:common][keep]], [vh[:common][keep]]
    if per_task > 0:
        for t in range(g):
            w_ts = x[t] - u_c @ (u_c.T @ x[t])  # project out the common left subspace
            u_t, s_t, vh_t = torch.linalg.svd(w_ts, full_matrices=False)
            tol = rank_tolerance(torch.linalg.matrix_norm(x[t]), shape)
            keep_t = s_t[:per_task] > tol
            us.append(u_t[:, :per_task][:, keep_t])
            ss.append(s_t[:per_task][keep_t])
            vhs.append(vh_t[:per_task][keep_t])
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros(shape, dtype=torch.float64, device=x.device)
    u_perp = partial_polar(torch.cat(us, dim=1))
    vh_perp = partial_polar(torch.cat(vhs, dim=0))
    return s_cat.mean() * (u_perp @ vh_perp)


class IsoCParams(MethodParams):
    alpha: float = Field(1.0, gt=0, le=MAX_SCALE, description="scaling of the merged task vector")


class IsoCTSParams(MethodParams):
    alpha: float = Field(1.0, gt=0, le=MAX_SCALE, description="scaling of the merged task vector")
    common_space_fraction: float = Field(
        0.8, gt=0, le=1, description="share of the rank given to the common subspace"
    )


class _IsoBase(MergeMethod):
    note = CONV_NOTE

    def fallback(self, name: str, shape: tuple[int, ...]) -> str | None:
        return depthwise_fallback(name, shape)

    def _matrix(self, taus: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, group: GroupInput) -> StoredGroup:
        alpha = self.params.alpha
        merged: dict[str, torch.Tensor] = {}
        for name, taus in group.task_vectors.items():
            mats = as_matrices(name, taus)
            if mats is not None and min(mats.shape[1:]) > 0:
                out = self._matrix(mats).reshape(taus.shape[1:])
            else:
                out = taus.to(torch.float64).mean(dim=0)
            merged[name] = (alpha * out).to(torch.float32)
        return StoredGroup(merged=merged)


@register
class IsoC(_IsoBase):
    """Iso-C (Marczak et al. 2025, Eq. 6): the task-arithmetic sum with a flat spectrum."""

    name = "iso_c"
    Params = IsoCParams

    def _matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return iso_c_matrix(taus)


@register
class IsoCTS(_IsoBase):
    """Iso-CTS (Marczak et al. 2025, Alg. 1): common plus task-specific subspaces, flat
    spectrum."""

    name = "iso_cts"
    Params = IsoCTSParams

    def _matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return iso_cts_matrix(taus, self.params.common_space_fraction)
