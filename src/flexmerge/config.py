"""The merge configuration (YAML or Python), validated with pydantic.

Unknown keys are an error that lists the allowed ones; relative paths in a YAML file are
relative to that file. Every key can be overridden from the CLI (see :func:`apply_overrides`).
"""

from __future__ import annotations

import numbers
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .bundle_format import TASK_NAME_RX
from .errors import FlexMergeError

Linkage = Literal["min", "max", "avg"]
Order = Literal["greedy", "left-right", "right-left", "random"]
Planner = Literal["similarity", "distortion", "hybrid", "auto"]
BlockPreset = Literal["component", "layer", "tensor", "model"]
CheckpointRef = Any  # a path (str / PathLike) or an in-memory {name: tensor} mapping
SEED_LIMIT = 2**32
CONFIG_MAX_BYTES = 16 << 20


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
    """What to merge and how."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    base: CheckpointRef = Field(description="pretrained checkpoint")
    tasks: dict[str, CheckpointRef] = Field(description="task name -> fine-tuned checkpoint")
    exclude: list[str] = Field(default_factory=list, description="regexes of task-specific parameters")
    blocks: Union[BlockPreset, list[BlockRule]] = "component"
    method: Union[str, dict[str, Any]] = "task_arithmetic"
    linkage: Linkage = "min"
    order: Order = "greedy"
    planner: Planner = Field("distortion", description="similarity (the paper's greedy) | distortion "
                                                        "(default) | hybrid | auto; see flexmerge.planners")
    statistics: Literal["pooled", "per_task"] = Field(
        "pooled", description="normalisation statistics of a merged group: pooled from its members, or per task")
    seed: int = 0
    hash_sources: bool = Field(False, description="record the sha256 of every input file in the bundle's "
                                                  "manifest (one more read of all inputs; 18 GiB of LLM "
                                                  "checkpoints cost ~15 s of CPU)")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, v):
        # numpy's default_rng rejects negative seeds, and channel merging reduces seeds modulo
        # 2**32 (baselines/channel_merging.py), so larger ones would silently repeat smaller ones.
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < SEED_LIMIT:
            raise ValueError(f"must be an integer from 0 to {SEED_LIMIT - 1}, got {v!r}; e.g. --seed 0")
        return int(v)

    @field_validator("tasks")
    @classmethod
    def _two_tasks(cls, v: dict) -> dict:
        if len(v) < 2:
            raise ValueError(f"needs at least two tasks, got {len(v)}; add fine-tuned checkpoints under 'tasks'")
        for name in v:
            if not isinstance(name, str) or not TASK_NAME_RX.fullmatch(name):
                raise ValueError(f"task name {name!r} must start with a letter or digit and use letters, "
                                 "digits, '_', '-', '.' (at most 100 characters)")
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
    def _order_of_similarity(self) -> "MergeConfig":
        # The orders other than greedy are ablations of the paper's similarity planner: asked for
        # without a planner, they get that planner (a size-aware planner has no order to ablate).
        if self.order != "greedy" and "planner" not in self.model_fields_set:
            self.planner = "similarity"
        return self

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
                "linkage": self.linkage, "order": self.order, "seed": self.seed,
                "planner": self.planner, "statistics": self.statistics}


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


def resolve_config(config: str | os.PathLike | Mapping[str, Any] | MergeConfig,
                   overrides: Mapping[str, Any] | None = None) -> MergeConfig:
    """A validated config from a YAML path, a dict or a :class:`MergeConfig`, with ``overrides``
    (keys whose value is None are left as they are)."""
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    data = config.model_dump() if isinstance(config, MergeConfig) else dict(config)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(data)


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> MergeConfig:
    """Read a YAML config; relative checkpoint paths are taken relative to the file."""
    p = Path(path).expanduser()
    data = _read_yaml(p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FlexMergeError(f"{p}: the top level is a {_yaml_kind(data)}, not a mapping; write keys "
                             f"such as 'base:' and 'tasks:' (allowed: {', '.join(ALLOWED_KEYS)})")
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
        names = [str(k) for k in data["tasks"]]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise FlexMergeError(f"{p}: task name(s) {', '.join(map(repr, twice))} given twice under 'tasks' "
                                 "(e.g. 1 and '1'); give every task a distinct name")
        data["tasks"] = {str(k): resolve(v) for k, v in data["tasks"].items()}
    return make_config(data, where=str(p))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (PyYAML keeps the last one
    silently, which would drop a task)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                if first is not None:
                    raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_kind(data: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(data), type(data).__name__)


def _read_yaml(p: Path) -> Any:
    """Parse a YAML config file; every unreadable, non-text or malformed file is one line."""
    if p.is_dir():
        raise FlexMergeError(f"config {p} is a directory; give the YAML file (e.g. {p / 'merge.yaml'})")
    if not p.exists():
        raise FlexMergeError(f"config file not found: {p}; write a YAML file with 'base' and 'tasks'")
    try:
        with open(p, "rb") as fh:  # bounded: /dev/zero or a huge file must not exhaust memory
            raw = fh.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise FlexMergeError(f"cannot read config {p}: {exc.strerror or exc}; check its permissions") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise FlexMergeError(f"config {p} is larger than {CONFIG_MAX_BYTES >> 20} MiB; a merge config is a "
                             "short YAML file with 'base' and 'tasks'")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FlexMergeError(f"config {p} is not UTF-8 text (byte {exc.start}); give a YAML text file") from None
    if "\x00" in text:
        raise FlexMergeError(f"config {p} is a binary file (it contains NUL bytes); give a YAML text file")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise FlexMergeError(f"{p}: {exc}; keep one of them (YAML would silently keep only the last)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        why = f" ({problem})" if problem else ""
        raise FlexMergeError(f"{p}: invalid YAML{at}{why}; fix the syntax") from None
    except RecursionError:
        raise FlexMergeError(f"{p}: YAML nested too deeply; write a flat mapping with 'base' and 'tasks'") from None


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["lambda=1.5", "k=0.2"]`` -> ``{"lambda": 1.5, "k": 0.2}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FlexMergeError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set lambda=1.5)")
        if key.strip() in out:
            raise FlexMergeError(f"--set {key.strip()} is given twice; give each parameter once")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise FlexMergeError(f"--set {item}: the value is not valid YAML; quote it or give a number "
                                 "(e.g. --set lambda=1.5)") from None
    return out


def method_spec(cfg: MergeConfig, name: str | None = None, params: Mapping[str, Any] | None = None):
    """The method spec after CLI overrides: ``--method`` replaces the name (and drops the old
    method's parameters), ``--set`` adds or replaces parameters."""
    spec = {"name": cfg.method} if isinstance(cfg.method, str) else dict(cfg.method)
    if name is not None and name != spec.get("name"):
        spec = {"name": name}
    spec.update(params or {})
    return spec
