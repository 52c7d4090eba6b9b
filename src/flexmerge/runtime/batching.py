"""One request's inputs: the tasks' inputs concatenated into one batch, the outputs split back."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..errors import FlexMergeError


def _concat_inputs(tasks: list[str], batch: Mapping[str, Any]):
    """Concatenate the tasks' inputs along the batch dimension; check that they agree."""
    first = batch[tasks[0]]

    def leaves(x, t):
        if isinstance(x, torch.Tensor):
            return [("input", x)]
        if isinstance(x, Mapping):
            return list(x.items())
        if isinstance(x, (tuple, list)):
            return [(f"input[{i}]", v) for i, v in enumerate(x)]
        raise FlexMergeError(f"inputs of task '{t}' are a {type(x).__name__}; give a tensor, a tuple of "
                             "tensors or a dict of tensors")

    structure = [k for k, _ in leaves(first, tasks[0])]
    per_task, rows = [], []
    for t in tasks:
        items = leaves(batch[t], t)
        if type(batch[t]) is not type(first) and not (isinstance(batch[t], Mapping) and isinstance(first, Mapping)) \
                or [k for k, _ in items] != structure:
            raise FlexMergeError(f"inputs of task '{t}' have entries {[k for k, _ in items]} but task "
                                 f"'{tasks[0]}' has {structure}; give every task the same inputs")
        n = None
        for k, v in items:
            if isinstance(v, torch.Tensor):
                if v.dim() == 0:
                    raise FlexMergeError(f"input '{k}' of task '{t}' is a scalar; inputs need a batch dimension")
                if n is None:
                    n = v.shape[0]
                elif v.shape[0] != n:
                    raise FlexMergeError(f"inputs of task '{t}' disagree on the batch size: '{k}' has "
                                         f"{v.shape[0]} rows, others {n}")
        if n is None:
            raise FlexMergeError(f"inputs of task '{t}' hold no tensor")
        rows.append(n)
        per_task.append(items)
    merged = []
    for i, k in enumerate(structure):
        vals = [items[i][1] for items in per_task]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            for t, v in zip(tasks, vals):
                if not isinstance(v, torch.Tensor) or v.shape[1:] != v0.shape[1:] or v.dtype != v0.dtype:
                    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise FlexMergeError(f"input '{k}' of task '{t}' has shape {shape} but task '{tasks[0]}' has "
                                         f"{tuple(v0.shape)} ({v0.dtype}); all dimensions but the first (batch) "
                                         "must agree: pad to one sequence length")
            merged.append((k, torch.cat(vals, 0) if len(vals) > 1 else v0))
        else:
            for t, v in zip(tasks, vals):
                if v != v0:
                    raise FlexMergeError(f"input '{k}' of task '{t}' is {v!r} but {v0!r} for task "
                                         f"'{tasks[0]}'; non-tensor inputs must be the same for all tasks")
            merged.append((k, v0))
    if isinstance(first, torch.Tensor):
        return (merged[0][1],), {}, rows
    if isinstance(first, Mapping):
        return (), dict(merged), rows
    return tuple(v for _, v in merged), {}, rows


def _split(obj, start: int, end: int, total: int, padded, tidx: int):
    """One task's share of the model's outputs: rows ``start:end``; padded head outputs sliced
    back to the task's own width."""
    if isinstance(obj, torch.Tensor):
        if not obj.dim():
            return obj
        for ref, widths in padded:
            if obj is ref or (obj.data_ptr() == ref.data_ptr() and obj.shape == ref.shape):
                return obj[start:end, ..., : widths[tidx]]
        if obj.shape[0] == total:
            return obj[start:end]
        if total and obj.shape[0] % total == 0:
            k = obj.shape[0] // total
            return obj[start * k: end * k]
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_split(v, start, end, total, padded, tidx) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_split(v, start, end, total, padded, tidx) for v in obj)
    if isinstance(obj, Mapping):
        items = {k: _split(v, start, end, total, padded, tidx) for k, v in obj.items()}
        try:
            return type(obj)(**items)
        except TypeError:
            return dict(items)
    return obj


def _left_pad_prompts(tasks: list[str], batch: Mapping[str, Any], pad_id_of: Callable[[], int | None]
                      ) -> tuple[dict[str, Any], dict[str, int]]:
    """Several tasks' prompts of different lengths joined for one ``generate`` call, as HF batches
    prompts: each task's ``input_ids`` ``[n, L_t]`` (a tensor, or a dict with ``input_ids`` and an
    optional ``attention_mask``) left-padded with ``pad_id_of()`` (asked only when lengths differ)
    to the longest ``L``, its
    ``attention_mask`` (ones when absent) with zeros. Returns the padded inputs and the columns
    added per task (0 where nothing changed: inputs of equal length are returned as they are)."""
    def ids_of(x):
        return x if isinstance(x, torch.Tensor) else x.get("input_ids") if isinstance(x, Mapping) else None

    ids = {t: ids_of(batch[t]) for t in tasks}
    if any(not isinstance(v, torch.Tensor) or v.dim() != 2 for v in ids.values()):
        return dict(batch), {t: 0 for t in tasks}
    longest = max(v.shape[1] for v in ids.values())
    if all(v.shape[1] == longest for v in ids.values()):
        return dict(batch), {t: 0 for t in tasks}
    lengths = sorted({v.shape[1] for v in ids.values()})
    pad_id = pad_id_of()
    if pad_id is None:
        raise FlexMergeError(f"the tasks' prompts differ in length ({', '.join(map(str, lengths))} tokens) and the "
                             "model has no pad_token_id; pass pad_token_id=, or left-pad the prompts yourself "
                             "with an attention_mask")
    out, pads = {}, {}
    for t in tasks:
        x, v = batch[t], ids[t]
        extra = sorted(k for k in x if k not in ("input_ids", "attention_mask")) if isinstance(x, Mapping) else []
        if extra and v.shape[1] != longest:
            raise FlexMergeError(f"task '{t}': prompts of {v.shape[1]} tokens beside longer ones of other tasks are "
                                 f"left-padded, but '{extra[0]}' cannot be; give prompts of one length")
        k = longest - v.shape[1]
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        mask = torch.ones_like(v) if mask is None else mask
        if mask.shape != v.shape:
            raise FlexMergeError(f"task '{t}': attention_mask has shape {list(mask.shape)} but input_ids "
                                 f"{list(v.shape)}; give them the same shape")
        padded = {"input_ids": torch.cat([v.new_full((v.shape[0], k), pad_id), v], dim=1),
                  "attention_mask": torch.cat([mask.new_zeros((v.shape[0], k)), mask], dim=1)}
        out[t] = {**x, **padded} if isinstance(x, Mapping) else padded
        pads[t] = k
    return out, pads


def _strip_left(obj: Any, k: int) -> Any:
    """A task's generated sequences without the ``k`` padding columns :func:`_left_pad_prompts`
    added (a tensor, or the ``sequences`` of a ``generate`` output object)."""
    if k == 0:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[:, k:]
    if isinstance(obj, Mapping) and isinstance(obj.get("sequences"), torch.Tensor):
        obj["sequences"] = obj["sequences"][:, k:]
    return obj
