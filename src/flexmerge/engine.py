"""The Python API: plan every size in one pass, merge to any size, write a bundle.

    import flexmerge
    fm = flexmerge.FlexMerge("merge.yaml")          # or a dict / MergeConfig
    plan = fm.plan()                                 # every size from N down to the minimum
    bundle = fm.merge(2.5, out="out/")               # a bundle of 2.5 model units on disk
    sd = fm.merge(1.0).state_dict("sst2")            # or in memory
    from flexmerge.recalibrate import Recalibration  # optional: BatchNorm statistics from data
    fm.merge(1.0, out="cal/", recalibrate=Recalibration(batches, model_factory))

Pipeline (docs/architecture.md): source -> blocks -> similarity -> plan -> materialize -> bundle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .blocks import BlockMap
from . import bundle_format as fmt
from .bundle import Bundle, BundleWriter, block_entry
from .config import MergeConfig, load_config, make_config, method_spec
from .errors import FlexMergeError
from .materialize import STATISTICS_SUFFIX, materialize
from .methods import MergeMethod, make_method
from .methods.base import method_text
from .plan import Grouping, Plan, make_plan
from .progress import Progress
from .recalibrate import Recalibration, recalibrate as _recalibrate, recalibrated_block
from .similarity import block_grams
from .sizes import CostModel
from .validate import STREAM_CHUNK, ModelSet, open_models


class FlexMerge:
    """One merge job: validated inputs, a method, the plan, and bundles at any size."""

    def __init__(self, config: str | os.PathLike | Mapping[str, Any] | MergeConfig, *,
                 method: str | dict | MergeMethod | None = None,
                 method_params: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None, progress: bool = False,
                 statistics: str | None = None, model: Any = None,
                 recalibrate: Recalibration | None = None):
        """``statistics``: how normalisation statistics are stored per block group, ``pooled``
        or ``per_task`` (:mod:`flexmerge.sizes`; default: the config's ``statistics``, ``pooled``). ``model``: optionally a torch module of
        the architecture (any weights); then statistics are found by module type and blocks are
        ordered by its registration order, whatever the checkpoint format (:mod:`flexmerge.blocks`).
        ``recalibrate``: the default of :meth:`merge`'s ``recalibrate`` (None: data-free)."""
        if isinstance(config, (str, os.PathLike)):
            self.config = load_config(config, overrides)
        else:
            data = config.model_dump() if isinstance(config, MergeConfig) else dict(config)
            data.update({k: v for k, v in (overrides or {}).items() if v is not None})
            self.config = make_config(data)
        if isinstance(method, MergeMethod):
            self.method = method
        else:
            name = method.get("name") if isinstance(method, dict) else method
            params = dict(method or {}) if isinstance(method, dict) else {}
            params.pop("name", None)
            params.update(method_params or {})
            self.method = make_method(method_spec(self.config, name, params), seed=self.config.seed)
        self.progress = Progress(enabled=progress)
        self.models: ModelSet = open_models(self.config)
        if model is not None:
            self.models.blockmap = _blocks_from_model(self.models, model)
        self.cost = CostModel.for_method(self.models.blockmap, self.method, self.models.mergeable,
                                         statistics=statistics or self.config.statistics)
        self._plan: Plan | None = None
        self._global_done = False
        self._group_cache: dict | None = None
        if recalibrate is not None and not isinstance(recalibrate, Recalibration):
            raise FlexMergeError(f"recalibrate must be a flexmerge.Recalibration(batches, model_factory), got "
                                 f"{type(recalibrate).__name__}")
        self.recalibration = recalibrate

    def cache_groups(self, enabled: bool = True) -> "_GroupCache":
        """Keep every merged group in memory so that later merges of this plan (other sizes)
        merge only their new groups: what a sweep over sizes wants. Costs up to N - 1 merged
        copies of the model in RAM; off by default. Also a context manager:
        ``with fm.cache_groups(): ...`` drops the cache (and turns it off) on leaving the block."""
        self._group_cache = {} if enabled else None
        return _GroupCache(self)

    def close(self) -> None:
        """Drop the group cache and close the checkpoint sources (their open files); a closed
        job can no longer read tensors. ``with FlexMerge(cfg) as fm:`` closes on leaving."""
        self._group_cache = None
        self.models.close()

    def __enter__(self) -> "FlexMerge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.models.closed:
            raise FlexMergeError("this FlexMerge is closed (its 'with' block has ended or close() was "
                                 "called); create a new FlexMerge to read the checkpoints again")

    # ---- facts ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.models.task_names

    @property
    def blockmap(self) -> BlockMap:
        return self.models.blockmap

    def blocks_table(self) -> list[dict]:
        total = self.blockmap.mergeable_bytes + self.blockmap.statistics_bytes
        return [{"block": b.name, "tensors": len(b.params) + len(b.statistics), "parameters": b.numel,
                 "bytes": b.nbytes + b.stats_nbytes, "share": (b.nbytes + b.stats_nbytes) / total}
                for b in self.blockmap.blocks]

    # ---- planning ------------------------------------------------------------------------
    def _run_global_pass(self) -> None:
        if self.method.has_global_pass and not self._global_done:
            with self.progress.task("global pass", total=None):
                self.method.global_pass(self.models.task_vector_stream(self._chunk_elems()),
                                        self.models.num_tasks)
        self._global_done = True

    def grams(self) -> dict:
        """Per-block Gram matrices of (transformed) task vectors: one streaming pass."""
        self._check_open()
        self._run_global_pass()
        with self.progress.task("similarity", total=len(self.models.mergeable)) as bar:
            transform = self.method.transform if self.method.transforms else None
            return block_grams(self.models, transform, progress=bar, chunk_elems=self._chunk_elems())

    def _chunk_elems(self) -> int | None:
        """Stream large tensors in chunks unless the method's transform needs whole tensors."""
        ok = not self.method.transforms or self.method.elementwise_transform
        return STREAM_CHUNK if ok else None

    def plan(self, *, linkage: str | None = None, order: str | None = None, seed: int | None = None,
             grams: dict | None = None, planner: str | None = None) -> Plan:
        """The whole trajectory; cached. Other linkage/order/seed/planner reuse the Gram matrices.
        An ``order`` other than greedy given here is an ablation of the ``similarity`` planner,
        so it plans with that planner unless ``planner`` says otherwise."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32):
            raise FlexMergeError(f"seed {seed!r} must be an integer from 0 to {2 ** 32 - 1}")
        if grams is None:
            grams = self._plan.grams if self._plan is not None else self.grams()
        if planner is None:
            planner = "similarity" if order not in (None, "greedy") else self.config.planner
        plan = make_plan(grams, self.cost, self.tasks, method=self.method.describe(),
                         linkage=linkage or self.config.linkage, order=order or self.config.order,
                         seed=self.config.seed if seed is None else seed,
                         task_specific_bytes=self.models.task_specific_bytes(), planner=planner)
        if linkage is None and order is None and seed is None and planner == self.config.planner:
            self._plan = plan
        return plan

    def use_plan(self, plan: Plan) -> None:
        """Reuse a saved plan (it must be for these tasks, blocks and method)."""
        if plan.tasks != self.tasks:
            raise FlexMergeError(f"plan tasks {plan.tasks} differ from the config's {self.tasks}; re-run 'flexmerge plan'")
        if plan.blocks != self.blockmap.names or plan.block_bytes != self.cost.block_bytes:
            raise FlexMergeError("plan blocks differ from this config's blocks; re-run 'flexmerge plan'")
        if plan.method != self.method.describe():
            raise FlexMergeError(f"plan was made for method {method_text(plan.method)}, not "
                                 f"{method_text(self.method.describe())}; "
                                 "re-run 'flexmerge plan' with this method")
        self._plan = plan

    # ---- merging -------------------------------------------------------------------------
    def merge(self, size: float | str | None = None, out: str | os.PathLike | None = None, *,
              plan: Plan | None = None, grouping: Grouping | None = None, force: bool = False,
              recalibrate: Recalibration | None = None) -> Bundle:
        """Merge to ``size`` (units, or e.g. ``"40MB"``); write to ``out`` or keep in memory.

        ``out`` must be new, empty or an earlier bundle; ``force`` replaces anything.
        ``recalibrate``: re-estimate BatchNorm statistics on unlabeled batches per task
        (:mod:`flexmerge.recalibrate`; default: the one given to the constructor, else none). It
        holds the bundle's tensors in memory and one task's model at a time."""
        self._check_open()
        if grouping is None:
            plan = plan or self._plan or self.plan()
            grouping = plan.at(size if size is not None else plan.min_units)
        self._run_global_pass()
        stored = materialize(self.models, self.method, grouping, self.cost, cache=self._group_cache)
        recal = recalibrate if recalibrate is not None else self.recalibration
        info = None
        if recal is not None:
            if not isinstance(recal, Recalibration):
                raise FlexMergeError(f"recalibrate must be a flexmerge.Recalibration(batches, model_factory), got "
                                     f"{type(recal).__name__}")
            stored, info = self._recalibrated(list(stored), grouping, plan, recal)
        if out is None:
            return self._in_memory(stored, grouping, plan, info)
        return self._write(stored, grouping, plan, Path(out), force, info)

    def _recalibrated(self, stored: list, grouping, plan, recal: Recalibration) -> tuple[list, dict]:
        """``stored`` with every statistics entry re-estimated on data (:mod:`flexmerge.recalibrate`)."""
        draft = self._in_memory(stored, grouping, plan)
        keys = {n for b in self.blockmap.blocks for n in b.statistics}
        per_task, info = _recalibrate(draft.state_dict, self.tasks, keys, recal)
        blocks = self.blockmap.blocks
        return [recalibrated_block(sb, per_task, self.tasks)
                if sb.name == blocks[sb.index].name + STATISTICS_SUFFIX else sb for sb in stored], info

    def _manifest(self, blocks: list[dict], grouping: Grouping, plan: Plan | None,
                  task_specific: dict, hashes: bool, assets: dict | None = None,
                  recalibration: dict | None = None) -> dict:
        m = self.models
        srcs = {"base": _source_entry(m.base, hashes),
                "tasks": {t: _source_entry(s, hashes) for t, s in m.tasks.items()}}
        spec_bytes = m.task_specific_bytes()
        return {
            "format": fmt.BUNDLE_FORMAT, "version": fmt.BUNDLE_VERSION, "tasks": self.tasks,
            "method": self.method.describe(),
            "plan": {"planner": plan.planner if plan else None, "candidate": grouping.planner,
                     "linkage": plan.linkage if plan else None, "order": plan.order if plan else None,
                     "seed": plan.seed if plan else None, "steps": grouping.steps,
                     "statistics": self.cost.statistics, "recalibration": recalibration},
            "size": {"bytes": grouping.size_bytes, "units": grouping.size_units,
                     "unit_bytes": self.cost.unit_bytes, "max_units": len(self.tasks),
                     "task_specific_bytes": spec_bytes, "task_specific_total": sum(spec_bytes.values())},
            "blocks": blocks, "task_specific": task_specific,
            "aliases": dict(m.aliases),
            "task_keys": {t: list(s.names()) for t, s in m.tasks.items()},
            "sources": srcs, "config": self.config.public_dict(), "assets": assets or {},
        }

    def _block_entry(self, sb, rel: str) -> dict:
        params = sb.params if sb.params is not None else self.blockmap.blocks[sb.index].params
        return block_entry(sb, rel, self.tasks, params,
                           shapes={p: list(self.models.base.info(p).shape) for p in params})

    def _task_specific_entry(self, task: str, rel: str, names: list[str]) -> dict:
        src = self.models.tasks[task]
        return {"file": rel, "names": names, "shapes": {n: list(src.info(n).shape) for n in names}}

    def _in_memory(self, stored, grouping, plan, recalibration: dict | None = None) -> Bundle:
        mem, entries = {}, []
        for sb in stored:
            rel = fmt.block_file(sb.index if sb.file_index is None else sb.file_index)
            _check_finite(sb, self.method)
            mem[rel] = sb.tensors
            entries.append(self._block_entry(sb, rel))
        task_specific = {}
        for t, names in self.models.task_specific.items():
            rel = fmt.task_file(t)
            mem[rel] = {n: self.models.tasks[t].get(n) for n in names}
            task_specific[t] = self._task_specific_entry(t, rel, names)
        return Bundle(self._manifest(entries, grouping, plan, task_specific, hashes=False,
                                     recalibration=recalibration), tensors=mem)

    def _write(self, stored, grouping, plan, out: Path, force: bool = False,
               recalibration: dict | None = None) -> Bundle:
        writer = BundleWriter(out, force=force)
        try:
            entries = []
            with self.progress.task("merge", total=len(self.blockmap.blocks)) as bar:
                for sb in stored:
                    rel = fmt.block_file(sb.index if sb.file_index is None else sb.file_index)
                    _check_finite(sb, self.method)
                    writer.write(rel, sb.tensors)
                    entries.append(self._block_entry(sb, rel))
                    bar(sb.index + 1, len(self.blockmap.blocks))
            task_specific = {}
            for t, names in self.models.task_specific.items():
                rel = fmt.task_file(t)
                writer.write(rel, {n: self.models.tasks[t].get(n).contiguous() for n in names})
                task_specific[t] = self._task_specific_entry(t, rel, names)
            assets = {}
            for t, src in self.models.tasks.items():
                source_dir = src.path if src.kind == "hf_dir" else None
                for path in fmt.task_assets(source_dir):
                    rel = fmt.asset_file(t, path.name)
                    writer.copy_file(path, rel)
                    assets.setdefault(t, {})[path.name] = rel
            manifest = self._manifest(entries, grouping, plan, task_specific, hashes=True, assets=assets,
                                      recalibration=recalibration)
            root = writer.commit(manifest)
        except BaseException as exc:
            writer.abort(exc)
            raise
        return Bundle.load(root)


class _GroupCache:
    """What :meth:`FlexMerge.cache_groups` returns: leaving its ``with`` block drops the cache."""

    def __init__(self, fm: FlexMerge):
        self._fm = fm

    def __enter__(self) -> FlexMerge:
        return self._fm

    def __exit__(self, *exc) -> None:
        self._fm._group_cache = None


def _check_finite(sb, method: MergeMethod) -> None:
    """Refuse to store a merged block that is not finite (e.g. a scale so large that float32
    overflows): the inputs were checked finite, so the method's parameters are to blame. A stored
    normalisation variance must not be negative."""
    import torch

    from .blocks import is_variance

    for key, t in sb.tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FlexMergeError(f"method {method_text(method.describe())} produced non-finite values in block "
                                 f"'{sb.name}' ({key}); use smaller scaling parameters")
        if is_variance(key) and t.is_floating_point() and bool((t < 0).any()):
            raise FlexMergeError(f"block '{sb.name}': normalisation variance {key} has negative entries; "
                                 "statistics must come from the checkpoints, not from weight arithmetic")


def _blocks_from_model(models: ModelSet, model) -> BlockMap:
    """The block map with the statistics and registration order of ``model`` (a torch module)."""
    from .blocks import build_block_map, statistics_of

    if not hasattr(model, "state_dict") or not hasattr(model, "named_modules"):
        raise FlexMergeError(f"model must be a torch.nn.Module of the checkpoints' architecture, got "
                             f"{type(model).__name__}")
    order = {n: i for i, n in enumerate(model.state_dict())}
    names = sorted(models.mergeable, key=lambda n: order.get(n, len(order)))
    infos = {n: models.mergeable[n] for n in names}
    return build_block_map(infos, models.config.blocks, excluded=models.blockmap.excluded, key_order=True,
                           statistics=statistics_of(model))


def _source_entry(src, hashes: bool) -> dict:
    return {"path": str(src.path) if src.path is not None else None, "kind": src.kind,
            "sha256": src.sha256() if hashes else None}
