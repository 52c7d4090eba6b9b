"""DOGE (Wei et al., ICML 2025, "Modeling Multi-Task Model Merging as Adaptive Projective
Gradient Descent", arXiv 2501.01230), as FusionBench 0.2.33's ``doge_ta``
(``fusion_bench/method/doge_ta/doge_ta.py``, ``DOGE_TA_Algorithm``; config
``config/method/doge_ta/doge_ta.yaml``).

The paper merges by task arithmetic with a learnable modification vector ``Delta`` shared by all
tasks, chosen so that the merged layer acts on each task's inputs as that task's own layer does;
the inputs are unknown (data-free), and each task's own vector stands in for them. Per 2-D tensor
of a block group with members ``tau_1 .. tau_g`` (``[out, in]``, the torch layout):

1. **Task-aware coefficients** (the paper: "merging coefficients as adaptive learning rates"):
   ``lambda_i = lambda / ||tau_i||_F`` per tensor and task, so every ``lambda_i tau_i`` has the
   norm ``lambda``; ``Lambda = sum_i lambda_i``.
2. **Merged vector**: ``tau_m(Delta) = sum_i lambda_i (tau_i + Delta) = S + Lambda Delta``
   with ``S = sum_i lambda_i tau_i``.
3. **Data-free loss** (FusionBench's ``taskvector_loss``): with ``e_j = rowsum(tau_j * (tau_j -
   tau_m))`` (``[out]``, ``*`` elementwise; row ``r`` is ``<tau_j[r], tau_j[r] - tau_m[r]>``,
   the gap of row ``r`` on the input ``tau_j[r]``),

       L(Delta) = sum_j ||e_j||^2,    grad L = -2 Lambda sum_j diag(e_j) tau_j.

   The gradient is computed in that closed form (no autograd, no ``[out, out]`` product).
4. **Shared subspace** (the paper's projective step): each ``tau_i = U_i S_i V_i^T`` gives its
   top ``r = floor(min(out, in) / g)`` left singular vectors; ``U_bar = [U_1[:, :r] .. U_g[:, :r]]``
   and ``U_bar``'s top ``k = floor(min(out, in) / subspace)`` left singular vectors ``B``
   (``[out, k]``) span the subspace shared by the tasks. Each gradient loses its component
   there, ``grad <- grad - B (B^T grad)``, so the shared knowledge is kept; ``P = B B^T`` is
   never formed (a 30522-row embedding would need a 3.7 GB ``P``).
5. **Adam** (``torch.optim.Adam``, betas (0.9, 0.999), eps 1e-8, no weight decay) on ``Delta``
   from zero, ``lr = 1e-4``, ``steps = 400``, float32: FusionBench's optimiser and schedule.
6. **Top-k mask**: task ``i`` keeps the fraction ``k`` of its largest ``|tau_i|`` over its whole
   task vector (the tensors step 1-5 apply to, all blocks), once, in :meth:`Doge.global_pass`;
   the merged vector is ``sum_i lambda_i (tau_i + Delta) * m_i`` with ``m_i = 1[|tau_i| >= thr_i]``.

Hyper-parameters and defaults (FusionBench's ``doge_ta.yaml`` and code): ``lambda = 0.07``
(``lamda``), ``k = 0.3`` (``K: 30``, a percentage there), ``subspace = 6``; ``lr = 1e-4`` and
``steps = 400`` are hard-coded there and parameters here. ``lambda`` is an absolute norm per task
and tensor: the merged vector's size does not follow the task vectors', so ``lambda`` tuned on
one model family (FusionBench's default: CLIP ViT-B/32) need not suit another.

Tensors DOGE does not optimise (``others``): FusionBench merges only the keys containing
``encoder`` and ``weight`` but not ``layer_norm`` (CLIP's encoder matrices) and leaves every other
tensor at its pretrained value (biases, norms, embeddings, the pre/post norms); ``others:
pretrained`` (default) does the same: merged task vector 0. ``others: average`` averages them.
Embedding tables (:func:`.wudi.is_embedding`, never ``encoder`` keys in FusionBench) follow
``others`` by default; ``embeddings: doge`` optimises them as matrices (the subspace then lies in
the ``[vocab]`` side; memory ``O(g * vocab * dim)``, no ``[vocab, vocab]`` product).

Where this differs from FusionBench's ``doge_ta``, and why:

* Block level: coefficients, subspace and loss use the ``g`` members of a group (at size 1, the
  ``N`` tasks, as there); a group of one keeps its member's vector (the engine stores originals).
* The mask keeps exactly ``floor(k D)`` entries per task (ties at the threshold kept), as
  :mod:`.ties` does; FusionBench's ``topk_values_mask`` takes ``kthvalue(D - floor(k D))`` and
  keeps one more. Its population is the tensors DOGE optimises, recognised in the streamed pass
  by shape; a tensor streamed in chunks (more than 2^21 elements) counts as a matrix, so a
  large conv kernel would join the population, which FusionBench's key filter leaves out.
* A zero task vector gets ``lambda_i = 0`` (FusionBench: ``lambda / 0`` and a NaN merge).
  Singular vectors of zero singular value (a task vector of rank below ``r``, or ``U_bar`` of
  rank below ``k``) are dropped (:func:`.tsv.rank_tolerance`): they are arbitrary, and
  FusionBench's would depend on the LAPACK build. SVDs run in float64.
* The gradient is the closed form above instead of autograd: the same up to rounding.
* FusionBench's ``subspace`` and ``K`` names are kept; ``K`` is a fraction here, like TIES's ``k``.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from pydantic import Field

from ..errors import FlexMergeError
from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup, TaskVectorStream
from .registry import register
from .ties import global_topk_thresholds
from .tsv import rank_tolerance
from .wudi import is_embedding


def doge_lambdas(taus: torch.Tensor, lam: float) -> torch.Tensor:
    """Task-aware coefficients ``lambda / ||tau_i||_F`` of one stack ``[g, *shape]``, float32
    ``[g]``; 0 for a zero task vector."""
    norms = taus.to(torch.float64).reshape(len(taus), -1).norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, lam / safe, torch.zeros_like(norms)).to(torch.float32)


def _top_left(t: torch.Tensor, r: int) -> torch.Tensor:
    """The top ``r`` left singular vectors of ``t`` (float64) with non-zero singular value."""
    u, s, _ = torch.linalg.svd(t, full_matrices=False)
    keep = int((s[:r] > rank_tolerance(s[0], tuple(t.shape))).sum()) if s.numel() else 0
    return u[:, :keep]


def shared_basis(taus: torch.Tensor, subspace: int) -> torch.Tensor:
    """Orthonormal basis ``B`` (``[out, k']``, float32, ``k' <= floor(min(out, in) / subspace)``)
    of the shared subspace of one stack ``[g, out, in]``: the top left singular vectors of the
    members' top ``floor(min(out, in) / g)`` left singular vectors side by side (step 4)."""
    g, out, inp = taus.shape
    low = min(out, inp)
    r, k = low // g, low // subspace
    if r == 0 or k == 0:
        return torch.zeros(out, 0)
    u_bar = torch.cat([_top_left(t.to(torch.float64), r) for t in taus], dim=1)
    if u_bar.shape[1] == 0:
        return torch.zeros(out, 0)
    return _top_left(u_bar, k).to(torch.float32)


def doge_gradient(taus: torch.Tensor, lams: torch.Tensor, delta: torch.Tensor,
                  consts: torch.Tensor | None = None) -> torch.Tensor:
    """``grad L(Delta) = -2 Lambda sum_j diag(e_j) tau_j`` (step 3) for ``taus`` ``[g, out, in]``,
    ``e_j = c_j - Lambda rowsum(tau_j * Delta)`` with ``c_j = rowsum(tau_j * (tau_j - S))``
    (``consts``, computed when not given); in the dtype of ``delta``."""
    big_lam = float(lams.sum())
    if consts is None:
        consts = doge_consts(taus, lams)
    grad = torch.zeros_like(delta)
    for tau, c in zip(taus, consts):  # one task at a time: temporaries O(out)
        e = c - big_lam * torch.einsum("oi,oi->o", tau, delta)
        grad.addcmul_(e.unsqueeze(1), tau)
    return grad.mul_(-2.0 * big_lam)


def doge_consts(taus: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """``c_j = rowsum(tau_j * (tau_j - S))``, ``S = sum_i lambda_i tau_i``: ``[g, out]`` in the
    dtype of ``taus``, accumulated in float64."""
    s = torch.zeros(taus.shape[1:], dtype=torch.float64)
    for lam, tau in zip(lams.tolist(), taus):
        s.add_(tau.to(torch.float64), alpha=lam)
    return torch.stack([torch.einsum("oi,oi->o", t64, t64 - s)
                        for t64 in (t.to(torch.float64) for t in taus)]).to(taus.dtype)


def doge_delta(taus: torch.Tensor, lams: torch.Tensor, basis: torch.Tensor, steps: int,
               lr: float) -> torch.Tensor:
    """``Delta`` after ``steps`` Adam steps from zero on ``L`` with gradients projected off the
    shared subspace ``basis`` (steps 3-5), float32 ``[out, in]``."""
    taus = taus.to(torch.float32)
    consts = doge_consts(taus, lams)
    delta = torch.nn.Parameter(torch.zeros(taus.shape[1:]))
    opt = torch.optim.Adam([delta], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    with torch.no_grad():
        for _ in range(steps):
            grad = doge_gradient(taus, lams, delta, consts)
            if basis.shape[1]:
                grad.sub_(basis @ (basis.T @ grad))
            delta.grad = grad
            opt.step()
    return delta.detach()


def doge_matrix(taus: torch.Tensor, lams: torch.Tensor, masks: torch.Tensor | None, subspace: int,
                steps: int, lr: float) -> torch.Tensor:
    """The merged vector ``sum_i lambda_i (tau_i + Delta) * m_i`` of one stack ``[g, out, in]``
    (steps 1-6; ``masks`` ``[g, out, in]`` bool or ``None`` for no mask), float32."""
    delta = doge_delta(taus, lams, shared_basis(taus, subspace), steps, lr)
    merged = torch.zeros(taus.shape[1:], dtype=torch.float32)
    for i, lam in enumerate(lams.tolist()):
        adjusted = taus[i].to(torch.float32) + delta
        if masks is not None:
            adjusted.mul_(masks[i])
        merged.add_(adjusted, alpha=lam)
    return merged


class DogeParams(MethodParams):
    lam: float = Field(0.07, alias="lambda", gt=0, le=MAX_SCALE,
                       description="norm of each task's scaled vector lambda_i tau_i (FusionBench lamda: 0.07)")
    k: float = Field(0.3, gt=0, le=1, description="fraction of each task vector kept by the top-k mask "
                     "(FusionBench K: 30 percent); 1 keeps all")
    subspace: int = Field(6, ge=1, le=1_000_000, description="shared subspace of dimension "
                          "floor(min(out, in) / subspace) (FusionBench: 6)")
    steps: int = Field(400, ge=0, le=100_000, description="Adam steps on Delta (FusionBench: 400)")
    lr: float = Field(1e-4, gt=0, le=1.0, description="Adam learning rate (FusionBench: 1e-4)")
    others: Literal["pretrained", "average"] = Field(
        "pretrained", description="tensors not optimised: kept pretrained (FusionBench) or averaged")
    embeddings: Literal["others", "doge"] = Field(
        "others", description="embedding tables: treated as 'others' (FusionBench) or optimised")


@register
class Doge(MergeMethod):
    """DOGE (Wei et al. 2025) as FusionBench's doge_ta: per 2-D tensor, task-aware lambdas, a
    shared Delta by projected Adam, a global top-k mask; other tensors pretrained or averaged."""

    name = "doge"
    Params = DogeParams
    note = ("doge optimises 2-D tensors; other tensors and embedding tables keep their pretrained "
            "values (others: pretrained, as FusionBench) unless others=average or embeddings=doge")

    def __init__(self, seed: int = 0, **params):
        super().__init__(seed=seed, **params)
        self.thresholds: torch.Tensor | None = None
        """Per-task top-k mask thresholds ``[N]`` set by :meth:`global_pass` (``None`` before)."""

    def _optimised(self, name: str, taus: torch.Tensor) -> bool:
        if taus.dim() != 3 or min(taus.shape[1:]) == 0:
            return False
        return self.params.embeddings == "doge" or not is_embedding(name)

    def _population(self, stream: TaskVectorStream) -> Iterator[tuple[str, torch.Tensor]]:
        """The items of ``stream`` of the tensors DOGE optimises: 2-D tensors ``[N, out, in]``
        and tensors streamed in several flat chunks (one chunk ``[N, k]`` alone is a 1-D tensor)."""
        held: tuple[str, torch.Tensor] | None = None
        chunked = ""
        for name, taus in stream():
            if self.params.embeddings != "doge" and is_embedding(name):
                continue
            if held is not None:
                if held[0] == name:
                    chunked = name
                    yield held
                held = None
            if taus.dim() == 3 or name == chunked:
                yield name, taus
            elif taus.dim() == 2:
                held = (name, taus)  # 1-D, unless the next item has the same name
        # a held item at the end is a 1-D tensor

    def global_pass(self, stream: TaskVectorStream, num_tasks: int) -> None:
        if self.params.k >= 1:
            self.thresholds = None  # no mask
            return
        self.thresholds = global_topk_thresholds(lambda: self._population(stream), num_tasks, self.params.k)

    def _masks(self, group: GroupInput, name: str, taus: torch.Tensor) -> torch.Tensor | None:
        if self.params.k >= 1:
            return None
        if self.thresholds is None:
            raise FlexMergeError(
                "method 'doge': the global top-k mask has not been computed; call global_pass(stream, N) "
                "before merge (the engine does this before planning)")
        if max(group.task_ids) >= self.thresholds.numel():
            raise FlexMergeError(
                f"method 'doge': tensor '{name}' has task {max(group.task_ids)} but the mask was "
                f"computed for {self.thresholds.numel()} tasks; rerun global_pass")
        thr = self.thresholds[group.task_ids].reshape(-1, 1, 1)
        return taus.abs() >= thr

    def merge(self, group: GroupInput) -> StoredGroup:
        p = self.params
        merged: dict[str, torch.Tensor] = {}
        for name, taus in group.task_vectors.items():
            if len(taus) == 1:
                merged[name] = taus[0].to(torch.float32).clone()
            elif self._optimised(name, taus):
                lams = doge_lambdas(taus, p.lam)
                merged[name] = doge_matrix(taus, lams, self._masks(group, name, taus), p.subspace,
                                           p.steps, p.lr)
            elif p.others == "average":
                merged[name] = taus.to(torch.float64).mean(dim=0).to(torch.float32)
            else:
                merged[name] = torch.zeros(taus.shape[1:], dtype=torch.float32)
        return StoredGroup(merged=merged)
