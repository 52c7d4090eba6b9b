"""DARE: Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario"), then an
inner merge method.

Per task ``t`` and tensor (DARE Sec. 3, drop then rescale): ``m ~ Bernoulli(p)`` per entry,
``tau_t <- (1 - m) * tau_t / (1 - p)``, so every entry keeps its expectation. The drop is a
:meth:`Dare.transform`: similarity and merging both see the dropped vectors (as FlexMerge's code
does: "sparsified task vectors for both selection and merging"). The randomness is keyed by
``(seed, task index, tensor name)`` through :func:`~flexmerge.methods.base.seeded_generator`, so a
task's dropped vector is the same whatever the plan, the block order or the group it lands in;
same seed, same result.

Then ``inner``:

* ``task_arithmetic`` (default): ``lambda * mean_t tau_t`` (FlexMerge's block-level task
  arithmetic; default ``lambda`` 1.5 as there).
* ``ties``: sign election by mass + disjoint mean, ``* lambda`` (default 1.0). By default **no
  top-k trim** (``k`` = 1): DARE's random drop already is the sparsification, which is what
  mergekit's ``dare_ties`` and FlexMerge's code (``--DARE`` with ``K`` = 1) do. The DARE authors'
  code (MergeLM) instead also applies TIES's magnitude trim to the dropped vectors; set ``k`` < 1
  for that: the global trim then runs on the *dropped* vectors in :meth:`Dare.global_pass`.

Differences: FlexMerge's ``dare_preprocess`` draws one generator stream over the flattened model
(so the mask depends on tensor order); ours is keyed per tensor. mergekit's ``dare_*`` sum
``weight``-scaled vectors and may normalise; ours use the group mean, like FlexMerge.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from ..errors import FlexMergeError
from .base import MAX_SCALE, GroupInput, MergeMethod, MethodParams, StoredGroup, TaskVectorStream, seeded_generator
from .registry import method_class, register
from . import average as _average, ties as _ties  # noqa: F401  (register the inner methods)

_INNER = ("task_arithmetic", "ties")


class DareParams(MethodParams):
    p: float = Field(0.9, ge=0, lt=1, description="drop probability; survivors are rescaled by 1/(1-p)")
    inner: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="method merging the dropped vectors")
    lam: Optional[float] = Field(None, alias="lambda", gt=0, le=MAX_SCALE,
                                 description="scaling of the inner method (default: its own default)")
    k: Optional[float] = Field(None, gt=0, le=1,
                               description="inner ties only: global top-k trim of the dropped "
                                           "vectors (default 1 = none)")

    @model_validator(mode="before")
    @classmethod
    def _inner_default_lambda(cls, data):
        if isinstance(data, dict) and "lambda" not in data and "lam" not in data:
            inner = data.get("inner", "task_arithmetic")
            if inner in _INNER:
                field = method_class(inner).Params.model_fields["lam"]
                data = {**data, "lambda": field.default}
        return data

    @model_validator(mode="after")
    def _rescale_bounded(self):
        # survivors are multiplied by 1/(1-p); bound it like every other scale (base.MAX_SCALE)
        if self.p > 0 and 1.0 / (1.0 - self.p) > MAX_SCALE:
            raise ValueError(f"p = {self.p} rescales survivors by 1/(1-p) = {1.0 / (1.0 - self.p):.4g}, "
                             f"above {MAX_SCALE:g}; use p <= {1 - 1 / MAX_SCALE:g} (the DARE paper goes to 0.99)")
        return self

    @model_validator(mode="after")
    def _k_only_for_ties(self):
        if self.k is not None and self.inner != "ties":
            raise ValueError("'k' (top-k trim) applies only with inner: ties")
        return self


def dare_drop(taus: torch.Tensor, p: float, seed: int, name: str) -> torch.Tensor:
    """Drop each entry of row ``t`` of ``taus [N, *shape]`` with probability ``p`` (generator keyed
    by ``(seed, "dare", t, name)``) and rescale survivors by ``1 / (1 - p)``."""
    if p == 0:
        return taus
    out = torch.empty_like(taus)
    scale = 1.0 / (1.0 - p)
    for t in range(taus.shape[0]):
        gen = seeded_generator(seed, "dare", t, name)
        keep = torch.rand(taus.shape[1:], generator=gen, dtype=torch.float32) >= p
        out[t] = taus[t] * keep.to(taus.device) * scale
    return out


@register
class Dare(MergeMethod):
    """DARE (random drop with probability p, rescale by 1/(1-p)) followed by ``inner``."""

    name = "dare"
    Params = DareParams
    randomized = True

    def __init__(self, seed: int = 0, **params):
        super().__init__(seed=seed, **params)
        inner_params = {"lambda": self.params.lam}
        if self.params.inner == "ties":
            inner_params["k"] = 1.0 if self.params.k is None else self.params.k
        try:
            self.inner: MergeMethod = method_class(self.params.inner)(seed=seed, **inner_params)
        except FlexMergeError as exc:  # pragma: no cover - params are validated above
            raise FlexMergeError(f"method 'dare': inner {exc}") from None

    def _drop(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        return dare_drop(taus, self.params.p, self.seed, name)

    def global_pass(self, stream: TaskVectorStream, num_tasks: int) -> None:
        if not self.inner.has_global_pass:
            return
        self.inner.global_pass(lambda: ((n, self._drop(n, t)) for n, t in stream()), num_tasks)

    def transform(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        dropped = self._drop(name, taus)
        return self.inner.transform(name, dropped) if self.inner.has_transform else dropped

    def merge(self, group: GroupInput) -> StoredGroup:
        return self.inner.merge(group)
