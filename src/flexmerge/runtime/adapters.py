"""Serving adapter bundles (:mod:`flexmerge.adapters`): each task's rows run the base model plus that
task's stored adapter, computed as PEFT computes it, with every stored group held once.

Implementation: **low-rank side paths at forward time** (what PEFT's mixed-adapter batches and
multi-LoRA servers do), not materialised weights. Each adapted module of the base model keeps its
base weight, run as one op over all the rows of a request (shared by every task), and holds one
side path per *variant* (the distinct stored tensors its tasks use: a merged group's, or one
member's own); each contiguous run of rows adds its variant's LoRA term ``s * B (A x)`` (Hu et al.
2022, Eq. 3; computed as PEFT's ``LoraLayer.forward``, ``result + lora_B(lora_A(x)) * scaling``, with
``s`` the task's own scaling for its own factors and 1 for merged factors, which hold the scale)
or applies its (IA)3 vector (Liu et al. 2022; as PEFT's ``IA3Layer``: the output is scaled, or the
input of a feed-forward module). Why side paths: memory is the base model plus the bundle's stored
bytes (the factors are memory-mapped views, :class:`~.storage._Store`; own factors stored
zero-padded to a module's stored rank are sliced back to the task's rank, a view), while
materialising ``W0 + s B A`` would hold one full weight per group and module (at size N, N copies
of every adapted weight); a side path costs ``r (in + out)`` multiply-adds per row against the
``in * out`` of the shared base op it rides on.

Task-specific tensors: LoRA factors of modules left out of merging (``exclude``) get side paths
with the task's own factors; other tensors (``modules_to_save`` heads) replace the base module's
tensors for their task's rows (routed modules of :mod:`.modules`, per-task widths allowed).

The base model: ``model_factory()`` (parameters on ``meta``, then the base checkpoint's tensors
assigned by name), else the HF class named in the base directory's ``config.json``
(``from_pretrained``, local files only). The base checkpoint is the one the bundle records
(``sources.base``) unless ``base=`` is given; with ``verify`` it is checked against the recorded
sha256.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import bundle_format as fmt
from ..bundle import Bundle
from ..errors import FlexMergeError
from ..io import open_checkpoint
from .build import _ModuleSpec, _order_tasks, _params_on_meta, _widths
from .modules import (_Routed, _RoutedConv, _RoutedEmbedding, _RoutedGeneric, _RoutedLinear, _RoutedNorm,
                      _row_dim, _rows, _standard_kind)
from .routing import _Router
from .sources import _Stored
from .storage import _Store

_ADAPTER_RX = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<factor>[AB])\.weight|ia3_l)$")


class _SidePath(nn.Module):
    """An adapted module: the base module (``inner``, one op for every row) plus per variant the
    LoRA factors and scaling or the (IA)3 vector applied to each run of rows (module docstring)."""

    def __init__(self, name: str, inner: nn.Module, router: _Router, kind: str, feedforward: bool,
                 variants: list[list[_Stored]], scales: list[float], mapping: tuple[int, ...], fnames: list[str]):
        super().__init__()
        self.inner = inner
        self._name = name
        self._router = router
        self._kind = kind  # "LORA" | "IA3"
        self._ff = feedforward
        self._variants = variants
        self._scales = scales
        self._mapping = mapping
        self._mid = router.mapping_id(mapping)
        self._fnames = fnames

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self._modules["inner"], item)

    def extra_repr(self) -> str:
        return f"{self._kind.lower()} side paths={len(self._variants)}"

    def _apply(self, result: torch.Tensor, x: torch.Tensor, g: int) -> torch.Tensor:
        """``result`` (the base op's output for rows ``x``) with variant ``g``'s adapter, as PEFT."""
        if self._kind == "LORA":
            a, b = (s.tensor for s in self._variants[g])
            return (result + F.linear(F.linear(x.to(a.dtype), a), b) * self._scales[g]).to(result.dtype)
        scale = self._variants[g][0].tensor.flatten()
        return (result * scale).to(result.dtype)

    def _scaled_input(self, x: torch.Tensor, g: int) -> torch.Tensor:
        scale = self._variants[g][0].tensor.flatten()
        return (x.to(scale.dtype) * scale).to(x.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        ff = self._kind == "IA3" and self._ff
        if len(runs) == 1:
            g = runs[0][0]
            if ff:
                return self.inner(self._scaled_input(x, g), *args, **kwargs)
            return self._apply(self.inner(x, *args, **kwargs), x, g)
        x = _rows(x, r.total)
        d, k = _row_dim(x, r.total, self._name)
        if ff:  # the input scaled per run, then one base op
            scaled = torch.empty_like(x)
            for g, s, e in runs:
                scaled.narrow(d, s * k, (e - s) * k).copy_(self._scaled_input(x.narrow(d, s * k, (e - s) * k), g))
            return self.inner(scaled, *args, **kwargs)
        result = self.inner(x, *args, **kwargs)
        for g, s, e in runs:
            part = result.narrow(d, s * k, (e - s) * k)
            part.copy_(self._apply(part, x.narrow(d, s * k, (e - s) * k), g))
        return result


def _is_feedforward(config: dict, module: str) -> bool:
    """PEFT's (IA)3 rule: a ``feedforward_modules`` string must match the module's name in full,
    a list entry must end it."""
    ff = config.get("feedforward_modules")
    if not ff:
        return False
    if isinstance(ff, str):
        return bool(re.fullmatch(ff, module))
    return any(module.endswith(k) for k in ff)


def _base_model(bundle: Bundle, base, model_factory, verify: bool) -> tuple[nn.Module, str]:
    """The base model with its own weights (module docstring) and the input kind ("hf" | "plain")."""
    recorded = (bundle.manifest.get("sources", {}).get("base") or {})
    path = base if base is not None else recorded.get("path")
    if path is None:
        raise FlexMergeError("this adapter bundle records no base model path; pass base=PATH (the model the "
                             "adapters were trained on)")
    path = Path(path).expanduser()
    if verify and base is None and recorded.get("sha256"):
        src = open_checkpoint(path, label="base")
        try:
            if src.sha256() != recorded["sha256"]:
                raise FlexMergeError(f"base model {path} differs from the one the bundle was merged from (sha256); "
                                     "restore it, or pass base=PATH of the right model")
        finally:
            src.close()
    if model_factory is not None:
        if not callable(model_factory):
            raise FlexMergeError("model_factory must be a callable returning a torch module")
        with _params_on_meta():
            model = model_factory()
        if not isinstance(model, nn.Module):
            raise FlexMergeError(f"model_factory returned a {type(model).__name__}, not a torch module")
        src = open_checkpoint(path, label="base")
        try:
            params = dict(model.named_parameters())
            missing = [n for n in params if n not in set(src.names())]
            if missing:
                raise FlexMergeError(f"model parameter '{missing[0]}' is not in the base checkpoint {path}; the "
                                     "model factory does not match the base model")
            model.load_state_dict({n: src.get(n) for n in params}, strict=False, assign=True)
        finally:
            src.close()
        return model.eval(), "plain"
    cdir = path if path.is_dir() else path.parent
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(cdir), local_files_only=True)
        cls = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        if cls is None:
            raise ValueError("its config.json names no known model class in 'architectures'")
        model = cls.from_pretrained(str(cdir), local_files_only=True)
    except (ImportError, OSError, ValueError) as exc:
        raise FlexMergeError(f"cannot build the base model from {cdir} ({str(exc).splitlines()[0]}); pass "
                             "model_factory= (and base=PATH)") from None
    return model.eval(), "hf"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    (model.get_submodule(parent) if parent else model)._modules[child] = new


def load_adapter_bundle(cls, bundle: Bundle, base, model_factory, verify: bool):
    """``cls(...)`` (:class:`~.model.MultiTaskModel`) serving an adapter bundle (module docstring)."""
    from ..adapters.export import own_rank
    from ..adapters.source import PREFIX, lora_scale

    info = bundle.manifest["adapter"]
    kind, configs = info["peft_type"], info["configs"]
    tasks = list(bundle.tasks)
    model, input_kind = _base_model(bundle, base, model_factory, verify)
    for p in model.parameters():
        p.requires_grad_(False)
    store = _Store(bundle)
    router = _Router(len(tasks), "on_the_fly", None)
    spec = bundle.manifest.get("task_specific", {}) or {}

    # module -> task -> (uid, {factor key: (file, stored key)}, own factors?)
    adapted: dict[str, dict[str, tuple]] = {}
    for b in bundle.blocks:
        for key in b.params:
            m = _ADAPTER_RX.match(key)
            for t in tasks:
                gi, pos = bundle.group_of(t, b.name)
                original = b.groups[gi]["kind"] == "original"
                stored = fmt.original_key(gi, pos, key) if original else fmt.merged_key(gi, key)
                entry = adapted.setdefault(m.group("module"), {}).setdefault(
                    t, (("block", b.file, gi, pos if original else -1), {}, original))
                entry[1][key] = (b.file, stored)
    heads: dict[str, dict[str, dict[str, tuple]]] = {}  # module -> task -> {param: (file, key)}
    for t in tasks:
        for key in (spec.get(t) or {}).get("names") or []:
            m = _ADAPTER_RX.match(key)
            if m is not None:
                entry = adapted.setdefault(m.group("module"), {}).setdefault(
                    t, (("spec", t, m.group("module")), {}, True))
                entry[1][key] = (spec[t]["file"], key)
                continue
            module, _, pname = key.removeprefix(PREFIX).rpartition(".")
            heads.setdefault(module, {}).setdefault(t, {})[pname] = (spec[t]["file"], key)

    routed: dict[str, nn.Module] = {}
    weights: list[tuple[tuple[int, ...], int]] = []
    for pm, per_task in adapted.items():
        module = pm.removeprefix(PREFIX)
        if len(per_task) != len(tasks):
            lacking = next(t for t in tasks if t not in per_task)
            raise FlexMergeError(f"adapter bundle: task '{lacking}' has no adapter tensors for module '{module}'; "
                                 "the bundle is damaged: re-run 'flexmerge merge'")
        try:
            inner = model.get_submodule(module)
        except AttributeError:
            raise FlexMergeError(f"the bundle adapts module '{module}', which the base model has not; give the base "
                                 "model the adapters were trained on (base=, model_factory=)") from None
        if isinstance(inner, (_SidePath, _Routed)):
            raise FlexMergeError(f"module '{module}' is used at two places in the model; give each place its own "
                                 "module")
        variants, scales, mapping, seen = [], [], [], {}
        for t in tasks:
            uid, keys, original = per_task[t]
            if uid not in seen:
                srcs = []
                for key in sorted(keys):  # lora_A before lora_B
                    tensor = store.get(*keys[key])
                    if kind == "LORA" and original:
                        tensor = own_rank(tensor, key, configs[t])
                    srcs.append(_Stored(tensor, (uid, key)))
                seen[uid] = len(variants)
                variants.append(srcs)
                scales.append(lora_scale(configs[t], module, srcs[0].shape[0]) if kind == "LORA" and original else 1.0)
            mapping.append(seen[uid])
        side = _SidePath(module, inner, router, kind, _is_feedforward(configs[tasks[0]], module),
                         variants, scales, tuple(mapping), sorted(per_task[tasks[0]][1]))
        _replace(model, module, side)
        routed[module] = side
        weights.append((tuple(mapping), sum(s.tensor.numel() * s.tensor.element_size() for s in variants[0])))

    for module, per_task in heads.items():
        routed[module] = _route_head(model, module, per_task, tasks, store, router)
        weights.append((routed[module]._mapping, 0))
    order = _order_tasks(weights, len(tasks))
    return cls(bundle, model, router, store, order, [], routed, input_kind)


def _route_head(model: nn.Module, module: str, per_task: dict, tasks: list[str], store: _Store,
                router: _Router) -> _Routed:
    """A module whose tensors are task-specific for some tasks (``modules_to_save``): routed with
    each task's own tensors, the base module's for tasks without their own."""
    try:
        inner = model.get_submodule(module)
    except AttributeError:
        inner = None
    own = [n for n, p in inner._parameters.items() if p is not None] if inner is not None else []
    for t, params in per_task.items():
        extra = [p for p in params if p not in own]
        if extra:
            raise FlexMergeError(f"task '{t}' has its own tensor '{module}.{extra[0]}', which the base model has not; "
                                 "give the model the adapters were trained on (model_factory=)")
    variants, mapping, seen = [], [], {}
    for t in tasks:
        srcs = []
        for pname in own:
            where = per_task.get(t, {}).get(pname)
            if where is None:
                srcs.append(_Stored(inner._parameters[pname].detach(), ("base", module, pname)))
            else:
                srcs.append(_Stored(store.get(*where), ("spec", t, module, pname)))
        key = tuple(s.uid for s in srcs)
        if key not in seen:
            seen[key] = len(variants)
            variants.append(srcs)
        mapping.append(seen[key])
    parent_name, _, child = module.rpartition(".")
    kind = _standard_kind(inner) or "generic"
    sp = _ModuleSpec(module, inner, None, child, kind, own, [f"{module}.{p}" for p in own])
    kw = dict(name=module, inner=inner, router=router, pnames=own, variants=variants, mapping=tuple(mapping),
              widths=_widths(sp, variants))
    cls = {"linear": _RoutedLinear, "embedding": _RoutedEmbedding, "norm": _RoutedNorm,
           "conv": _RoutedConv}.get(kind, _RoutedGeneric)
    mod = _RoutedLinear(**kw, transposed=True) if kind == "conv1d_t" else cls(**kw)
    mod._fnames = sp.fnames
    _replace(model, module, mod)
    return mod
