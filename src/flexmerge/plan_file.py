"""The plan file's one owner: ``plan.json`` (format ``flexmerge-plan``, version
:data:`PLAN_VERSION`) read within bounds, decoded strictly (no NaN/Infinity) and checked against a
versioned pydantic schema, every violation one line naming the field. :class:`flexmerge.plan.Plan`
turns it into and out of its own types (``Plan.to_dict`` / ``Plan.from_dict``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator
from pydantic import Field as PydField

from .errors import FlexMergeError, first_validation_error

PLAN_FORMAT = "flexmerge-plan"
PLAN_VERSION = 1
PLAN_MAX_BYTES = 1 << 30  # a plan holds N x N Gram matrices per block: ~70 MB for 100 tasks x 320 blocks
FITS = ("prefix", "fill")


def read_plan(path: str | os.PathLike) -> Any:
    """The decoded JSON of the plan file at ``path`` (not yet checked: :meth:`PlanFile.check`);
    a directory, a missing or unreadable file, more than :data:`PLAN_MAX_BYTES`, text that is not
    UTF-8 or not JSON, and non-finite numbers are one line each."""
    p = Path(path).expanduser()
    hint = "make one with 'flexmerge plan'"
    if p.is_dir():
        raise FlexMergeError(f"plan {p} is a directory; give the plan.json file ({hint})")
    try:
        with open(p, "rb") as fh:  # bounded: /dev/zero or a huge file must not exhaust memory
            raw = fh.read(PLAN_MAX_BYTES + 1)
    except FileNotFoundError:
        raise FlexMergeError(f"plan file not found: {path}; {hint}") from None
    except OSError as exc:
        raise FlexMergeError(f"cannot read plan {p}: {exc.strerror or exc}; check its permissions") from None
    if len(raw) > PLAN_MAX_BYTES:
        raise FlexMergeError(f"{p} is larger than {PLAN_MAX_BYTES >> 30} GiB, too large for a plan; {hint}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlexMergeError(f"{p} is not a JSON text file (not UTF-8 at byte {exc.start}); {hint}") from None

    def no_constant(name):
        raise ValueError(f"{name} is not allowed")

    try:
        d = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise FlexMergeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                             "re-run 'flexmerge plan'") from None
    except ValueError as exc:  # NaN / Infinity
        raise FlexMergeError(f"{p}: {exc} in a plan (numbers must be finite); re-run 'flexmerge plan'") from None
    except RecursionError:
        raise FlexMergeError(f"{p}: JSON nested too deeply to be a plan; {hint}") from None
    return d



class _Schema(BaseModel):
    # unknown keys are ignored (a newer writer may add some); numbers must be finite
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)


class PlanBlockEntry(_Schema):
    name: StrictStr
    bytes: StrictInt = PydField(ge=0)
    mask_bytes: StrictInt = PydField(0, ge=0)


class PlanSize(_Schema):
    size_bytes: StrictInt = PydField(ge=0)
    size_units: Optional[StrictFloat] = None


class PlanStepEntry(_Schema):
    block: StrictStr
    groups: list[list[StrictStr]] = PydField(min_length=2, max_length=2)
    similarity: StrictFloat
    size_bytes: StrictInt = PydField(ge=0)
    size_units: StrictFloat


def _check_trajectory(label: str, steps: list, tasks: dict, blocks: set) -> None:
    """Every step names a known block and merges two current groups of it (a partition)."""
    n = len(tasks)
    if len(steps) > len(blocks) * (n - 1):
        raise ValueError(f"'{label}': {len(steps)} merges, more than blocks x (tasks - 1) = "
                         f"{len(blocks) * (n - 1)}")
    groups = {b: {frozenset([t]) for t in tasks} for b in blocks}
    for k, st in enumerate(steps):
        if st.block not in blocks:
            raise ValueError(f"'{label}.{k}.block': unknown block {st.block!r}")
        a, b = (frozenset(g) for g in st.groups)
        for g, raw in zip((a, b), st.groups):
            unknown = [t for t in raw if t not in tasks]
            if unknown:
                raise ValueError(f"'{label}.{k}.groups': unknown task {unknown[0]!r}")
            if len(raw) != len(g) or g not in groups[st.block]:
                raise ValueError(f"'{label}.{k}.groups': {raw} is not a current group of block "
                                 f"{st.block!r} (merges must join two whole groups)")
        if a == b:
            raise ValueError(f"'{label}.{k}.groups': merges a group with itself")
        groups[st.block] -= {a, b}
        groups[st.block].add(a | b)


class PlanAlternative(_Schema):
    """An ``auto`` plan's other candidate trajectory."""

    fit: Literal["prefix", "fill"]
    steps: list[PlanStepEntry]


class PlanFile(_Schema):
    """``plan.json`` (format ``flexmerge-plan``, version :data:`PLAN_VERSION`), as
    :meth:`Plan.to_dict` writes it. Beyond types: task and block names are unique, every step
    names a known block and merges two *current* groups of it (the groups stay a partition of the
    tasks), there are at most ``blocks x (tasks - 1)`` steps, and the Gram matrices, when present,
    are ``tasks x tasks`` for every block."""

    format: Literal["flexmerge-plan"]
    version: StrictInt
    tasks: list[StrictStr] = PydField(min_length=2)
    method: dict[str, Any]
    planner: StrictStr = "similarity"
    fit: StrictStr = "prefix"
    linkage: Literal["min", "max", "avg"]
    order: Literal["greedy", "left-right", "right-left", "random"]
    seed: StrictInt
    unit_bytes: StrictInt = PydField(gt=0)
    start: PlanSize
    task_specific_bytes: dict[str, StrictInt] = PydField(default_factory=dict)
    blocks: list[PlanBlockEntry] = PydField(min_length=1)
    steps: list[PlanStepEntry]
    grams: dict[str, list[list[StrictFloat]]] = PydField(default_factory=dict)
    alternatives: dict[str, PlanAlternative] = PydField(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "PlanFile":
        from .config import SEED_LIMIT
        from .planners import check_planner

        try:
            check_planner(self.planner)
        except FlexMergeError as exc:
            raise ValueError(f"'planner': {exc}") from None
        if self.fit not in FITS:
            raise ValueError(f"'fit': must be one of {', '.join(FITS)}, got {self.fit!r}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"'seed': must be from 0 to {SEED_LIMIT - 1}, got {self.seed}")
        if not isinstance(self.method.get("name"), str):
            raise ValueError("'method': needs a 'name' string")
        for what, names in (("tasks", self.tasks), ("blocks", [b.name for b in self.blocks])):
            twice = sorted({x for x in names if names.count(x) > 1})
            if twice:
                raise ValueError(f"'{what}': {', '.join(map(repr, twice))} listed twice")
        tasks = {t: i for i, t in enumerate(self.tasks)}
        for t, nb in self.task_specific_bytes.items():
            if t not in tasks or nb < 0:
                raise ValueError(f"'task_specific_bytes.{t}': not a task of the plan or negative")
        n, blocks = len(self.tasks), {b.name for b in self.blocks}
        for name, alt in self.alternatives.items():
            try:
                check_planner(name)
            except FlexMergeError as exc:
                raise ValueError(f"'alternatives.{name}': {exc}") from None
        for label, steps in [("steps", self.steps)] + [(f"alternatives.{k}.steps", v.steps)
                                                      for k, v in self.alternatives.items()]:
            _check_trajectory(label, steps, tasks, blocks)
        if self.grams:
            if set(self.grams) != blocks:
                raise ValueError("'grams': must have one matrix per block")
            for name, g in self.grams.items():
                if len(g) != n or any(len(row) != n for row in g):
                    raise ValueError(f"'grams.{name}': must be a {n} x {n} matrix")
        return self

    @classmethod
    def check(cls, d: Any, where: str) -> "PlanFile":
        """Validate the decoded JSON of a plan; one line naming the field on any violation."""
        fix = "re-run 'flexmerge plan'"
        if not isinstance(d, dict):
            raise FlexMergeError(f"{where} is not a flexmerge plan (the JSON top level is a "
                                 f"{type(d).__name__}, not an object); make one with 'flexmerge plan'")
        if d.get("format") != PLAN_FORMAT:
            raise FlexMergeError(f"{where} is not a flexmerge plan (no 'format: {PLAN_FORMAT}'); "
                                 "make one with 'flexmerge plan'")
        if d.get("version") != PLAN_VERSION:
            raise FlexMergeError(f"{where}: plan version {d.get('version')!r} is not supported "
                                 f"(expected {PLAN_VERSION}); {fix}")
        try:
            return cls.model_validate(d)
        except ValidationError as exc:
            raise FlexMergeError(f"{where} is damaged: {first_validation_error(exc)}; {fix}") from None
