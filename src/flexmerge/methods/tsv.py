"""TSV-Merge: Task Singular Vectors (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing
Task Interference in Model Merging", Sec. 4, Alg. 1 "TSV-M").

Per 2-D tensor and group of ``g`` tasks:

1. SVD of every task's matrix, ``tau_t = U_t S_t V_t^T``; keep the top ``r = k // g`` triplets
   (``k = min(rows, cols)``: each task gets ``1/g`` of the rank, Sec. 4.1).
2. Concatenate ``U = [U_1 .. U_g]``, ``S = diag(S_1 .. S_g)``, ``V = [V_1 .. V_g]``.
3. Decorrelate (Eq. 7-8, "whitening"): replace ``U`` and ``V`` by their orthogonal polar factors,
   ``U = P Sigma Q^T -> U_perp = P Q^T`` (the closest orthonormal matrix, Procrustes), same for ``V``.
4. ``tau_merged = alpha * U_perp S V_perp^T``.

Tensors that are not matrices (biases, norms) are averaged, and everything is scaled by
``alpha`` (default 1.0, the paper's TSV-M setting), as in the paper's released code.

Convolution kernels ``[out, in, *k]`` (a ``weight`` of 3 to 5 dimensions) are the matrices
``[out, in * prod(k)]`` (:func:`as_matrices`), the map from an input patch to the output
channels; a 1x1 convolution is exactly its linear layer. The paper's code averages every
non-2-D tensor. Depthwise kernels (``in == 1``: one filter per channel, no mixing of channels to
decompose) are averaged, and so is a grouped convolution's kernel of one input channel per group.

Where this differs from the paper's code (AntoAndGar/task_singular_vectors) and FusionBench's copy:

* Singular triplets with a numerically zero singular value (``s <= max(rows, cols) * eps32 *
  s_max``) are dropped before step 2, and the polar factor is taken on the numerical range of
  the stacked bases (a partial isometry). When the stacked bases have full column rank, as for
  real fine-tuned task vectors, the result is exactly the paper's. When they don't (identical
  tasks in a group, a zero or low-rank task vector such as a merged LoRA), the paper's result
  depends on the arbitrary null-space vectors LAPACK returns. Here it is well defined: e.g. ``g``
  identical task vectors give their own rank-``r`` truncation, not that plus noise.
* If ``k // g`` is 0 (a matrix whose smaller side is below the group size), the paper's code keeps
  no direction and returns zero. Here such a tensor is averaged like a 1-D tensor.
* The SVDs run in float64 (stable rank decisions, reproducible); the result is float32.
* ``rank_fraction`` (optional) replaces ``1/g`` by a fixed fraction of the rank per task.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup
from .registry import register

_EPS32 = float(torch.finfo(torch.float32).eps)


def rank_tolerance(s_max: torch.Tensor | float, shape: tuple[int, ...]) -> float:
    """Singular values at or below this are numerically zero (NumPy ``matrix_rank``'s rule, with
    float32 epsilon because task vectors are float32)."""
    return float(s_max) * max(shape[-2:]) * _EPS32


def partial_polar(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``x = P Sigma Q^T`` on the numerical range of ``x``.

    Equals the usual polar factor (TSV Eq. 8, Procrustes) when ``x`` has full rank; otherwise the
    directions with zero singular value, which are arbitrary, are left out.
    """
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0:
        return torch.zeros_like(x)
    keep = s > rank_tolerance(s[0], tuple(x.shape))
    return p[:, keep] @ qh[keep]


def tsv_matrix(taus: torch.Tensor, rank: int) -> torch.Tensor:
    """TSV-M of one stack of matrices ``[g, rows, cols]`` keeping ``rank`` triplets per task
    (TSV Alg. 1), in float64; unscaled."""
    x = taus.to(torch.float64)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    us, ss, vhs = [], [], []
    for t in range(x.shape[0]):
        s_t = s[t, :rank]
        keep = s_t > rank_tolerance(s[t, 0], tuple(x.shape))
        us.append(u[t, :, :rank][:, keep])
        ss.append(s_t[keep])
        vhs.append(vh[t, :rank][keep])
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
    u_perp = partial_polar(torch.cat(us, dim=1))
    vh_perp = partial_polar(torch.cat(vhs, dim=0))
    return (u_perp * s_cat) @ vh_perp


CONV_NOTE = ("conv kernels [out, in, *k] as matrices [out, in*k] (1x1 exactly as linear); "
             "depthwise kernels (in = 1) averaged")


def depthwise_fallback(name: str, shape: tuple[int, ...]) -> str | None:
    """The note of an SVD method for a depthwise kernel ``[out, 1, *k]``, which it averages."""
    if 3 <= len(shape) <= 5 and name.rsplit(".", 1)[-1] == "weight" and shape[1] == 1:
        return "depthwise kernels (in = 1) averaged, not merged by the method's SVD rule"
    return None


def as_matrices(name: str, taus: torch.Tensor) -> torch.Tensor | None:
    """The stack ``[g, rows, cols]`` an SVD method decomposes for tensor ``name``: 2-D tensors as
    they are, convolution kernels ``[g, out, in, *k]`` as ``[g, out, in * prod(k)]`` (module
    docstring); None for what is averaged (vectors, depthwise kernels, other tensors)."""
    if taus.dim() == 3:
        return taus
    if 4 <= taus.dim() <= 6 and name.rsplit(".", 1)[-1] == "weight" and taus.shape[2] > 1:
        return taus.reshape(taus.shape[0], taus.shape[1], -1)
    return None


class TSVParams(MethodParams):
    alpha: float = Field(1.0, gt=0, le=MAX_SCALE, description="scaling of the merged task vector (TSV-M: 1.0)")
    rank_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fraction of each task's rank kept; default 1/g for a group of g tasks",
    )


@register
class TSVMerge(MergeMethod):
    """TSV-M (Gargiulo et al. 2025): per matrix (conv kernels as matrices), each task's top
    ``1/g`` singular triplets, concatenated, with ``U`` and ``V`` orthogonalised by their polar
    factors; other tensors averaged; all times ``alpha``."""

    name = "tsv"
    Params = TSVParams
    note = CONV_NOTE

    def fallback(self, name: str, shape: tuple[int, ...]) -> str | None:
        return depthwise_fallback(name, shape)

    def _rank(self, k: int, g: int) -> int:
        frac = self.params.rank_fraction
        return k // g if frac is None else min(k, int(k * frac))

    def merge(self, group: GroupInput) -> StoredGroup:
        alpha = self.params.alpha
        merged: dict[str, torch.Tensor] = {}
        for name, taus in group.task_vectors.items():
            mats = as_matrices(name, taus)
            rank = self._rank(min(mats.shape[1:]), mats.shape[0]) if mats is not None else 0
            if rank > 0:
                out = tsv_matrix(mats, rank).reshape(taus.shape[1:])
            else:
                out = taus.to(torch.float64).mean(dim=0)
            merged[name] = (alpha * out).to(torch.float32)
        return StoredGroup(merged=merged)
