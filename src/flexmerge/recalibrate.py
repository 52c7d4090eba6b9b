"""Optional re-estimation of BatchNorm statistics on unlabeled data, after merging.

Data-free, a merged group stores the pooled statistics of its members' checkpoints
(:mod:`flexmerge.materialize`), but a merged model's BatchNorm layers see activations that no
checkpoint saw. Resetting the statistics on a little data is the usual repair (Izmailov et al.
2018, SWA, Sec. 3.2: one more pass over the data computes the BatchNorm statistics of the averaged
weights; Jordan et al., ICLR 2023, REPAIR: "RESET" of BatchNorm statistics after interpolating
networks).

**Rule.** For each task t, ``model_factory(t)`` gets t's merged weights from the bundle; every
BatchNorm module (``torch.nn.modules.batchnorm._BatchNorm`` whose statistics the bundle stores)
is put in train mode, the rest of the model in eval mode, and ``batches(t)`` runs through it once
without gradients. In train mode a BatchNorm normalises with its batch's own statistics, so all
layers are re-estimated in one pass, each with the merged weights and batch-normalised earlier
layers (the reset of SWA and REPAIR). Each BatchNorm's input is accumulated in float64 over every
example and position (pairwise update of mean and sum of squared deviations, Chan, Golub &
LeVeque 1979), giving mean and unbiased variance: with one batch exactly what torch stores after a
train-mode forward with ``momentum=None`` (with several batches torch averages per-batch
estimates; this pools all examples). Then per block group, under the bundle's statistics rule:
a group that stores per member (originals, or every task under ``per_task``) stores each member's
own re-estimated statistics; a merged group stores the pooled statistics of its members'
(:func:`~flexmerge.materialize.pooled_statistics`, law of total variance, equal weights). Members
differ in other blocks, so each member is measured on its own merged model. Sizes do not change.
InstanceNorm statistics keep their data-free values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import torch

from . import bundle_format as fmt
from .blocks import is_variance
from .errors import FlexMergeError
from .materialize import StoredBlock, pooled_statistics


def _name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}:{qual}" if mod else repr(fn)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@dataclass(frozen=True)
class Recalibration:
    """What re-estimation needs: ``batches(task)`` -> an iterable of model inputs (tensors
    ``[batch, ...]``, or dicts of tensors passed as keyword arguments, e.g. for HF models) drawn
    from the task's unlabeled data; ``model_factory(task)`` -> a ``torch.nn.Module`` of the task's
    architecture (its weights are replaced)."""

    batches: Callable[[str], Iterable[Any]]
    model_factory: Callable[[str], Any]

    def __post_init__(self):
        for label, fn in (("batches", self.batches), ("model_factory", self.model_factory)):
            if not callable(fn):
                raise FlexMergeError(f"recalibration: {label} must be a callable taking a task name, got "
                                     f"{type(fn).__name__}")


class _Moments:
    """Per-channel count, mean and sum of squared deviations, updated a batch at a time."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        xs = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
        m = xs.shape[1]
        if m == 0:
            return
        bmean = xs.mean(dim=1)
        bm2 = ((xs - bmean[:, None]) ** 2).sum(dim=1)
        if self.mean is None:
            self.n, self.mean, self.m2 = m, bmean, bm2
            return
        total = self.n + m
        delta = bmean - self.mean
        self.mean = self.mean + delta * (m / total)
        self.m2 = self.m2 + bm2 + delta ** 2 * (self.n * m / total)
        self.n = total


def _batch_size(item: Any, task: str, i: int, who: str) -> int:
    first = item
    if isinstance(item, Mapping):
        first = next((v for v in item.values() if isinstance(v, torch.Tensor)), None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise FlexMergeError(f"batches '{who}': batch {i} of task '{task}' is a {type(item).__name__}; yield "
                             "input tensors [batch, ...] or dicts of them (unlabeled inputs, no labels)")
    return int(first.shape[0])


def _on(item: Any, device: torch.device) -> Any:
    if isinstance(item, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
    return item.to(device)


def task_statistics(model, inputs: Iterable[Any], task: str, keys: set[str], who: str = "batches"
                    ) -> tuple[dict[str, torch.Tensor], int, int]:
    """Re-estimated ``running_mean``/``running_var`` (float64) of every BatchNorm of ``model`` whose
    statistics are in ``keys``, from one pass of ``inputs`` (module docstring); also the numbers of
    examples and batches. ``model``'s modes and BatchNorm buffers are restored afterwards."""
    from torch.nn.modules.batchnorm import _BatchNorm

    modules = {name: mod for name, mod in model.named_modules()
               if isinstance(mod, _BatchNorm) and mod.track_running_stats
               and (f"{name}.running_mean" if name else "running_mean") in keys}
    if not modules:
        raise FlexMergeError(f"task '{task}': the model from the model factory has no BatchNorm whose statistics "
                             "the bundle stores; recalibration re-estimates BatchNorm statistics: give the "
                             "task's architecture, or merge without recalibration")
    moments = {name: _Moments() for name in modules}

    def hook(name, mod, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != mod.num_features:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise FlexMergeError(f"task '{task}': BatchNorm '{name}' expects {mod.num_features} channels in "
                                 f"dimension 1, its input is {shape}; yield inputs of the model's shape")
        moments[name].add(x)

    modes = {mod: mod.training for mod in model.modules()}
    saved = {name: {b: t.clone() for b, t in mod.named_buffers(recurse=False) if t is not None}
             for name, mod in modules.items()}
    handles = [mod.register_forward_pre_hook(lambda mod, args, _n=name: hook(_n, mod, args))
               for name, mod in modules.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    examples = count = 0
    try:
        model.eval()
        for mod in modules.values():
            mod.train()
        with torch.no_grad():
            it = iter(inputs)
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    break
                except Exception as exc:
                    raise FlexMergeError(f"batches '{who}' failed for task '{task}' after {count} batches "
                                         f"({_first_line(exc)})") from None
                n = _batch_size(item, task, count, who)
                try:
                    if isinstance(item, Mapping):
                        model(**_on(item, device))
                    else:
                        model(_on(item, device))
                except FlexMergeError:
                    raise
                except Exception as exc:
                    raise FlexMergeError(f"task '{task}': the model failed on batch {count} from '{who}' "
                                         f"({_first_line(exc)}); yield inputs the model takes") from None
                examples += n
                count += 1
    finally:
        for h in handles:
            h.remove()
        for mod, mode in modes.items():
            mod.train(mode)
        for name, mod in modules.items():
            for b, t in saved[name].items():
                getattr(mod, b).copy_(t)
    if count == 0:
        raise FlexMergeError(f"batches '{who}' yielded no batch for task '{task}'; give at least one batch "
                             "of that task's unlabeled inputs")
    out: dict[str, torch.Tensor] = {}
    for name, mom in moments.items():
        if mom.n < 2:
            raise FlexMergeError(f"task '{task}': BatchNorm '{name}' saw {mom.n} values per channel; it needs at "
                                 "least 2 (is it used in forward?); give more or larger batches")
        prefix = f"{name}." if name else ""
        mean, var = mom.mean.cpu(), (mom.m2 / (mom.n - 1)).cpu()
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
            raise FlexMergeError(f"task '{task}': the inputs from '{who}' give non-finite statistics at BatchNorm "
                                 f"'{name}'; check the data for NaN or Inf")
        out[prefix + "running_mean"], out[prefix + "running_var"] = mean, var
    return out, examples, count


def _model_for(recal: Recalibration, task: str, state_dict: Mapping[str, torch.Tensor]):
    who = _name(recal.model_factory)
    try:
        model = recal.model_factory(task)
    except Exception as exc:
        raise FlexMergeError(f"model factory '{who}' failed for task '{task}' ({_first_line(exc)})") from None
    if not hasattr(model, "load_state_dict") or not hasattr(model, "named_modules"):
        raise FlexMergeError(f"model factory '{who}' returned a {type(model).__name__} for task '{task}', not a "
                             "torch.nn.Module")
    try:
        res = model.load_state_dict(dict(state_dict), strict=False)
    except Exception as exc:
        raise FlexMergeError(f"model factory '{who}': task '{task}''s merged weights do not fit its model "
                             f"({_first_line(exc)}); return the task's own architecture") from None
    if res.unexpected_keys:
        raise FlexMergeError(f"model factory '{who}': the model for task '{task}' has no tensor "
                             f"'{sorted(res.unexpected_keys)[0]}' that the bundle stores; return the task's own "
                             "architecture")
    return model


def recalibrate(state_dict: Callable[[str], Mapping[str, torch.Tensor]], tasks: list[str], keys: set[str],
                recal: Recalibration) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Per task, the statistics re-estimated on its merged model (``state_dict(task)``), one model
    in memory at a time; and what the manifest records (examples and batches per task)."""
    if not keys:
        raise FlexMergeError("these checkpoints have no normalisation statistics outside the excluded tensors; "
                             "there is nothing to recalibrate: merge without recalibration")
    who = _name(recal.batches)
    per_task, examples, batches = {}, {}, {}
    for t in tasks:
        model = _model_for(recal, t, state_dict(t))
        try:
            inputs = recal.batches(t)
        except Exception as exc:
            raise FlexMergeError(f"batches '{who}' failed for task '{t}' ({_first_line(exc)})") from None
        if inputs is None or isinstance(inputs, (torch.Tensor, Mapping)) or not hasattr(inputs, "__iter__"):
            raise FlexMergeError(f"batches '{who}' returned a {type(inputs).__name__} for task '{t}'; return an "
                                 "iterable of batches (e.g. a list, a generator or a DataLoader of inputs)")
        per_task[t], examples[t], batches[t] = task_statistics(model, inputs, t, keys, who)
        del model
    return per_task, {"examples": examples, "batches": batches}


def recalibrated_block(sb: StoredBlock, per_task: dict[str, dict[str, torch.Tensor]], tasks: list[str]
                       ) -> StoredBlock:
    """A statistics entry (:func:`~flexmerge.materialize.statistics_block`) with its groups and
    layout kept and its values re-estimated: each member's own for per-member groups, the pooled
    statistics of the members' for merged groups. Statistics not re-estimated stay as they were."""
    tensors = dict(sb.tensors)

    def put(key: str, value: torch.Tensor, name: str) -> None:
        old = tensors[key]
        if tuple(value.shape) != tuple(old.shape):
            raise FlexMergeError(f"statistic '{name}': re-estimated shape {list(value.shape)}, the bundle stores "
                                 f"{list(old.shape)}; the model factory must build the checkpoints' architecture")
        tensors[key] = value.to(old.dtype).contiguous()

    for gi, rec in enumerate(sb.groups):
        members = [tasks[i] for i in rec.tasks]
        for name in sb.params or []:
            if name not in per_task[members[0]]:
                continue
            if rec.kind == "original":
                for pos, t in enumerate(members):
                    put(fmt.original_key(gi, pos, name), per_task[t][name], name)
                continue
            mean_name = name[: -len("running_var")] + "running_mean" if is_variance(name) else name
            means = torch.stack([per_task[t][mean_name] for t in members])
            if is_variance(name):
                value = pooled_statistics(means, torch.stack([per_task[t][name] for t in members]))[1]
            else:
                value = pooled_statistics(means, None)[0]
            put(fmt.merged_key(gi, name), value, name)
    return replace(sb, tensors=tensors)
