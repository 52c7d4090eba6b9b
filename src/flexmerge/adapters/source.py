"""PEFT adapter directories as merge inputs: reading, checking, and task vectors one module at a time.

An adapter directory is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` (LoRA) or ``base_model.model.<module>.ia3_l`` ((IA)3); other keys
(``modules_to_save`` heads) are task-specific: kept per task, never merged.

Task vector of an adapted module (what the adapter adds to the base weight ``W0``):

* LoRA (Hu et al. 2022, Eq. 3): ``dW = s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with
  ``use_rslora``, Kalajdzievski 2023), per module ``r`` and ``alpha`` from ``rank_pattern`` and
  ``alpha_pattern`` as PEFT resolves them, transposed when ``fan_in_fan_out`` (GPT-2's Conv1D
  stores ``W0`` as ``[in, out]``): exactly PEFT's ``LoraLayer.get_delta_weight``.
* (IA)3 (Liu et al. 2022): the learned scaling vector ``l`` minus its initial value 1, so that the
  base of the core rule ``theta = theta_0 + tau`` is the all-ones vector (FlexMerge's PEFT setting
  merges these vectors).

Planning forms ``dW`` for a LoRA module only where that is cheaper than the factors:
``<dW_i, dW_j> = s_i s_j tr((B_i^T B_j)(A_j A_i^T))`` (r_i x r_j products, :meth:`AdapterSet.factor_gram`).
Merging forms one block's ``dW`` for the group's members at a time (:meth:`AdapterSet.deltas`).

All adapters must share the PEFT type, the base model, the target modules, the adapted modules and
their layer shapes and dtype; ``alpha``, ``use_rslora`` (folded into ``s``) and the LoRA **rank** per
module may differ. Ranks: every stored group of a module keeps the largest rank ``R`` any adapter
has for it (:data:`RANK_RULE`): a task's own factors are stored zero-padded to ``R`` (``B A``
unchanged: the padded rows of ``A`` and columns of ``B`` are zero; an export slices them back to
the task's own rank, bit for bit), a merged group stores rank-``R`` factors. So every group of a
block costs the same bytes, one size unit is one adapter at the largest ranks, and the core's
planner (:mod:`flexmerge.sizes`: costs from group counts) plans adapters of different ranks; the
price is stored zeros in the groups of one of lower-rank adapters. Everything else is one line
naming the adapter and what differs. Not supported (refused): DoRA, LoRA biases, embedding and conv LoRA,
adapters saved as ``.bin``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FlexMergeError
from ..io import CheckpointSource, SafetensorsSource, TensorInfo, open_checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
KINDS = ("LORA", "IA3")
RANK_RULE = "max"
"""The stored rank of every group of a LoRA module: the largest rank any adapter has for it (module docstring)."""
GRAM_CHUNK = 1 << 24
"""Elements of ``dW`` formed at a time when a LoRA Gram is cheaper from dense ``dW`` (:meth:`AdapterSet.factor_gram`)."""
_LORA_RX = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
_IA3_RX = re.compile(r"^(?P<module>.+)\.ia3_l$")


def is_adapter_dir(path) -> bool:
    """True for a directory holding ``adapter_config.json`` (a PEFT adapter)."""
    try:
        return isinstance(path, (str, Path)) and (Path(path).expanduser() / CONFIG_NAME).is_file()
    except OSError:
        return False


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class ModuleInfo:
    """One adapted module of the base: its name, the base weight it changes, and per task the keys."""

    module: str  # the module's name in the base model, e.g. encoder.layer.0.attention.self.query
    weight: str  # the base checkpoint's key of the weight it adapts
    shape: tuple[int, ...]  # the task vector's shape (the base weight's, or the (IA)3 vector's)
    keys: list[str]  # the adapter keys of this module (lora_A then lora_B, or ia3_l)
    infos: list[TensorInfo]  # their shapes and dtype (the same in every adapter)
    scales: list[float] = field(default_factory=list)  # per task: s (LoRA); 1.0 for (IA)3
    rank: int = 0  # the stored rank: the largest of ``ranks`` (RANK_RULE)
    ranks: list[int] = field(default_factory=list)  # per task: its own LoRA rank

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos)


class Adapter:
    """One adapter directory: its config, its safetensors (read one tensor at a time), its modules."""

    def __init__(self, task: str, path):
        self.task = task
        self.path = Path(path).expanduser()
        label = f"adapter '{task}' ({self.path})"
        self.label = label
        cfg_path = self.path / CONFIG_NAME
        if not cfg_path.is_file():
            raise FlexMergeError(f"{label}: no {CONFIG_NAME}; give a directory written by PEFT's save_pretrained")
        try:
            self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FlexMergeError(f"{label}: {CONFIG_NAME} is not valid JSON ({type(exc).__name__}); "
                                 "re-save the adapter") from None
        if not isinstance(self.config, dict):
            raise FlexMergeError(f"{label}: {CONFIG_NAME} is not a JSON object; re-save the adapter")
        self.kind = str(self.config.get("peft_type", "")).upper()
        if self.kind not in KINDS:
            raise FlexMergeError(f"{label}: peft_type {self.config.get('peft_type')!r} is not supported; "
                                 "flexmerge merges LORA and IA3 adapters")
        weights = self.path / WEIGHTS_NAME
        if not weights.is_file():
            other = " (it has adapter_model.bin: convert it to safetensors)" if (self.path / "adapter_model.bin").exists() else ""
            raise FlexMergeError(f"{label}: {WEIGHTS_NAME} is missing{other}; give a directory written by PEFT's "
                                 "save_pretrained")
        self.source: CheckpointSource = SafetensorsSource([weights], self.path, "peft_adapter")
        self._check_supported()

    def _check_supported(self) -> None:
        c = self.config
        if self.kind == "LORA":
            if c.get("use_dora"):
                raise FlexMergeError(f"{self.label}: DoRA adapters (use_dora) are not supported; use plain LoRA")
            if c.get("bias") not in (None, "none"):
                raise FlexMergeError(f"{self.label}: bias={c.get('bias')!r} is not supported (biases are not "
                                     "low-rank); train with bias='none'")
        for name in self.source.names():
            if "lora_embedding_" in name or "lora_magnitude_vector" in name:
                raise FlexMergeError(f"{self.label}: tensor '{name}' (embedding LoRA or DoRA) is not supported; "
                                     "flexmerge merges LoRA of linear layers and (IA)3 vectors")

    def module_keys(self) -> dict[str, list[str]]:
        """Module name (without PEFT's prefix) -> its adapter keys, in key order."""
        out: dict[str, list[str]] = {}
        rx = _LORA_RX if self.kind == "LORA" else _IA3_RX
        for name in self.source.names():
            m = rx.match(name)
            if m is None:
                continue
            module = m.group("module").removeprefix(PREFIX)
            out.setdefault(module, []).append(name)
        for module, keys in out.items():
            keys.sort()  # lora_A before lora_B
            if self.kind == "LORA" and len(keys) != 2:
                raise FlexMergeError(f"{self.label}: module '{module}' has {keys} but needs lora_A and lora_B; "
                                     "the adapter file is incomplete: re-save it")
        return out

    def scale(self, module: str, rank: int) -> float:
        """PEFT's LoRA scaling of ``module``: ``alpha / r`` or ``alpha / sqrt(r)`` (rslora)."""
        return lora_scale(self.config, module, rank) if self.kind == "LORA" else 1.0


def lora_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's LoRA scaling of ``module`` of an adapter config: ``alpha / r`` (Hu et al. 2022, Eq. 3) or
    ``alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023), ``alpha`` from ``alpha_pattern``."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def lora_rank(config: dict, module: str) -> int:
    """The rank PEFT gives ``module`` from an adapter config (``rank_pattern``, else ``r``)."""
    return int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))


def _targets(config: dict):
    t = config.get("target_modules")
    return sorted(t) if isinstance(t, (list, tuple)) else t


def _base_weight(base: CheckpointSource, module: str) -> str | None:
    """The base checkpoint key of ``module``'s weight: ``<module>.weight``, else the unique key that
    names the same module up to a leading prefix (``bert.encoder...`` vs ``encoder...``)."""
    exact = f"{module}.weight"
    names = base.names()
    if exact in names:
        return exact
    found = [n for n in names if n.endswith(".weight") and
             (n.endswith("." + exact) or exact.endswith("." + n))]
    return found[0] if len(found) == 1 else None


class AdapterSet:
    """Validated adapters of one base: tasks, adapted modules, factor shapes, task-specific keys.

    The core's :class:`~flexmerge.validate.ModelSet` for adapters: ``mergeable`` maps each adapted
    module's base weight name to a :class:`~flexmerge.io.TensorInfo` whose bytes are one adapter's
    stored bytes for it (both factors, or the vector), so the core's blocks and sizes count
    adapter units."""

    def __init__(self, base: CheckpointSource, adapters: dict[str, Adapter], exclude: list[str]):
        self.base = base
        self.adapters = adapters
        self.tasks = adapters  # task -> Adapter (keys as the core's ``tasks``)
        first_task, first = next(iter(adapters.items()))
        self.kind = first.kind
        self._check_same(first_task, first)
        keys = first.module_keys()
        excl = [re.compile(p) for p in exclude]
        self.modules: dict[str, ModuleInfo] = {}
        excluded_keys: set[str] = set()
        for module, mkeys in keys.items():
            weight = _base_weight(base, module)
            if any(rx.search(weight or module) or rx.search(module) for rx in excl):
                excluded_keys.update(mkeys)
                continue
            infos = [first.source.info(k) for k in mkeys]
            if self.kind == "LORA":
                a, b = infos
                if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                    raise FlexMergeError(f"{first.label}: module '{module}' has factors {list(a.shape)} and "
                                         f"{list(b.shape)}; only LoRA of linear layers (2-D factors) is supported")
                rank = a.shape[0]
                fan_in_fan_out = bool(first.config.get("fan_in_fan_out"))
                shape = (a.shape[1], b.shape[0]) if fan_in_fan_out else (b.shape[0], a.shape[1])
            else:
                rank, shape = 0, tuple(infos[0].shape)
            if weight is None:
                raise FlexMergeError(f"base {base.describe()} has no weight of adapted module '{module}' "
                                     f"(adapter '{first_task}'); give the base model the adapters were trained on")
            bshape = tuple(base.info(weight).shape)
            if self.kind == "LORA":
                fits = shape == bshape
            else:  # [out, 1] or [1, in]: its non-unit size must be one of the weight's
                fits = len(shape) == 2 and 1 in shape and max(shape) in bshape
            if not fits:
                raise FlexMergeError(f"adapter '{first_task}': module '{module}' changes a {list(shape)} weight but the "
                                     f"base's '{weight}' is {list(bshape)}; give the base model the adapters were "
                                     "trained on")
            self.modules[weight] = ModuleInfo(module, weight, shape, list(mkeys), infos, rank=rank)
        if not self.modules:
            raise FlexMergeError(f"{first.label}: no adapted modules to merge (exclude patterns {exclude} "
                                 "may match every module)")
        self.task_specific: dict[str, list[str]] = {}
        for task, ad in adapters.items():
            mk = ad.module_keys()
            if set(mk) != set(keys):
                diff = sorted(set(mk) ^ set(keys))[0]
                raise FlexMergeError(f"{ad.label}: adapted modules differ from adapter '{first_task}' (module "
                                     f"'{diff}' is in one only); all adapters must adapt the same modules")
            for info in self.modules.values():
                got = [ad.source.info(k) for k in info.keys]
                rank = got[0].shape[0] if self.kind == "LORA" else 0
                for k, g, want in zip(info.keys, got, info.infos):
                    # LoRA: A [r, in] and B [out, r]; only r may differ from the first adapter's
                    same = (g.shape == want.shape if self.kind == "IA3" else len(g.shape) == 2 and (
                        g.shape[1] == want.shape[1] and g.shape[0] == rank if k == info.keys[0]
                        else g.shape[0] == want.shape[0] and g.shape[1] == rank))
                    if not same or g.dtype != want.dtype:
                        raise FlexMergeError(
                            f"{ad.label}: '{k}' is {list(g.shape)} {str(g.dtype).removeprefix('torch.')} but "
                            f"adapter '{first_task}' has {list(want.shape)} {str(want.dtype).removeprefix('torch.')}; "
                            "all adapters must have the same layer shapes and dtype per module (LoRA ranks may "
                            "differ)")
                if rank and lora_rank(ad.config, info.module) != rank:  # export and serving read ranks from configs
                    raise FlexMergeError(f"{ad.label}: module '{info.module}' has rank {rank} factors but its "
                                         f"{CONFIG_NAME} gives rank {lora_rank(ad.config, info.module)} (r, rank_pattern); "
                                         "re-save the adapter with PEFT")
                info.ranks.append(rank)
                info.scales.append(ad.scale(info.module, rank) if rank else 1.0)
            merged = {k for i in self.modules.values() for k in i.keys}
            self.task_specific[task] = [n for n in ad.source.names() if n not in merged]
        self.excluded = sorted(excluded_keys)
        if self.kind == "LORA":  # stored factors: rank R = the largest rank (RANK_RULE)
            for info in self.modules.values():
                info.rank = max(info.ranks)
                a, b = info.infos
                info.infos = [TensorInfo((info.rank, a.shape[1]), a.dtype), TensorInfo((b.shape[0], info.rank), b.dtype)]

    def _check_same(self, first_task: str, first: Adapter) -> None:
        ref = first.config
        checks = [("peft_type", lambda c: str(c.get("peft_type", "")).upper()),
                  ("base_model_name_or_path", lambda c: c.get("base_model_name_or_path")),
                  ("target_modules", _targets),
                  ("fan_in_fan_out", lambda c: bool(c.get("fan_in_fan_out"))),
                  ("feedforward_modules", lambda c: _targets({"target_modules": c.get("feedforward_modules")}))]
        for task, ad in self.adapters.items():
            for what, get in checks:
                if get(ad.config) != get(ref):
                    raise FlexMergeError(f"{ad.label}: {what} {get(ad.config)!r} differs from adapter "
                                         f"'{first_task}''s {get(ref)!r}; all adapters must share the base "
                                         "model and target modules")

    # ---- the core's ModelSet interface ---------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def num_tasks(self) -> int:
        return len(self.adapters)

    @property
    def mergeable(self) -> dict[str, TensorInfo]:
        """Base weight name -> a 1-D TensorInfo of one adapter's stored bytes for that module."""
        out = {}
        for w, i in self.modules.items():
            dtype = i.infos[0].dtype
            out[w] = TensorInfo((i.nbytes // dtype.itemsize,), dtype)
        return out

    def task_specific_bytes(self) -> dict[str, int]:
        return {t: sum(self.adapters[t].source.info(n).nbytes for n in names)
                for t, names in self.task_specific.items()}

    def close(self) -> None:
        self.base.close()
        for ad in self.adapters.values():
            ad.source.close()

    # ---- task vectors ----------------------------------------------------------------------
    def factors(self, task: int, weight: str) -> list[torch.Tensor]:
        """Task ``task``'s own tensors of one module (LoRA: ``[A, B]`` at its own rank)."""
        ad = list(self.adapters.values())[task]
        return [ad.source.get(k) for k in self.modules[weight].keys]

    def stored_factors(self, task: int, weight: str) -> list[torch.Tensor]:
        """What a group of one stores for ``task``: its own tensors, LoRA factors zero-padded to the
        stored rank (:data:`RANK_RULE`; ``B A`` unchanged)."""
        xs = self.factors(task, weight)
        pad = self.modules[weight].rank - xs[0].shape[0] if self.kind == "LORA" else 0
        if pad <= 0:
            return xs
        a, b = xs
        return [torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)]

    def delta(self, task: int, weight: str) -> torch.Tensor:
        """Task ``task``'s float32 task vector of one module (module docstring)."""
        info = self.modules[weight]
        if self.kind == "IA3":
            return self.factors(task, weight)[0].to(torch.float32) - 1.0
        a, b = (x.to(torch.float32) for x in self.factors(task, weight))
        dw = (b @ a) * info.scales[task]
        ad = list(self.adapters.values())[task]
        return dw.T.contiguous() if ad.config.get("fan_in_fan_out") else dw

    def deltas(self, weight: str, members) -> torch.Tensor:
        """``[g, *shape]`` float32 task vectors of ``members`` for one module."""
        return torch.stack([self.delta(t, weight) for t in members])

    def factor_gram(self, weight: str) -> np.ndarray:
        """N x N float64 Gram of one LoRA module's task vectors, each factor read once.

        From the factors: with ``A`` the stacked ``[sum r_i, in]`` and ``B`` the ``[out, sum r_i]``
        factors, ``G_ij = s_i s_j sum((B^T B)_ij * (A A^T)_ij)`` over the ``r_i x r_j`` blocks
        (``tr(X Y) = sum(X * Y^T)``, ``A A^T`` symmetric): two symmetric products (BLAS ``syrk``),
        ``K^2 (in + out) / 2`` multiply-adds for ``K = sum r_i``, no ``dW`` formed. When forming
        ``dW`` is cheaper (``K in out + N^2 in out / 2``: large ``N r``), the dense ``dW`` are formed
        :data:`GRAM_CHUNK` elements at a time and their Gram taken as for full models
        (:func:`flexmerge.similarity.gram`). Products in float32 accumulated in float64, as there."""
        info = self.modules[weight]
        ka, kb = info.keys
        ranks, n = info.ranks, self.num_tasks
        k, d_in, d_out = sum(ranks), info.infos[0].shape[1], info.infos[1].shape[0]
        if k * k * (d_in + d_out) / 2 > k * d_in * d_out + n * n * d_in * d_out / 2:
            return self._dense_gram(weight)
        a = torch.empty(k, d_in, dtype=info.infos[0].dtype)
        bs, off = [], 0
        for ad, r in zip(self.adapters.values(), ranks):
            ad.source.get_range_into(ka, 0, r * d_in, a[off:off + r].view(-1))
            bs.append(ad.source.get(kb))
            off += r
        b = torch.cat(bs, dim=1)
        a = (a if a.dtype == torch.float32 else a.to(torch.float32)).numpy()
        b = (b if b.dtype == torch.float32 else b.to(torch.float32)).numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            aat, btb = np.dot(a, a.T), np.dot(b.T, b)  # x x^T and x^T x: BLAS syrk
        if not (np.isfinite(aat).all() and np.isfinite(btb).all()):  # float32 overflow: redo in float64
            a, b = a.astype(np.float64), b.astype(np.float64)
            aat, btb = np.dot(a, a.T), np.dot(b.T, b)
        prod = aat.astype(np.float64) * btb
        starts = np.array([sum(ranks[:i]) for i in range(n)])
        blocks = np.add.reduceat(np.add.reduceat(prod, starts, axis=0), starts, axis=1)
        s = np.asarray(info.scales, dtype=np.float64)
        return blocks * np.outer(s, s)

    def _dense_gram(self, weight: str) -> np.ndarray:
        """:meth:`factor_gram` from the dense ``dW``, formed ``rows`` output rows at a time."""
        from ..similarity import gram

        info = self.modules[weight]
        n = self.num_tasks
        pairs = [[x.to(torch.float32) for x in self.factors(t, weight)] for t in range(n)]
        d_out, d_in = pairs[0][1].shape[0], pairs[0][0].shape[1]
        rows = max(1, GRAM_CHUNK // (n * d_in))
        out = np.zeros((n, n))
        for r0 in range(0, d_out, rows):
            r1 = min(d_out, r0 + rows)
            x = torch.empty(n, r1 - r0, d_in)
            for t, (a, b) in enumerate(pairs):
                torch.mm(b[r0:r1], a, out=x[t])
                x[t] *= info.scales[t]
            out += gram(x).numpy()
        return out

    def base_tensor(self, weight: str) -> torch.Tensor:
        """The pretrained tensor a method's ``GroupInput.base`` gets: the base weight (LoRA) or the
        all-ones initial vector ((IA)3)."""
        if self.kind == "IA3":
            return torch.ones(self.modules[weight].shape, dtype=torch.float32)
        return self.base.get(weight).to(torch.float32)

    def check_finite(self) -> None:
        for t, ad in enumerate(self.adapters.values()):
            for info in self.modules.values():
                for k in info.keys:
                    if not bool(torch.isfinite(ad.source.get(k)).all()):
                        raise FlexMergeError(f"{ad.label}: tensor '{k}' contains NaN or Inf; fix or re-train "
                                             "that adapter")


def open_adapters(cfg) -> AdapterSet:
    """Open and check the base and every task's adapter directory of a config (headers only)."""
    base = open_checkpoint(cfg.base, label="base")
    adapters = {}
    for task, path in cfg.tasks.items():
        if not is_adapter_dir(path):
            raise FlexMergeError(f"task '{task}' ({path}) is not a PEFT adapter directory (no {CONFIG_NAME}) while "
                                 "other tasks are; give every task as an adapter directory, or none")
        adapters[task] = Adapter(task, path)
    return AdapterSet(base, adapters, list(cfg.exclude))
