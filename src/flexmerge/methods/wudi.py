"""WUDI-Merging (Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", arXiv 2503.08099).

The paper's Proposition 1: a linear layer's task vector ``tau_i`` (``[out, in]``, the torch
layout) has rows that are approximately combinations of the layer's inputs during fine-tuning,
so the rows of ``tau_i`` stand in for task ``i``'s data. The interference the merged vector
``tau_m`` causes on task ``i``'s inputs is then bounded by ``||(tau_m - tau_i) tau_i^T||_F^2``,
and WUDI minimises, per 2-D tensor, the weighted sum::

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

over the ``g`` members of a block group, starting from the task-arithmetic sum
``tau_m = sum_i tau_i``. The result is used as is (the paper: "no rescaling coefficients").

With the ``[in, in]`` Grams ``G_i = tau_i^T tau_i`` and ``n_i = ||tau_i||_F^2``,
``||(tau_m - tau_i) tau_i^T||_F^2 = tr((tau_m - tau_i) G_i (tau_m - tau_i)^T)``, so with

    A = sum_i G_i / n_i   ([in, in])        B = sum_i tau_i G_i / n_i   ([out, in])

``L`` is quadratic, ``grad L = 2 (tau_m A - B)``, and nothing ``[out, out]`` is ever formed
(memory ``O(in^2 + out * in)``; a word embedding has 30522 rows). Two solvers:

* ``solver: adam`` (default; the paper and FusionBench's ``wudi_merging``): Adam (Kingma & Ba
  2015, ``torch.optim.Adam``, betas (0.9, 0.999), eps 1e-8, no weight decay) on ``L`` with
  ``lr = 1e-5`` for ``steps = 300``, in float32, from the sum. With that learning rate Adam moves
  each entry by at most about ``lr * steps = 3e-3``, so it stops well before the minimiser:
  the result is the sum pulled part of the way towards it.
* ``solver: closed_form``: the exact minimiser. ``L`` is minimal where ``tau_m A = B``; every
  row of ``B`` lies in the range of ``A`` (``range G_i`` is the row space of ``tau_i``), so
  ``tau_m = B A^+`` is a minimiser, the one of least norm, and the limit of plain gradient
  descent from the sum (whose rows lie in that range too). ``A^+`` comes from the eigenpairs of
  ``A`` in float64. ``A = S^T S`` with ``S`` the stacked ``tau_i / ||tau_i||``, so ``sqrt(eig A)``
  are ``S``'s singular values, and eigenvalues with ``sqrt(lambda) <= max(out, in) * eps32 *
  sqrt(lambda_max)`` are treated as zero: the rank rule :func:`.tsv.rank_tolerance` applies to
  one task matrix (``eps32`` because task vectors are float32 and directions below that
  resolution are rounding, not data). Then ``g`` identical task vectors give that vector.
  The exact minimiser can be far from the task vectors: where ``A`` is ill-conditioned (e.g. a
  ``[384, 1536]`` MLP output of 4 tasks, ``g * out = in``) it uses weak directions to cancel
  interference and grows entries far beyond the task vectors'. ``rcond`` (optional) also drops
  directions with ``sqrt(lambda) <= rcond * sqrt(lambda_max)``: a truncated pseudo-inverse, a
  regularised minimiser between the exact one and zero.

Tensors that are not 2-D (biases, norms, conv kernels) are averaged, as FusionBench does
(``sum / g``). Embedding tables are averaged by default (``embeddings: average``): an embedding
is a lookup by a one-hot token id, stored ``[vocab, dim]``, i.e. transposed against a linear
layer's ``[out, in]``, so the Gram FusionBench forms over its stored layout (``[dim, dim]``)
mixes hidden dimensions rather than inputs, and the paper's argument, made for linear layers,
does not cover it; the paper's own vision code optimises only the attention and MLP weights.
``embeddings: wudi`` optimises them like any 2-D tensor, as FusionBench does with its default
``exclude_keys: null``. A tensor counts as an embedding when its leaf or module name contains
``embed`` or is ``wte``, ``wpe`` or ``shared`` (BERT ``word_embeddings``, GPT-2 ``wte``, Llama
``embed_tokens``, T5 ``shared``, CLIP ``positional_embedding``); a linear layer whose name
contains ``embed`` (e.g. ALBERT's ``embeddings_project``) is therefore averaged too.

Where this differs from FusionBench's ``wudi_merging`` and the authors' code
(nathanielyvo/WUDI-Merging):

* The gradient comes from ``A`` and ``B`` (computed once, in float64, then float32 for the Adam
  loop) instead of autograd through the ``g`` products ``[out, out]``: the same gradient up to
  rounding, at one ``[out, in] x [in, in]`` product per step.
* ``steps`` defaults to 300, the default of FusionBench's function and of the authors' code;
  FusionBench's ``method/wudi/wudi.yaml`` sets ``iter_num: 400``. The weights ``1 / ||tau_i||^2``
  are FusionBench's and the authors' language code's; their vision code divides by
  ``||tau_i||`` (and uses ``lr = 1e-5``, the language code ``2e-5``).
* A task whose vector is zero has a zero term for every ``tau_m`` and is left out of ``L``
  (FusionBench divides by its zero norm and returns NaN).
* Embeddings are averaged by default (above); FusionBench has no scaling hyper-parameter and
  none is offered here.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, model_validator

from .base import GroupInput, MergeMethod, MethodParams, StoredGroup
from .registry import register
from .tsv import rank_tolerance

_EMBED_RE = re.compile(r"embed|^(wte|wpe|shared)$", re.IGNORECASE)


def is_embedding(name: str) -> bool:
    """True when the parameter ``name``'s leaf or module name marks an embedding table."""
    comps = name.split(".")
    return any(_EMBED_RE.search(c) for c in comps[-2:])


def wudi_system(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of one stack ``[g, out, in]`` in float64: ``A = sum_i G_i / n_i``,
    ``B = sum_i tau_i G_i / n_i`` with ``G_i = tau_i^T tau_i``, ``n_i = ||tau_i||_F^2``; zero
    task vectors are left out (their term of ``L`` is zero)."""
    _, out, inp = taus.shape
    a = torch.zeros(inp, inp, dtype=torch.float64, device=taus.device)
    b = torch.zeros(out, inp, dtype=torch.float64, device=taus.device)
    for tau in taus:  # one task at a time: temporaries O(in^2 + out * in)
        t = tau.to(torch.float64)
        n = float(t.square().sum())
        if n == 0.0:
            continue
        gram = t.T @ t
        a += gram / n
        b += (t @ gram) / n
    return a, b


def wudi_closed_form(taus: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """The least-norm minimiser ``B A^+`` of ``L`` for one stack ``[g, out, in]``, float64;
    with ``rcond``, directions of ``A`` with ``sqrt(lambda) <= rcond * sqrt(lambda_max)`` are
    dropped as well (a truncated pseudo-inverse)."""
    a, b = wudi_system(taus)
    evals, evecs = torch.linalg.eigh(a)
    lam_max = max(float(evals[-1]), 0.0)
    tol = rank_tolerance(lam_max ** 0.5, tuple(taus.shape[1:])) ** 2
    if rcond is not None:
        tol = max(tol, rcond ** 2 * lam_max)
    keep = evals > tol  # none when every task vector is zero: the result is zero
    v = evecs[:, keep]
    return ((b @ v) / evals[keep]) @ v.T


def wudi_adam(taus: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """``steps`` Adam steps on ``L`` from ``sum_i tau_i`` for one stack ``[g, out, in]``, float32
    (the paper's and FusionBench's optimiser); gradient ``2 (tau_m A - B)``."""
    a64, b64 = wudi_system(taus)
    a, b = a64.to(torch.float32), b64.to(torch.float32)
    merged = torch.nn.Parameter(taus.to(torch.float32).sum(dim=0))
    opt = torch.optim.Adam([merged], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    with torch.no_grad():
        for _ in range(steps):
            merged.grad = 2.0 * (merged @ a - b)
            opt.step()
    return merged.detach()


class WUDIParams(MethodParams):
    solver: Literal["adam", "closed_form"] = Field(
        "adam", description="adam: the paper's Adam steps from the sum; closed_form: the exact minimiser")
    steps: int = Field(300, ge=1, le=100_000,
                       description="Adam steps (the authors' code and FusionBench's function: 300)")
    lr: float = Field(1e-5, gt=0, le=1.0, description="Adam learning rate (paper and FusionBench: 1e-5)")
    embeddings: Literal["average", "wudi"] = Field(
        "average", description="embedding tables: averaged (default) or optimised like linear layers")
    rcond: float | None = Field(
        None, gt=0, lt=1, description="closed_form only: drop directions below rcond x the largest "
        "(a truncated pseudo-inverse); default: only those below float32 resolution")

    @model_validator(mode="after")
    def _rcond_needs_closed_form(self):
        if self.rcond is not None and self.solver != "closed_form":
            raise ValueError("rcond applies to solver closed_form only; add solver=closed_form or drop rcond")
        return self


@register
class WUDIMerging(MergeMethod):
    """WUDI-Merging (Cheng et al. 2025): per 2-D tensor, the merged vector minimising
    ``sum_i ||(tau_m - tau_i) tau_i^T||^2 / ||tau_i||^2`` (Adam from the sum, or exactly);
    other tensors and embeddings averaged."""

    name = "wudi"
    Params = WUDIParams

    def _optimised(self, name: str, taus: torch.Tensor) -> bool:
        if taus.dim() != 3 or min(taus.shape[1:]) == 0:
            return False
        return self.params.embeddings == "wudi" or not is_embedding(name)

    def merge(self, group: GroupInput) -> StoredGroup:
        p = self.params
        merged: dict[str, torch.Tensor] = {}
        for name, taus in group.task_vectors.items():
            if not self._optimised(name, taus):
                out = taus.to(torch.float64).mean(dim=0)
            elif p.solver == "closed_form":
                out = wudi_closed_form(taus, p.rcond)
            else:
                out = wudi_adam(taus, p.steps, p.lr)
            merged[name] = out.to(torch.float32)
        return StoredGroup(merged=merged)
