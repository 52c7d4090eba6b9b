"""The one merged model of a merge, written straight to an HF directory, without a bundle.

When every block of the grouping is one group of all tasks stored as one plain merged tensor
(no per-task masks, no per-task statistics) and the task-specific tensors are equal in every
task, all tasks run the same weights: FlexMerge at one model unit is whole-model merging
(Dhasade et al., ICLR 2026, Sec. 3: size 1). That model is written as an HF directory
(:mod:`flexmerge.shards`: ``model.safetensors`` or shards plus index) block by block as the
method yields them, so memory holds one block of N task vectors, never the model; its config and
tokenizer files are the base's (the first task's if the base is not an HF directory). Otherwise
the tasks need their own weights: a one-line error says why and points to ``export --task``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import bundle_format as fmt
from .errors import FlexMergeError
from .export import EXPORT_METADATA, _is_export_dir
from .outputs import atomic_path
from .shards import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, parse_shard_size

_FIX = "write a bundle with -o and export each task with 'flexmerge export BUNDLE --task T'"


def one_model_check(fm, grouping) -> None:
    """Refuse a grouping whose tasks do not all share one set of weights (one line, with the fix)."""
    cost, blocks, n = fm.cost, fm.blockmap.blocks, len(fm.tasks)
    for bi, block in enumerate(blocks):
        groups = grouping.groups[block.name]
        if len(groups) != 1:
            raise FlexMergeError(f"at {grouping.size_units:.4g} units block '{block.name}' keeps {len(groups)} "
                                 "groups of tasks, so the tasks do not share one model; merge to --size 1 "
                                 f"(one group per block) or {_FIX}")
        kind = cost.layout(bi, [n]).kinds[0]
        if kind != "merged":
            raise FlexMergeError(f"method '{fm.method.describe().get('name')}' stores block '{block.name}' as "
                                 f"{kind} weights per task, so the tasks do not share one model; use a plain "
                                 f"method (e.g. task_arithmetic, ties) or {_FIX}")
        if block.statistics and cost.statistics == "per_task":
            raise FlexMergeError(f"statistics: per_task keeps each task's normalisation statistics of block "
                                 f"'{block.name}', so the tasks do not share one model; use statistics: pooled "
                                 f"or {_FIX}")


def _shared_specific(fm) -> dict[str, str]:
    """Task-specific tensors (excluded heads, integer buffers) -> the first task, checked equal in
    every task: they are part of the one model only if no task differs."""
    models, tasks = fm.models, fm.tasks
    first = models.task_specific[tasks[0]]
    for t in tasks[1:]:
        if sorted(models.task_specific[t]) != sorted(first):
            odd = sorted(set(models.task_specific[t]) ^ set(first))[0]
            raise FlexMergeError(f"task-specific tensor '{odd}' is in task '{t}' or '{tasks[0]}' but not both, "
                                 f"so the merged model is not one model for all tasks; {_FIX}")
    for name in first:
        ref = models.tasks[tasks[0]].get(name)
        for t in tasks[1:]:
            other = models.tasks[t].get(name)
            if other.shape != ref.shape or other.dtype != ref.dtype or not torch.equal(other, ref):
                raise FlexMergeError(f"task-specific tensor '{name}' differs between tasks '{tasks[0]}' and '{t}', "
                                     f"so the merged model is not one model for all tasks; {_FIX}")
    return {name: tasks[0] for name in first}


def write_merged_hf(fm, size, out: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    force: bool = False) -> tuple[Path, object]:
    """Merge ``fm`` (a :class:`~flexmerge.engine.FlexMerge`) to ``size`` and write the one merged
    model to the HF directory ``out`` atomically (replacing only an earlier flexmerge export, or
    anything with ``force``). Returns ``(out, grouping)``."""
    from .engine import FlexMerge

    if not isinstance(fm, FlexMerge):
        raise FlexMergeError("--hf-out writes a full model; these tasks are adapters: write a bundle with -o and "
                             "export the adapters")
    parse_shard_size(max_shard_size)
    _, grouping = fm.grouping_at(size)
    one_model_check(fm, grouping)
    specific = _shared_specific(fm)
    models = fm.models
    first = models.tasks[fm.tasks[0]]
    names = first.names()
    aliases = models.aliases
    specs = [(n, first.info(n).shape, first.info(n).dtype) for n in names]
    by_canonical: dict[str, list[str]] = {}
    for n in names:
        by_canonical.setdefault(aliases.get(n, n), []).append(n)
    src = models.base if models.base.kind == "hf_dir" else first
    assets = fmt.task_assets(src.path if src.kind == "hf_dir" else None)
    with atomic_path(out, is_dir=True, what="HF output", replaceable=_is_export_dir, force=force,
                     hint="choose a new directory") as tmp:
        for path in assets:
            shutil.copyfile(path, tmp / path.name)
        with ShardedWriter(tmp, specs, max_shard_size, EXPORT_METADATA) as writer:
            for sb in fm.stored_blocks(grouping):
                params = sb.params if sb.params is not None else fm.blockmap.blocks[sb.index].params
                for p in params:
                    t = sb.tensors[fmt.merged_key(0, p)]
                    for n in by_canonical.get(p, []):
                        writer.write(n, t)
            for name, task in specific.items():
                for n in by_canonical.get(name, [name]):
                    writer.write(n, models.tasks[task].get(name))
            writer.close()
    return Path(out).expanduser(), grouping
