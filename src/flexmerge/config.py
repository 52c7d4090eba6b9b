"""The merge configuration (YAML or Python), validated with pydantic.

Unknown keys are an error that lists the allowed ones; relative paths in a YAML file are
relative to that file. Every key can be overridden from the CLI (see :func:`apply_overrides`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import FlexMergeError

Linkage = Literal["min", "max", "avg"]
Order = Literal["greedy", "left-right", "right-left", "random"]
BlockPreset = Literal["component", "layer", "tensor", "model"]
CheckpointRef = Any  # a path (str / PathLike) or an in-memory {name: tensor} mapping


class BlockRule(BaseModel):
    """One user rule: parameters whose name matches ``pattern`` go to block ``block``.

    ``block`` may use the pattern's groups (``\\1``, ``\\g<name>``), as in :meth:`re.Match.expand`.
    """

    model_config = ConfigDict(extra="forbid")
    pattern: str
    block: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regex {v!r}: {exc}") from None
        return v


class MergeConfig(BaseModel):
    """What to merge and how (issue "engine", Config)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    base: CheckpointRef = Field(description="pretrained checkpoint")
    tasks: dict[str, CheckpointRef] = Field(description="task name -> fine-tuned checkpoint")
    exclude: list[str] = Field(default_factory=list, description="regexes of task-specific parameters")
    blocks: Union[BlockPreset, list[BlockRule]] = "component"
    method: Union[str, dict[str, Any]] = "task_arithmetic"
    linkage: Linkage = "min"
    order: Order = "greedy"
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _two_tasks(cls, v: dict) -> dict:
        if len(v) < 2:
            raise ValueError(f"needs at least two tasks, got {len(v)}; add fine-tuned checkpoints under 'tasks'")
        for name in v:
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise ValueError(f"task name {name!r} must use letters, digits, '_', '-', '.'")
        return v

    @field_validator("exclude")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pat in v:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"invalid exclude regex {pat!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _paths(self) -> "MergeConfig":
        for label, ref in [("base", self.base), *self.tasks.items()]:
            if not isinstance(ref, (str, os.PathLike, Mapping)):
                raise ValueError(f"{label}: expected a path or a state dict, got {type(ref).__name__}")
        return self

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def public_dict(self) -> dict:
        """JSON-able summary (paths as strings, in-memory dicts as a placeholder)."""
        def ref(x):
            return str(x) if isinstance(x, (str, os.PathLike)) else "<in-memory>"
        blocks = self.blocks if isinstance(self.blocks, str) else [r.model_dump() for r in self.blocks]
        return {"base": ref(self.base), "tasks": {k: ref(v) for k, v in self.tasks.items()},
                "exclude": list(self.exclude), "blocks": blocks, "method": self.method,
                "linkage": self.linkage, "order": self.order, "seed": self.seed}


ALLOWED_KEYS = list(MergeConfig.model_fields)


def validation_message(exc: ValidationError, where: str) -> str:
    """One line from a pydantic error: the key, the problem, the fix."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (allowed: {', '.join(ALLOWED_KEYS)})")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        elif err["type"] == "literal_error":
            parts.append(f"'{loc}': {err['msg'].replace('Input should be', 'must be')}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"'{loc}': {msg}" if loc else msg)
    return f"{where}: " + "; ".join(dict.fromkeys(parts))


def make_config(data: Mapping[str, Any] | MergeConfig, where: str = "config") -> MergeConfig:
    if isinstance(data, MergeConfig):
        return data
    try:
        return MergeConfig(**dict(data))
    except ValidationError as exc:
        raise FlexMergeError(validation_message(exc, where)) from None
    except TypeError as exc:
        raise FlexMergeError(f"{where}: {exc}") from None


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> MergeConfig:
    """Read a YAML config; relative checkpoint paths are taken relative to the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FlexMergeError(f"config file not found: {p}; write a YAML file with 'base' and 'tasks'")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise FlexMergeError(f"{p}: invalid YAML{at}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FlexMergeError(f"{p}: the top level must be a mapping with keys {', '.join(ALLOWED_KEYS)}")
    data = dict(data)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})

    def resolve(x):
        if isinstance(x, str):
            q = Path(x).expanduser()
            return str(q if q.is_absolute() else (p.parent / q))
        return x

    if "base" in data:
        data["base"] = resolve(data["base"])
    if isinstance(data.get("tasks"), dict):
        data["tasks"] = {str(k): resolve(v) for k, v in data["tasks"].items()}
    return make_config(data, where=str(p))


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["lambda=1.5", "k=0.2"]`` -> ``{"lambda": 1.5, "k": 0.2}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FlexMergeError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set lambda=1.5)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def method_spec(cfg: MergeConfig, name: str | None = None, params: Mapping[str, Any] | None = None):
    """The method spec after CLI overrides: ``--method`` replaces the name (and drops the old
    method's parameters), ``--set`` adds or replaces parameters."""
    spec = {"name": cfg.method} if isinstance(cfg.method, str) else dict(cfg.method)
    if name is not None and name != spec.get("name"):
        spec = {"name": name}
    spec.update(params or {})
    return spec
