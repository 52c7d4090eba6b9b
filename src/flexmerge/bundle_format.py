"""The bundle format, in one place: directory layout, tensor keys, the versioned manifest schema.

A bundle is a directory::

    manifest.json                      this module's :class:`Manifest` (format, version, tasks,
                                       blocks and their groups, method, sizes, sha256 of every file)
    tensors/block-00007.safetensors    one file per block (keys below)
    tensors/task-<task>.safetensors    task-specific tensors (excluded heads, buffers)
    assets/<task>/<file>               the task's small non-tensor files (config.json, tokenizer,
                                       generation config), so that a bundle needs nothing but itself

Tensor keys inside a block file, per group ``g`` (FlexMerge stores per block group either the
members' originals, one merged weight, or a merged task vector with per-member masks and scalars,
TALL masks / EMR)::

    g<g>/m<pos>/<param>     member ``pos``'s original weight
    g<g>/merged/<param>     theta_0 + merged task vector
    g<g>/delta/<param>      merged task vector (masked groups)
    g<g>/mask<pos>/<param>  bit-packed mask of member ``pos``
    g<g>/scalars            one float32 rescaler per member
    base/<param>            the pretrained weight (blocks with masked groups)

Every path in a manifest is relative, stays inside the bundle (no ``..``, no absolute path, no
symlink out) and is listed in ``files`` with its sha256; readers verify a file against it before
the first tensor is read from it. Version 2 added ``assets``; version 1 bundles are refused with a
request to re-run ``flexmerge merge``. ``adapter`` (optional, absent in full-model bundles) marks a bundle of
PEFT adapters (:class:`AdapterEntry`); it needs no new version: bundles without it read as before,
and a reader that predates it refuses such a bundle (the schema forbids unknown fields), which is
right, since it would read merged factors as weights. ``plan.recalibration`` (optional, null when absent; ``plan``
admits extra fields, so readers without it still read such bundles) records statistics re-estimated
on data: examples and batches per task.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import FlexMergeError, first_validation_error

BUNDLE_FORMAT = "flexmerge-bundle"
BUNDLE_VERSION = 2
MANIFEST_NAME = "manifest.json"
TENSOR_DIR = "tensors"
ASSET_DIR = "assets"
MAX_MANIFEST_BYTES = 256 << 20
TASK_NAME_RX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")  # also a file and directory name
_SHA256_RX = re.compile(r"[0-9a-f]{64}")


# ---- layout and keys -------------------------------------------------------------------------
def block_file(index: int) -> str:
    return f"{TENSOR_DIR}/block-{index:05d}.safetensors"


def task_file(task: str) -> str:
    return f"{TENSOR_DIR}/task-{task}.safetensors"


def asset_file(task: str, name: str) -> str:
    return f"{ASSET_DIR}/{task}/{name}"


MAX_ASSET_BYTES = 64 << 20


def task_assets(source_dir: Path | None) -> list[Path]:
    """A task's small non-tensor files worth keeping in the bundle (config, tokenizer, generation
    config), from its HF source directory; files over ``MAX_ASSET_BYTES`` are left out."""
    if source_dir is None or not source_dir.is_dir():
        return []
    out = []
    for name in ASSET_FILES:
        p = source_dir / name
        if p.is_file() and p.stat().st_size <= MAX_ASSET_BYTES:
            out.append(p)
    return out


ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
               "tokenizer.model", "added_tokens.json", "sentencepiece.bpe.model",
               "preprocessor_config.json", "modules.json", "sentence_bert_config.json", "chat_template.jinja")


def original_key(group: int, pos: int, param: str) -> str:
    return f"g{group}/m{pos}/{param}"


def merged_key(group: int, param: str) -> str:
    return f"g{group}/merged/{param}"


def delta_key(group: int, param: str) -> str:
    return f"g{group}/delta/{param}"


def mask_key(group: int, pos: int, param: str) -> str:
    return f"g{group}/mask{pos}/{param}"


def scalars_key(group: int) -> str:
    return f"g{group}/scalars"


def base_key(param: str) -> str:
    return f"base/{param}"


def stored_shapes(manifest: dict) -> dict[tuple[str, str], tuple[tuple[int, ...], bool]]:
    """``(file, key) -> (shape, is_weight)`` of every tensor the manifest says a bundle stores:
    what a reader checks each tensor against (weights must also be finite; task-specific
    buffers may hold anything their model put there)."""
    out: dict[tuple[str, str], tuple[tuple[int, ...], bool]] = {}
    for b in manifest["blocks"]:
        if b["file"] is None:
            continue
        shapes = {p: tuple(s) for p, s in b["shapes"].items()}
        f = b["file"]
        for gi, g in enumerate(b["groups"]):
            for p, shape in shapes.items():
                if g["kind"] == "original":
                    for pos in range(len(g["tasks"])):
                        out[(f, original_key(gi, pos, p))] = (shape, True)
                elif g["kind"] == "merged":
                    out[(f, merged_key(gi, p))] = (shape, True)
                else:
                    out[(f, delta_key(gi, p))] = (shape, True)
                    numel = 1
                    for d in shape:
                        numel *= d
                    for pos in range(len(g["tasks"])):
                        out[(f, mask_key(gi, pos, p))] = (((numel + 7) // 8,), False)
            if g["kind"] == "masked":
                out[(f, scalars_key(gi))] = ((len(g["tasks"]),), True)
        if b["store_base"]:
            for p, shape in shapes.items():
                out[(f, base_key(p))] = (shape, True)
    for spec in manifest["task_specific"].values():
        for n in spec["names"]:
            out[(spec["file"], n)] = (tuple(spec["shapes"][n]), False)
    return out


# ---- safe relative paths ---------------------------------------------------------------------
def check_relative(rel: str) -> str:
    """``rel`` if it is a plain relative POSIX path (no ``..``, ``.``, empty part, backslash, NUL)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ValueError(f"file path {rel!r} is not a relative path inside the bundle")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"file path {rel!r} leaves the bundle")
    return rel


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing a path that leaves ``root`` (``..``, absolute, symlinks out)."""
    try:
        check_relative(rel)
    except ValueError as exc:
        raise FlexMergeError(f"bundle {root}: {exc}; the manifest is damaged: re-run 'flexmerge merge'") from None
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise FlexMergeError(f"bundle {root}: file {rel} points outside the bundle; the bundle is damaged: "
                             "re-run 'flexmerge merge'")
    return path


# ---- the manifest schema ---------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


RelPath = str


class GroupEntry(_Strict):
    tasks: list[str] = Field(min_length=1)
    kind: Literal["original", "merged", "masked"]


Shape = list[int]


class BlockEntryModel(_Strict):
    name: str
    params: list[str]
    shapes: dict[str, Shape]
    file: Optional[RelPath]
    store_base: bool
    bytes: int = Field(ge=0)
    groups: list[GroupEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _shapes(self) -> "BlockEntryModel":
        if set(self.shapes) != set(self.params) or any(d < 0 for s in self.shapes.values() for d in s):
            raise ValueError(f"block {self.name!r}: 'shapes' must give one shape per parameter")
        return self


class TaskSpecificEntry(_Strict):
    file: RelPath
    names: list[str]
    shapes: dict[str, Shape]

    @model_validator(mode="after")
    def _shapes(self) -> "TaskSpecificEntry":
        if set(self.shapes) != set(self.names) or any(d < 0 for s in self.shapes.values() for d in s):
            raise ValueError("'shapes' must give one shape per task-specific tensor")
        return self


class SourceEntry(_Strict):
    path: Optional[str]
    kind: Literal["hf_dir", "safetensors", "torch", "state_dict", "peft_adapter"]
    sha256: Optional[str]


class SourcesEntry(_Strict):
    base: SourceEntry
    tasks: dict[str, SourceEntry]


class SizeEntry(_Strict):
    bytes: int = Field(ge=0)
    units: float = Field(ge=0)
    unit_bytes: int = Field(ge=0)
    max_units: int = Field(ge=1)
    task_specific_bytes: dict[str, int]
    task_specific_total: int = Field(ge=0)


class RecalibrationEntry(_Strict):
    """BatchNorm statistics re-estimated on data (:mod:`flexmerge.recalibrate`): per task, how many
    unlabeled examples and batches."""

    examples: dict[str, int]
    batches: dict[str, int]

    @model_validator(mode="after")
    def _counts(self) -> "RecalibrationEntry":
        if set(self.examples) != set(self.batches) or any(v < 1 for v in [*self.examples.values(),
                                                                          *self.batches.values()]):
            raise ValueError("'recalibration' must give at least one example and batch for the same tasks")
        return self


class PlanEntry(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)  # planners may record more
    linkage: Optional[str]
    order: Optional[str]
    seed: Optional[int]
    steps: int = Field(ge=0)
    recalibration: Optional[RecalibrationEntry] = None  # absent in bundles without it (and older ones)


class AdapterEntry(_Strict):
    """Adapter bundles (:mod:`flexmerge.adapters`): the PEFT type, each task's own
    ``adapter_config.json`` (for export) and the rank rule of merged LoRA groups. In such a bundle
    a block's parameters are the adapters' tensor keys; a ``merged`` group stores the merged
    low-rank factors (scale folded in) or (IA)3 vector, not ``theta_0 + tau``."""

    peft_type: Literal["LORA", "IA3"]
    rank_rule: Literal["members", "max"]  # "members": bundles of equal-rank adapters before ranks could differ
    configs: dict[str, dict[str, Any]]


class Manifest(_Strict):
    """``manifest.json``: what a bundle holds and how to rebuild each task from it."""

    format: Literal["flexmerge-bundle"]
    version: int
    tasks: list[str] = Field(min_length=1)
    method: dict[str, Any]
    plan: PlanEntry
    size: SizeEntry
    blocks: list[BlockEntryModel]
    task_specific: dict[str, TaskSpecificEntry]
    aliases: dict[str, str]
    task_keys: dict[str, list[str]]
    sources: SourcesEntry
    config: dict[str, Any]
    files: dict[RelPath, str]
    assets: dict[str, dict[str, RelPath]] = Field(default_factory=dict)
    adapter: Optional[AdapterEntry] = None  # adapter bundles only; absent in full-model bundles
    notes: list[str] = Field(default_factory=list)  # what the method did instead of its rule (older bundles: none)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != BUNDLE_VERSION:
            raise ValueError(f"version {v} is not supported (this flexmerge reads version {BUNDLE_VERSION})")
        return v

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("task names repeat")
        for t in v:
            if not TASK_NAME_RX.fullmatch(t):
                raise ValueError(f"task name {t!r} is not a valid task name")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for rel, digest in v.items():
            check_relative(rel)
            if not isinstance(digest, str) or not _SHA256_RX.fullmatch(digest):
                raise ValueError(f"file {rel!r} has no valid sha256")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        tasks = set(self.tasks)
        for b in self.blocks:
            seen = [t for g in b.groups for t in g.tasks]
            if sorted(seen) != sorted(self.tasks):
                raise ValueError(f"block {b.name!r}: its groups do not hold every task exactly once")
            if b.file is not None and b.file not in self.files:
                raise ValueError(f"block {b.name!r}: file {b.file!r} is not listed in 'files'")
            if b.file is None and b.params:
                raise ValueError(f"block {b.name!r} has parameters but no file")
        if self.adapter is not None and set(self.adapter.configs) != tasks:
            raise ValueError("'adapter.configs' must give one adapter config per task")
        for label, keys in (("task_specific", self.task_specific), ("task_keys", self.task_keys),
                            ("sources.tasks", self.sources.tasks), ("assets", self.assets)):
            extra = set(keys) - tasks
            if extra:
                raise ValueError(f"'{label}' names unknown task {sorted(extra)[0]!r}")
        if self.plan.recalibration is not None and set(self.plan.recalibration.examples) != tasks:
            raise ValueError("'plan.recalibration' must count the examples of every task")
        missing = tasks - set(self.task_keys)
        if missing:
            raise ValueError(f"'task_keys' lacks task {sorted(missing)[0]!r}")
        for t, spec in self.task_specific.items():
            if spec.names and spec.file not in self.files:
                raise ValueError(f"task_specific.{t}: file {spec.file!r} is not listed in 'files'")
        for t, entries in self.assets.items():
            for name, rel in entries.items():
                if name not in ASSET_FILES or rel != asset_file(t, name):
                    raise ValueError(f"assets.{t}: entry {name!r} -> {rel!r} is not one of the asset files "
                                     f"stored as {asset_file(t, '<name>')}")
                if rel not in self.files:
                    raise ValueError(f"assets.{t}.{name}: file {rel!r} is not listed in 'files'")
        return self


def parse_manifest(data: Any, where: str) -> dict:
    """Validate a decoded manifest; return it as a plain dict. One-line error naming the field."""
    if not isinstance(data, dict):
        raise FlexMergeError(f"{where} is not a flexmerge bundle manifest (the top level is a "
                             f"{type(data).__name__}, not an object); re-run 'flexmerge merge'")
    if data.get("format") != BUNDLE_FORMAT:
        raise FlexMergeError(f"{where} is not a flexmerge bundle manifest (format is {data.get('format')!r}); "
                             "make a bundle with 'flexmerge merge'")
    try:
        return Manifest.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        raise FlexMergeError(f"{where}: {first_validation_error(exc)}; the bundle is damaged or from another "
                             "version: re-run 'flexmerge merge'") from None


def read_manifest(root: Path) -> dict:
    """The validated manifest of the bundle directory ``root``."""
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise FlexMergeError(f"{root} is not a flexmerge bundle (no {MANIFEST_NAME}); make one with "
                             "'flexmerge merge'")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise FlexMergeError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not a "
                                 "flexmerge manifest: re-run 'flexmerge merge'")
        data = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise FlexMergeError(f"{mpath} is not valid JSON ({reason}); the bundle is damaged: re-run "
                             "'flexmerge merge'") from None
    except PermissionError:
        raise FlexMergeError(f"{mpath} is not readable (permission denied); fix its permissions") from None
    return parse_manifest(data, str(mpath))


def manifest_json(manifest: dict) -> str:
    """The manifest as written to disk (validated first, so a writer can never emit a bad one)."""
    checked = parse_manifest(manifest, "manifest")
    return json.dumps(checked, indent=1) + "\n"


def is_bundle_dir(path: Path) -> bool:
    """True if ``path`` is a directory made by flexmerge: its manifest names this format (any
    version) and every entry in it is the manifest, a listed file or a directory leading to one."""
    mpath = path / MANIFEST_NAME
    try:
        if not mpath.is_file() or mpath.is_symlink() or mpath.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT or not isinstance(data.get("files"), dict):
        return False
    listed = {MANIFEST_NAME, *(str(k) for k in data["files"])}
    dirs = {str(PurePosixPath(*PurePosixPath(rel).parts[:i]))
            for rel in listed for i in range(1, len(PurePosixPath(rel).parts))}
    try:
        for entry in path.rglob("*"):
            rel = entry.relative_to(path).as_posix()
            if entry.is_symlink():
                return False
            if entry.is_dir() and rel in dirs:
                continue
            if entry.is_file() and rel in listed:
                continue
            return False
    except OSError:
        return False
    return True
