"""Building the routed model: the skeleton with its parameters on ``meta``, checked against the
bundle, every module holding parameters replaced by a routed one, and the task order."""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from .. import bundle_format as fmt
from ..bundle import Bundle
from ..errors import FlexMergeError
from .modules import (_WHOLE, _Routed, _RoutedConv, _RoutedEmbedding, _RoutedGeneric, _RoutedLinear,
                      _RoutedNorm, _standard_kind)
from .routing import _Router
from .sources import _Masked, _Stored
from .storage import _Store


_building = threading.local()  # .depth > 0 while this thread builds a skeleton


def _param_to_meta(module: nn.Module, name: str, param: nn.Parameter):
    """Registration hook: a parameter registered by the building thread moves to ``meta``."""
    if getattr(_building, "depth", 0) and param.device.type != "meta":
        return type(param)(param.to("meta"), requires_grad=param.requires_grad)
    return None


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on ``meta`` (no memory) but real buffers (position ids...).

    Uses torch's parameter registration hook (``register_module_parameter_registration_hook``),
    held only while the block runs and acting only in the thread that runs it: other threads
    building modules at the same time are not affected. Each parameter is allocated by its
    module's ``__init__`` and moved to ``meta`` as it is registered, so at most one parameter is
    real at a time. Not ``with torch.device("meta")``: that puts the buffers computed in
    ``__init__`` (HF position ids, rotary ``inv_freq``) on ``meta`` too, and they cannot be
    recomputed in general without running ``__init__`` again."""
    handle = register_module_parameter_registration_hook(_param_to_meta)
    _building.depth = getattr(_building, "depth", 0) + 1
    try:
        yield
    finally:
        _building.depth -= 1
        handle.remove()


def _factory_takes_task(factory: Callable) -> bool:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind("task")
        return True
    except TypeError:
        return False


@dataclass
class _ModuleSpec:
    name: str
    module: nn.Module
    parent: nn.Module | None
    child: str
    kind: str
    pnames: list[str]   # local names (may be dotted for _WHOLE modules)
    fnames: list[str]   # full names in the model / bundle


def _order_tasks(mappings: list[tuple[tuple[int, ...], int]], n: int) -> list[int]:
    """A task order that keeps each module's groups contiguous: greedy nearest neighbour over the
    per-module group signatures (Hamming distance weighted by the module's parameter bytes), the
    best of every start."""
    if n <= 2:
        return list(range(n))

    def dist(a, b):
        return sum(w for m, w in mappings if m[a] != m[b])

    d = [[dist(a, b) for b in range(n)] for a in range(n)]
    best, best_cost = list(range(n)), None
    for start in range(n):
        order, left, cost = [start], set(range(n)) - {start}, 0
        while left:
            nxt = min(left, key=lambda j: (d[order[-1]][j], j))
            cost += d[order[-1]][nxt]
            order.append(nxt)
            left.discard(nxt)
        if best_cost is None or cost < best_cost:
            best, best_cost = order, cost
    return best


def _load(cls, bundle: Bundle, build, per_task: bool, input_kind: str, policy: str,
          budget: int | None):
    """``cls(...)`` (:class:`~flexmerge.runtime.model.MultiTaskModel`, passed in: no import cycle)
    serving ``bundle``: skeleton built and checked, modules routed, tasks ordered."""
    m = bundle.manifest
    tasks = list(bundle.tasks)
    store = _Store(bundle)
    aliases = m.get("aliases", {}) or {}
    block_of: dict[str, Any] = {}
    for b in bundle.blocks:
        for p in b.params:
            block_of[p] = b
    spec = m.get("task_specific", {}) or {}
    spec_names = {t: set((spec.get(t) or {}).get("names") or []) for t in tasks}

    def source(name: str, task: str, sources: dict):
        name = ties.get(name, name)
        canon = aliases.get(name, name)
        if canon in spec_names[task]:
            key = ("spec", spec[task]["file"], canon)
            if key not in sources:
                sources[key] = _Stored(store.get(spec[task]["file"], canon), key)
            return sources[key]
        b = block_of.get(canon)
        if b is None:
            return None
        gi, pos = bundle.group_of(task, b.name)
        kind = b.groups[gi]["kind"]
        if kind in ("original", "merged"):
            k = fmt.original_key(gi, pos, canon) if kind == "original" else fmt.merged_key(gi, canon)
            key = ("stored", b.file, k)
            if key not in sources:
                sources[key] = _Stored(store.get(b.file, k), key)
            return sources[key]
        key = ("masked", b.file, gi, pos, canon)
        if key not in sources:
            mk, sk = fmt.mask_key(gi, pos, canon), fmt.scalars_key(gi)
            sources[key] = _Masked(store.get(b.file, fmt.base_key(canon)),
                                   store.get(b.file, fmt.delta_key(gi, canon)),
                                   store.get(b.file, mk) if store.has(b.file, mk) else None,
                                   store.get(b.file, sk)[pos] if store.has(b.file, sk) else None, key)
        return sources[key]

    def bundle_shape(name: str, task: str) -> tuple[int, ...]:
        canon = aliases.get(name, name)
        if canon in spec_names[task]:
            return store.shape(spec[task]["file"], canon)
        b = block_of[canon]
        gi, pos = bundle.group_of(task, b.name)
        kind = b.groups[gi]["kind"]
        k = {"original": fmt.original_key(gi, pos, canon), "merged": fmt.merged_key(gi, canon)}.get(
            kind, fmt.base_key(canon))
        return store.shape(b.file, k)

    # ---- build and check the skeleton(s) ----------------------------------------------
    def make(task):
        with _params_on_meta():
            model = build(task)
        if not isinstance(model, nn.Module):
            raise FlexMergeError(f"model_factory returned a {type(model).__name__}, not a torch module")
        return model

    all_keys = set().union(*[set(m["task_keys"][t]) for t in tasks])
    skeleton = make(tasks[0])
    ties = _model_ties(skeleton, all_keys)
    checks = {tasks[0]: skeleton}
    if per_task:
        for t in tasks[1:]:
            checks[t] = make(t)
    for t in tasks:
        _check_names(checks.get(t, skeleton), t, bundle, aliases, bundle_shape, exact_specific=per_task,
                     spec_names=spec_names[t], ties=ties)
    del checks

    skeleton.eval()
    sources: dict = {}
    router = _Router(len(tasks), policy, budget)
    specs = _module_specs(skeleton, all_keys)
    routed: dict[str, _Routed] = {}
    weights: list[tuple[tuple[int, ...], int]] = []
    for sp in specs:
        variants, mapping, keys = [], [], {}
        for t in tasks:
            srcs = [source(f, t, sources) for f in sp.fnames]
            if any(s is None for s in srcs):
                missing = sp.fnames[[s is None for s in srcs].index(True)]
                raise FlexMergeError(f"model parameter '{missing}' is not in the bundle for task '{t}'; "
                                     "the model factory does not match the bundle")
            key = tuple(s.uid for s in srcs)
            if key not in keys:
                keys[key] = len(variants)
                variants.append(srcs)
            mapping.append(keys[key])
        widths = _widths(sp, variants)
        kw = dict(name=sp.name, inner=sp.module, router=router, pnames=sp.pnames, variants=variants,
                  mapping=tuple(mapping), widths=widths)
        if sp.kind == "linear":
            mod = _RoutedLinear(**kw)
        elif sp.kind == "conv1d_t":
            mod = _RoutedLinear(**kw, transposed=True)
        elif sp.kind == "embedding":
            mod = _RoutedEmbedding(**kw)
        elif sp.kind == "norm":
            mod = _RoutedNorm(**kw)
        elif sp.kind == "conv":
            mod = _RoutedConv(**kw)
        else:
            mod = _RoutedGeneric(**kw)
        mod._fnames = sp.fnames
        routed[sp.name] = mod
        nbytes = sum(int(torch.Size(s.shape).numel()) * s.dtype.itemsize for s in variants[0])
        weights.append((tuple(mapping), nbytes))
    root = skeleton
    for sp in specs:
        if sp.parent is None:
            root = routed[sp.name]
        else:
            sp.parent._modules[sp.child] = routed[sp.name]
    leftover = [n for n, p in root.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise FlexMergeError(f"model parameter '{leftover[0]}' got no tensor from the bundle; the model "
                             "factory does not match the bundle")
    order = _order_tasks(weights, len(tasks))
    return cls(bundle, root, router, store, order, specs, routed, input_kind)


def _model_ties(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """Parameter names the model ties (one Parameter under several names, e.g. an LM head tied to
    the embeddings) -> the tied name the bundle has, for names the bundle lacks (HF drops them)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    out = {}
    for names in by_id.values():
        present = [n for n in names if n in keys]
        if present:
            for n in names:
                if n not in keys:
                    out[n] = present[0]
    return out


def _check_names(model: nn.Module, task: str, bundle: Bundle, aliases: dict, bundle_shape,
                 exact_specific: bool, spec_names: set, ties: dict[str, str]) -> None:
    """Parameter names and shapes of the model against the bundle's tensors for ``task``."""
    keys = list(bundle.manifest["task_keys"][task])
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    missing = [n for n in params if n not in set(keys) and ties.get(n) not in set(keys)]
    if missing:
        raise FlexMergeError(f"model parameter '{missing[0]}' (and {len(missing) - 1} more) is not in the "
                             f"bundle for task '{task}'; the model factory does not match the bundle")
    extra = [k for k in keys if k not in params and k not in buffers]
    if extra:
        raise FlexMergeError(f"bundle tensor '{extra[0]}' (and {len(extra) - 1} more) of task '{task}' has "
                             "no parameter or buffer in the model; the model factory does not match the bundle")
    for k in keys:
        ref = params.get(k, buffers.get(k))
        shape = tuple(bundle_shape(k, task))
        if tuple(ref.shape) == shape:
            continue
        specific = aliases.get(k, k) in spec_names
        if specific and (not exact_specific) and len(shape) == ref.dim():
            continue  # a task-specific tensor of another width than the shared module's
        raise FlexMergeError(f"tensor '{k}' of task '{task}' has shape {list(shape)} in the bundle but "
                             f"{list(ref.shape)} in the model; the model factory does not match the bundle")


def _module_specs(model: nn.Module, bundle_keys: set[str]) -> list[_ModuleSpec]:
    """Every module holding parameters (or bundle-provided buffers) of its own, parents first."""
    specs, skip = [], []
    mods = dict(model.named_modules(remove_duplicate=False))
    seen = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if any((s == "" and name != "") or name.startswith(s + ".") for s in skip):
            continue
        prefix = name + "." if name else ""
        whole = isinstance(mod, _WHOLE)
        if whole:
            pnames = [n for n, _ in mod.named_parameters(remove_duplicate=False)]
            pnames += [n for n, _ in mod.named_buffers(remove_duplicate=False) if prefix + n in bundle_keys]
            skip.append(name)
        else:
            pnames = [n for n, p in mod._parameters.items() if p is not None]
            pnames += [n for n, b in mod._buffers.items() if b is not None and prefix + n in bundle_keys]
        if not pnames:
            continue
        if id(mod) in seen:
            raise FlexMergeError(f"module '{name}' is used at two places in the model; the runtime "
                                 "routes each module object once: give each place its own module")
        seen.add(id(mod))
        kind = "generic" if whole else (_standard_kind(mod) or "generic")
        if kind in ("linear", "conv1d_t") and "weight" not in pnames:
            kind = "generic"
        if kind != "generic" and any(n not in ("weight", "bias") for n in pnames):
            kind = "generic"
        parent_name, _, child = name.rpartition(".")
        parent = mods[parent_name] if name else None
        specs.append(_ModuleSpec(name, mod, parent, child if name else "", kind, pnames,
                                 [prefix + n for n in pnames]))
    return specs


def _widths(sp: _ModuleSpec, variants: list[list]) -> list[int] | None:
    """Per-variant output widths where the variants' shapes differ (task-specific heads)."""
    shapes = [tuple(tuple(s.shape) for s in v) for v in variants]
    if len(set(shapes)) <= 1:
        return None
    w_index = sp.pnames.index("weight") if "weight" in sp.pnames else None
    if sp.kind == "linear":
        return [v[w_index].shape[0] for v in variants]
    if sp.kind in ("conv1d_t", "embedding"):
        return [v[w_index].shape[1] for v in variants]
    raise FlexMergeError(f"task-specific module '{sp.name}' ({type(sp.module).__name__}) differs in shape "
                         "across tasks; only Linear, Embedding and Conv1D heads may differ in width")
