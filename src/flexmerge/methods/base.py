"""The merge-method interface: what every data-free method implements, and what the engine stores.

A method sees task vectors, never files or plans (docs/architecture.md, the module table). Three hooks:

* :meth:`MergeMethod.global_pass` (optional) runs over *all* task vectors of *all* tasks before
  planning, e.g. TIES's global top-k trim (Yadav et al. 2023; FlexMerge Appendix B.1).
* :meth:`MergeMethod.transform` maps the stacked task vectors ``[N, *shape]`` of one tensor to what
  both similarity and merging see (TIES: trimmed; DARE: dropped and rescaled). Default: identity.
* :meth:`MergeMethod.merge` turns one block group (``g >= 2`` tasks) into a :class:`StoredGroup`.

Rebuild rule for a task ``t`` at position ``i`` of a group (FlexMerge Sec. 3, and the mask
methods' own papers)::

    theta_t = theta_0 + scalars[i] * (masks[name][i] * merged[name])

with ``scalars`` = 1 and ``masks`` = all-ones when absent. Plain methods (no masks, no scalars) are
stored as merged *weights* ``theta_0 + merged`` so that they need no pretrained block; mask methods
store ``merged`` plus bit-packed masks, scalars and the pretrained block once per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from ..errors import FlexMergeError

TaskVectorStream = Callable[[], Iterator[tuple[str, torch.Tensor]]]
"""Calling it starts one pass over every mergeable tensor: yields ``(name, taus)`` with ``taus`` the
float32 task vectors of all N tasks stacked as ``[N, *shape]`` (before :meth:`transform`). When the
method's transform is elementwise (or absent), a large tensor may come as several flat element
ranges ``[N, k]`` under the same name."""


MAX_SCALE = 1000.0
"""Upper bound of every scaling hyper-parameter (lambda, alpha, TALL's lambda_c, DARE's 1/(1-p)).

The methods' papers tune these scales in a few units (task arithmetic: lambda <= 1 on the *sum*
of task vectors, Ilharco et al. 2023; TIES: 0.8-1.8; TALL: lambda_c 0.2-0.6; DARE: p <= 0.99).
Here task arithmetic scales the *mean* (lambda = sum-form lambda x N, :mod:`.average`), so 1000
covers sum-form lambda = 1 for up to 1000 tasks. Larger scales push the task vectors far past the
weights they modify and overflow half-precision checkpoints (float16 max 65504), and 1e39 is
already infinite in float32."""


class MethodParams(BaseModel):
    """Base of every method's hyper-parameters: unknown keys, non-finite numbers (``allow_inf_nan``)
    and booleans given for numbers are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info: ValidationInfo):
        # pydantic's lax mode reads True as 1.0; "--set lambda=yes" is a mistake, not lambda=1.
        if isinstance(v, bool):
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool:
                raise ValueError(f"expected a number, got the boolean {v}")
        return v


@dataclass
class GroupInput:
    """One block group handed to :meth:`MergeMethod.merge`.

    ``task_vectors[name]`` is ``[g, *shape]`` float32 (after :meth:`MergeMethod.transform`), rows in
    the order of ``task_ids`` (indices into the config's task list); ``base[name]`` is the
    pretrained tensor in float32; ``block`` names the block (for seeding and messages).
    """

    task_vectors: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    task_ids: list[int]
    block: str = ""
    seed: int = 0

    @property
    def size(self) -> int:
        return len(self.task_ids)


@dataclass
class StoredGroup:
    """What a method stores for one group.

    ``merged[name]``: the merged task vector (float32, shape of the parameter).
    ``masks[name]``: optional bool ``[g, *shape]``, one mask per member (stored one bit each).
    ``scalars``: optional float32 ``[g]``, one rescaler per member.
    """

    merged: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None = None
    scalars: torch.Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def needs_base(self) -> bool:
        return self.masks is not None or self.scalars is not None

    def rebuild_delta(self, position: int, name: str) -> torch.Tensor:
        """The task vector that member ``position`` rebuilds for parameter ``name``."""
        delta = self.merged[name]
        if self.masks is not None:
            delta = delta * self.masks[name][position]
        if self.scalars is not None:
            delta = delta * self.scalars[position]
        return delta


class MergeMethod:
    """Base class of all merge methods; subclasses set ``name``, ``Params`` and :meth:`merge`.

    Class attributes used for exact size accounting (see :mod:`flexmerge.sizes`):
    ``stores_masks`` (one bit per element per member) and ``stores_scalars`` (one float32 per
    member); either implies the pretrained block is stored once per block.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    stores_masks: ClassVar[bool] = False
    stores_scalars: ClassVar[bool] = False
    randomized: ClassVar[bool] = False
    elementwise_transform: ClassVar[bool] = False
    """True when :meth:`transform` on a flat element range of a tensor equals that range of the
    transform of the whole tensor (e.g. a trim by per-task thresholds): the similarity pass may
    then stream large tensors in chunks, bounding memory by N x chunk instead of N x tensor."""
    elementwise_merge: ClassVar[bool] = False
    """True when the merge of a group is computed entry by entry (task arithmetic, averaging,
    MagMax, TIES given its trim): the engine may then merge large tensors in flat chunks through
    :meth:`chunked_merge`, holding N x chunk task vectors instead of a whole block of N tasks
    (docs/architecture.md, "Memory"). A block-level rule (TIES's zero-sum majority sign) is kept
    exact by overriding :class:`ChunkedMerge`. Such a method's :meth:`global_pass` must keep no
    task vector once it asks the stream for the next (the stream then reuses its buffers)."""
    note: ClassVar[str] = ""
    """What a user should know about how the method treats some tensors (``flexmerge methods``)."""
    order_invariant: ClassVar[bool] = True
    """True when :meth:`merge` of a group whose members come in another order stores the same merge
    (masks and scalars following their members), up to floating-point summation order. A method
    whose result depends on member order (e.g. ties broken by position) sets it False."""

    def __init__(self, seed: int = 0, **params):
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            raise FlexMergeError(_describe_param_error(self, exc)) from None
        self.seed = int(seed)

    # -- hooks -------------------------------------------------------------------------------
    def global_pass(self, stream: TaskVectorStream, num_tasks: int) -> None:
        """Optional pass over all task vectors before planning (default: nothing)."""

    def transform(self, name: str, taus: torch.Tensor) -> torch.Tensor:
        """Task vectors of one tensor, ``[N, *shape]``, as similarity and merging see them."""
        return taus

    def merge(self, group: GroupInput) -> StoredGroup:  # pragma: no cover - abstract
        raise NotImplementedError

    def fallback(self, name: str, shape: tuple[int, ...]) -> str | None:
        """What the method does instead of its own rule for tensor ``name`` of ``shape``, when it
        does (e.g. TSV-M averages depthwise kernels); the bundle's manifest lists these under
        ``notes``. None when the method's rule applies."""
        return None

    def chunked_merge(self, group: GroupInput, shapes: dict[str, tuple[int, ...]]) -> "ChunkedMerge":
        """A merge of ``group`` (its ``task_vectors`` empty) fed chunk by chunk; only for methods
        with :attr:`elementwise_merge`."""
        return ChunkedMerge(self, group, shapes)

    # -- helpers -----------------------------------------------------------------------------
    @property
    def needs_base(self) -> bool:
        return self.stores_masks or self.stores_scalars

    @property
    def has_global_pass(self) -> bool:
        """Whether :meth:`global_pass` does anything: the class (or a wrapper's inner method)
        overrides it, so the engine must stream every task vector through it before planning."""
        return type(self).global_pass is not MergeMethod.global_pass

    @property
    def has_transform(self) -> bool:
        """Whether :meth:`transform` changes task vectors: the class (or a wrapper's inner method)
        overrides it, so Grams and merges must see the transformed vectors."""
        return type(self).transform is not MergeMethod.transform

    def describe(self) -> dict:
        """``{"name": ..., **params}`` as written to manifests and plans."""
        return {"name": self.name, **self.params.model_dump(by_alias=True)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump(by_alias=True).items())
        return f"{type(self).__name__}({args})"


class ChunkedMerge:
    """One group's merge, fed flat element ranges ``[g, k]`` of its tensors in order (each tensor
    from element 0 to its end); :meth:`result` is the :class:`StoredGroup` that :meth:`MergeMethod.merge`
    gives on the whole tensors. Holds the merged float32 vectors of the group's block (one copy,
    whatever the number of tasks)."""

    def __init__(self, method: MergeMethod, group: GroupInput, shapes: dict[str, tuple[int, ...]]):
        self.method = method
        self.group = group
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.merged: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}

    def add(self, name: str, taus: torch.Tensor, base: torch.Tensor) -> None:
        """The next ``k`` elements of tensor ``name``: task vectors ``[g, k]``, pretrained ``[k]``."""
        numel = 1
        for d in self.shapes[name]:
            numel *= d
        if name not in self.merged:
            self.merged[name] = torch.empty(numel, dtype=torch.float32)
            self._filled[name] = 0
        start = self._filled[name]
        k = taus.shape[1]
        if start + k > numel:
            raise RuntimeError(f"tensor '{name}': chunks past its {numel} elements")
        self.merged[name][start:start + k] = self.merge_chunk(name, start, taus, base)
        self._filled[name] = start + k

    def merge_chunk(self, name: str, start: int, taus: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The merged task vector of one chunk (default: :meth:`MergeMethod.merge` on the chunk)."""
        part = GroupInput(task_vectors={name: taus}, base={name: base}, task_ids=self.group.task_ids,
                          block=self.group.block, seed=self.group.seed)
        return self.method.merge(part).merged[name]

    def result(self) -> StoredGroup:
        for name, numel in self._filled.items():
            if numel != self.merged[name].numel():
                raise RuntimeError(f"tensor '{name}': {numel} of {self.merged[name].numel()} elements merged")
        return StoredGroup(merged={n: m.view(self.shapes[n]) for n, m in self.merged.items()})


def method_text(described: dict) -> str:
    """A method as a user writes it: ``ties (k=0.2, lambda=1.0)``; parameters left unset (None)
    are not shown, an inner method (``consensus``) is written the same way."""
    params = ", ".join(f"{k}={method_text(v) if isinstance(v, dict) else v}" for k, v in described.items()
                       if k != "name" and v is not None)
    return f"{described.get('name')}" + (f" ({params})" if params else "")


def _describe_param_error(method: MergeMethod, exc: ValidationError) -> str:
    allowed = ", ".join(
        (f.alias or k) for k, f in method.Params.model_fields.items()
    ) or "none"
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown parameter '{loc}' (allowed: {allowed})")
        elif loc:
            parts.append(f"parameter '{loc}' = {err.get('input')!r}: {msg}")
        else:
            parts.append(msg)
    return f"method '{method.name}': " + "; ".join(parts) + "; see 'flexmerge methods'"


def group_mean(group: GroupInput) -> dict[str, torch.Tensor]:
    """Mean task vector of a group, per parameter (FlexMerge Eq. for block-level averaging)."""
    return {name: taus.mean(dim=0) for name, taus in group.task_vectors.items()}


def seeded_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and stable keys (task index, tensor name...).

    Randomness is keyed by *what* it applies to, never by call order, so results are the same
    whatever the plan, block order or number of groups.
    """
    import zlib

    text = "\x1f".join(str(k) for k in (seed, *keys))
    gen = torch.Generator(device="cpu")
    gen.manual_seed(zlib.crc32(text.encode()) + (int(seed) << 32) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen
