"""Adapter bundles out as PEFT adapters: one task's adapter directory, or a set of named adapters
that serves every task from one PEFT model in mixed batches.

**One task** (:func:`export_adapter`): ``adapter_config.json`` (the task's own config) and
``adapter_model.safetensors`` (its tensors: its own factors where its group keeps originals, the
group's merged factors elsewhere, its task-specific ``modules_to_save`` tensors), which
``PeftModel.from_pretrained(base, DIR)`` loads. Own factors stored zero-padded to a module's stored
rank (adapters of different ranks, :data:`~.source.RANK_RULE`) are sliced back to the task's own
rank: bit for bit its adapter. Merged LoRA factors are stored with the scale folded in, so for
each module taken from a merged group the config gets an ``alpha_pattern`` entry (the module's
name, escaped, placed first so it wins PEFT's first-match lookup) with ``alpha = r`` (``sqrt(r)``
with ``use_rslora``): PEFT's scaling ``alpha / r`` is then exactly 1; where the stored rank ``r``
differs from the task's own rank for the module, a ``rank_pattern`` entry (placed first likewise)
gives PEFT that rank.

**Every task** (:func:`export_adapter_set`). PEFT's mixed batches
(``model(**batch, adapter_names=[...])``) pick *one* adapter per sample for *all* modules, while a
bundle picks a group per block: a task can take block 1 from a group it shares with task u and
block 2 from its own originals. One adapter per stored group therefore cannot serve a sample, so
the set holds one combined adapter per distinct *row of groups* (tasks that share their group in
every block share one adapter; at size 1 all tasks share one, at size N each has its own), and
``adapters.json`` maps each task to its adapter name and records, per adapter and tensor, the
stored tensor it comes from. On disk a shared tensor is repeated in each adapter that uses it
(PEFT loads one file per adapter); :func:`load_adapter_set` loads the set into one PEFT model and
ties the repeats to one parameter, so in memory each stored tensor is held once.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import bundle_format as fmt
from ..errors import FlexMergeError
from ..outputs import atomic_path
from .source import CONFIG_NAME, PREFIX, WEIGHTS_NAME, lora_rank

EXPORT_METADATA = {"format": "pt", "producer": "flexmerge-export"}
SET_MANIFEST = "adapters.json"
SET_FORMAT = "flexmerge-adapter-set"
_NAME_RX = re.compile(r"[^A-Za-z0-9_-]")


def _adapter_info(bundle) -> dict:
    info = bundle.manifest.get("adapter")
    if not info:
        raise FlexMergeError(f"bundle {bundle.root}: not an adapter bundle (made from full checkpoints); "
                             "export its tasks with 'flexmerge export --task'")
    return info


def _is_export_dir(path: Path) -> bool:
    """A directory holding exactly what :func:`export_adapter` writes, marked as flexmerge's."""
    try:
        names = {p.name for p in path.iterdir()}
        if names != {CONFIG_NAME, WEIGHTS_NAME}:
            return False
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as fh:
            return (fh.metadata() or {}).get("producer") == EXPORT_METADATA["producer"]
    except Exception:
        return False


def _is_set_dir(path: Path) -> bool:
    try:
        data = json.loads((path / SET_MANIFEST).read_text())
        names = {p.name for p in path.iterdir()}
        return data.get("format") == SET_FORMAT and names == {SET_MANIFEST, *data["adapters"]} and \
            all(_is_export_dir(path / a) for a in data["adapters"])
    except Exception:
        return False


def _module_of(key: str) -> str | None:
    m = re.match(r"^(.+)\.lora_A\.weight$", key)
    return m.group(1).removeprefix(PREFIX) if m else None


def task_adapter(bundle, task: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """``(adapter_config, tensors, sources)`` of ``task`` (module docstring); ``sources`` names the
    stored tensor each key comes from (``file:key``), shared where groups are shared."""
    info = _adapter_info(bundle)
    config = json.loads(json.dumps(info["configs"][task]))
    tensors, sources, merged_modules = {}, {}, []
    for block in bundle.blocks:
        gi, pos = bundle.group_of(task, block.name)
        kind = block.groups[gi]["kind"]
        for name in block.params:
            key = fmt.original_key(gi, pos, name) if kind == "original" else fmt.merged_key(gi, name)
            tensors[name] = bundle.tensor(block.file, key)
            sources[name] = f"{block.file}:{key}"
            if kind == "original" and info["peft_type"] == "LORA":
                tensors[name] = own_rank(tensors[name], name, config)
            if kind == "merged" and _module_of(name):
                merged_modules.append(_module_of(name))
    spec = bundle.manifest["task_specific"].get(task, {})
    for name in spec.get("names", []):
        tensors[name] = bundle.tensor(spec["file"], name)
        sources[name] = f"{spec['file']}:{name}"
    if merged_modules:
        rank_of = {_module_of(k): int(t.shape[0]) for k, t in tensors.items() if _module_of(k)}
        rs = bool(config.get("use_rslora"))
        ours = {re.escape(m): (math.sqrt(rank_of[m]) if rs else rank_of[m]) for m in merged_modules}
        config["alpha_pattern"] = {**ours, **{k: v for k, v in (config.get("alpha_pattern") or {}).items()
                                              if k not in ours}}
        ranks = {re.escape(m): rank_of[m] for m in merged_modules if rank_of[m] != lora_rank(config, m)}
        if ranks:
            config["rank_pattern"] = {**ranks, **{k: v for k, v in (config.get("rank_pattern") or {}).items()
                                                  if k not in ranks}}
    order = bundle.manifest["task_keys"][task]
    return config, {k: tensors[k] for k in order}, {k: sources[k] for k in order}


def own_rank(tensor: torch.Tensor, key: str, config: dict) -> torch.Tensor:
    """A task's own LoRA factor (``key``: ``...lora_A.weight`` or ``...lora_B.weight``) stored
    zero-padded to the module's stored rank, sliced back to the rank of the task's config (a view)."""
    module = re.sub(r"\.lora_[AB]\.weight$", "", key).removeprefix(PREFIX)
    r = lora_rank(config, module)
    if ".lora_A." in key:
        return tensor[:r] if tensor.shape[0] > r else tensor
    return tensor[:, :r] if tensor.shape[1] > r else tensor


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME), metadata=EXPORT_METADATA)


def export_adapter(bundle, task: str, out: str | os.PathLike, force: bool = False) -> Path:
    """Write ``task`` of an adapter bundle as a PEFT adapter directory ``out``, atomically."""
    config, tensors, _ = task_adapter(bundle, task)
    out = Path(out).expanduser()
    with atomic_path(out, is_dir=True, what="export target", replaceable=_is_export_dir, force=force,
                     hint="choose a new directory") as tmp:
        _write_adapter(tmp, config, tensors)
    return out


def adapter_names(bundle) -> dict[str, str]:
    """Task -> adapter name: tasks that share their group in every block share one adapter (named
    after its first task, ``_`` for characters PEFT's module dicts refuse, e.g. ``.``)."""
    _adapter_info(bundle)
    rows: dict[tuple, str] = {}
    out, used = {}, set()
    for task in bundle.tasks:
        row = []
        for b in bundle.blocks:
            gi, pos = bundle.group_of(task, b.name)
            row.append((gi, pos if b.groups[gi]["kind"] == "original" else -1))
        row = tuple(row)
        if row not in rows:
            name = base = _NAME_RX.sub("_", task)
            k = 1
            while name in used:
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            rows[row] = name
        out[task] = rows[row]
    return out


def export_adapter_set(bundle, out: str | os.PathLike, force: bool = False) -> Path:
    """Write every task of an adapter bundle as ``out/<adapter>/`` PEFT adapters plus
    ``out/adapters.json`` (task -> adapter, and each tensor's stored source), atomically."""
    names = adapter_names(bundle)
    first = {}
    for task, name in names.items():
        first.setdefault(name, task)
    out = Path(out).expanduser()
    meta = {"format": SET_FORMAT, "version": 1, "peft_type": _adapter_info(bundle)["peft_type"],
            "tasks": names, "adapters": sorted(first), "sources": {}}
    with atomic_path(out, is_dir=True, what="export target", replaceable=_is_set_dir, force=force,
                     hint="choose a new directory") as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, task in first.items():
            config, tensors, sources = task_adapter(bundle, task)
            _write_adapter(tmp / name, config, tensors)
            meta["sources"][name] = sources
        (tmp / SET_MANIFEST).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_adapter_set(model, folder: str | os.PathLike):
    """Load an adapter set (:func:`export_adapter_set`) into ``model`` (a transformers model of the
    base): returns ``(peft_model, task_to_adapter)``. Tensors that come from one stored tensor are
    tied to one parameter. Serve a mixed batch with
    ``peft_model(**batch, adapter_names=[task_to_adapter[t] for t in row_tasks])``."""
    from peft import PeftModel

    folder = Path(folder).expanduser()
    try:
        meta = json.loads((folder / SET_MANIFEST).read_text())
        adapters, tasks, sources = meta["adapters"], meta["tasks"], meta["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FlexMergeError(f"{folder} is not an adapter set (no valid {SET_MANIFEST}); write one with "
                             "'flexmerge export BUNDLE --adapter-set -o DIR'") from None
    peft_model = None
    for name in adapters:
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(folder / name), adapter_name=name)
        else:
            peft_model.load_adapter(str(folder / name), adapter_name=name)
    params = dict(peft_model.named_parameters())
    shared: dict[str, torch.nn.Parameter] = {}
    for name in adapters:
        for key, src in sources[name].items():
            pname = _parameter_name(key, name)
            if pname not in params:
                continue
            owner = shared.setdefault(src, params[pname])
            if owner is not params[pname]:
                _set_parameter(peft_model, pname, owner)
    return peft_model, dict(tasks)


def _parameter_name(key: str, adapter: str) -> str:
    """The PeftModel parameter of saved key ``key`` in adapter ``adapter``."""
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            return key.replace(part, f"{part}{adapter}.")
    if key.endswith(".ia3_l"):
        return f"{key}.{adapter}"
    return key


def _set_parameter(model, pname: str, param) -> None:
    path, _, attr = pname.rpartition(".")
    module = model.get_submodule(path)
    if isinstance(module, torch.nn.ParameterDict):
        module[attr] = param
    else:
        setattr(module, attr, param)
