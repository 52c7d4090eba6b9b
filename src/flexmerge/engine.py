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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping

from .blocks import BlockMap
from . import bundle_format as fmt
from .bundle import Bundle, BundleWriter, block_entry
from .config import MergeConfig, method_spec, resolve_config
from .errors import FlexMergeError
from .materialize import STATISTICS_SUFFIX, materialize
from .methods import MergeMethod, make_method
from .methods.base import method_text
from .plan import Grouping, Plan, make_plan
from .progress import Progress
from .recalibrate import Recalibration, recalibrate as _recalibrate, recalibrated_block
from .similarity import block_grams, pass_chunk_elems, single_thread
from .sizes import CostModel
from .validate import STREAM_CHUNK, ModelSet, all_finite, open_models


class PlannedJob:
    """Planning shared by :class:`FlexMerge` and :class:`flexmerge.adapters.engine.AdapterMerge`:
    a subclass has ``config``, ``method``, ``cost``, ``tasks``, ``blockmap``, ``models``
    (``task_specific_bytes()``), ``grams()`` and ``_plan``."""

    _plan: Plan | None = None
    _sizes_only: Plan | None = None

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

    def _size_plan(self) -> Plan:
        """A plan made without the Gram pass (blind left-right order on zero Grams), for what does
        not depend on the order: the size range (every plan starts with originals and ends with
        one group per block) and, for plain methods, the grouping at the minimum size."""
        if self._plan is not None:
            return self._plan
        if self._sizes_only is None:
            import numpy as np

            n = len(self.tasks)
            zero = {b.name: np.zeros((n, n)) for b in self.blockmap.blocks}
            self._sizes_only = make_plan(zero, self.cost, self.tasks, method=self.method.describe(),
                                         linkage=self.config.linkage, order="left-right",
                                         task_specific_bytes=self.models.task_specific_bytes())
        return self._sizes_only

    def target_bytes(self, size: float | str) -> int:
        """The target in bytes, range-checked (no tensor is read)."""
        return self._size_plan().target_bytes(size)



class FlexMerge(PlannedJob):
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
        self.config, self.method = resolve_job(config, method, method_params, overrides)
        self.progress = Progress(enabled=progress)
        self.models: ModelSet = open_models(self.config)
        if model is not None:
            self.models.blockmap = _blocks_from_model(self.models, model)
        self.cost = CostModel.for_method(self.models.blockmap, self.method, self.models.mergeable,
                                         statistics=statistics or self.config.statistics)
        self._plan: Plan | None = None
        self._sizes_only: Plan | None = None
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
            with self.progress.task("global pass", total=None), single_thread():
                # entry-by-entry methods (TIES' top-k histogram) keep nothing between chunks, so
                # the chunks may reuse three buffers of the Gram pass's size instead of faulting in
                # fresh pages each time
                reuse = self.method.elementwise_merge
                chunk = pass_chunk_elems(self.models.num_tasks, self._chunk_elems()) if reuse else self._chunk_elems()
                self.method.global_pass(self.models.task_vector_stream(chunk, reuse), self.models.num_tasks)
        self._global_done = True

    def grams(self) -> dict:
        """Per-block Gram matrices of (transformed) task vectors: one streaming pass."""
        self._check_open()
        self._run_global_pass()
        with self.progress.task("similarity", total=len(self.models.mergeable)) as bar:
            transform = self.method.transform if self.method.has_transform else None
            return block_grams(self.models, transform, progress=bar, chunk_elems=self._chunk_elems())

    def _chunk_elems(self) -> int | None:
        """Stream large tensors in chunks unless the method's transform needs whole tensors."""
        ok = not self.method.has_transform or self.method.elementwise_transform
        return STREAM_CHUNK if ok else None

    def _minimum_size(self, size: float | str | None) -> Plan | None:
        """At the minimum size a plain method's bundle is one merged group per block whatever the
        planner: a plan for it without the Gram pass (its labels are the config's), or None.
        Mask methods may reach their minimum before the last step, at a plan-dependent grouping."""
        if self._plan is not None or self.cost.masked:
            return None
        blind = self._size_plan()
        target = blind.min_bytes if size is None else blind.target_bytes(size)
        # Each merge of a plain method saves at least the smallest block's weights, so below that
        # margin above the minimum every plan has made all its merges.
        if target >= blind.min_bytes + min((w for w in self.cost.weight_bytes if w > 0), default=1):
            return None
        from dataclasses import replace

        return replace(blind, planner=self.config.planner, order=self.config.order,
                       seed=self.config.seed, grams={})

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
            plan, grouping = self.grouping_at(size, plan)
        stored = self.stored_blocks(grouping)
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

    def grouping_at(self, size: float | str | None = None, plan: Plan | None = None) -> tuple[Plan, Grouping]:
        """The plan and the grouping for ``size`` (default: the minimum). The minimum size of a
        plain method needs no Gram pass (:meth:`_minimum_size`); other sizes plan once."""
        self._check_open()
        plan = plan or self._minimum_size(size) or self._plan or self.plan()
        return plan, plan.at(size if size is not None else plan.min_units)

    def known_grouping(self, size: float | str) -> Grouping | None:
        """The grouping for ``size`` if it is known without a Gram pass (the minimum size of a
        plain method, or a plan already made or given), else None."""
        plan = self._minimum_size(size) or self._plan
        return plan.at(size) if plan is not None else None

    def stored_blocks(self, grouping: Grouping) -> Iterator:
        """What a bundle stores for ``grouping``, one block at a time
        (:class:`~flexmerge.materialize.StoredBlock`), each checked finite before it is yielded."""
        self._check_open()
        self._run_global_pass()
        for sb in materialize(self.models, self.method, grouping, self.cost, cache=self._group_cache):
            _check_finite(sb, self.method)
            yield sb

    def _recalibrated(self, stored: list, grouping, plan, recal: Recalibration) -> tuple[list, dict]:
        """``stored`` with every statistics entry re-estimated on data (:mod:`flexmerge.recalibrate`)."""
        draft = self._in_memory(stored, grouping, plan)
        keys = {n for b in self.blockmap.blocks for n in b.statistics}
        per_task, info = _recalibrate(draft.state_dict, self.tasks, keys, recal)
        blocks = self.blockmap.blocks
        out = [recalibrated_block(sb, per_task, self.tasks)
               if sb.name == blocks[sb.index].name + STATISTICS_SUFFIX else sb for sb in stored]
        for sb in out:
            _check_finite(sb, self.method)
        return out, info

    def _manifest(self, blocks: list[dict], grouping: Grouping, plan: Plan | None,
                  task_specific: dict, hashes: bool | dict, assets: dict | None = None,
                  recalibration: dict | None = None) -> dict:
        m = self.models
        digests = hashes if isinstance(hashes, dict) else {}
        srcs = {"base": _source_entry(m.base, digests.get(None) if digests else hashes),
                "tasks": {t: _source_entry(s, digests.get(t) if digests else hashes) for t, s in m.tasks.items()}}
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
            "notes": method_notes(self.method, blocks),
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
        # Two helper threads: the sources' sha256 (config hash_sources; reading 18 GiB once more
        # after the merge cost 15 s) and the block files, written and hashed while the next block
        # merges (one block in flight: writing 2 GiB of blocks took 5 s of a 32 s merge).
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flexmerge-write")
        hashing = self.config.hash_sources
        pending = {None: pool.submit(self.models.base.sha256),
                   **{t: pool.submit(s.sha256) for t, s in self.models.tasks.items()}} if hashing else {}
        in_flight = None
        try:
            entries = []
            with self.progress.task("merge", total=len(self.blockmap.blocks)) as bar:
                for sb in stored:
                    rel = fmt.block_file(sb.index if sb.file_index is None else sb.file_index)
                    if in_flight is not None:
                        in_flight.result()
                    in_flight = pool.submit(writer.write, rel, sb.tensors)
                    entries.append(self._block_entry(sb, rel))
                    bar(sb.index + 1, len(self.blockmap.blocks))
                if in_flight is not None:
                    in_flight.result()
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
            digests = {k: f.result() for k, f in pending.items()} if hashing else False
            manifest = self._manifest(entries, grouping, plan, task_specific, hashes=digests, assets=assets,
                                      recalibration=recalibration)
            root = writer.commit(manifest)
        except BaseException as exc:
            for f in pending.values():
                f.cancel()
            if in_flight is not None:
                in_flight.cancel()
                try:
                    in_flight.result()  # no write may still run into the directory being removed
                except BaseException:
                    pass
            pool.shutdown(wait=False, cancel_futures=True)  # a source still being hashed only reads
            writer.abort(exc)
            raise
        pool.shutdown(wait=True)
        return Bundle.load(root)


def resolve_job(config: str | os.PathLike | Mapping[str, Any] | MergeConfig,
                method: str | dict | MergeMethod | None = None,
                method_params: Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> tuple[MergeConfig, MergeMethod]:
    """The validated config (a YAML path, a dict or a :class:`MergeConfig`, with ``overrides``)
    and the method it asks for (``method``/``method_params`` override the config's)."""
    cfg = resolve_config(config, overrides)
    if isinstance(method, MergeMethod):
        return cfg, method
    name = method.get("name") if isinstance(method, dict) else method
    params = dict(method or {}) if isinstance(method, dict) else {}
    params.pop("name", None)
    params.update(method_params or {})
    return cfg, make_method(method_spec(cfg, name, params), seed=cfg.seed)


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
    from .blocks import is_variance

    for key, t in sb.tensors.items():
        if t.is_floating_point() and not all_finite(t):
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


def _source_entry(src, digest: bool | str | None) -> dict:
    """``digest``: the source's sha256, or True to compute it here, or False/None for none."""
    sha = src.sha256() if digest is True else (digest or None)
    return {"path": str(src.path) if src.path is not None else None, "kind": src.kind, "sha256": sha}


def method_notes(method: MergeMethod, blocks: list[dict]) -> list[str]:
    """The manifest's ``notes``: per kind of :meth:`MergeMethod.fallback`, how many tensors of
    merged groups the method handled otherwise than by its rule, with the first names."""
    found: dict[str, list[str]] = {}
    for b in blocks:
        if not any(g["kind"] == "merged" for g in b["groups"]):
            continue
        for name in b["params"]:
            note = method.fallback(name, tuple(b["shapes"].get(name, ())))
            if note is not None:
                found.setdefault(note, []).append(name)
    label = method.describe()["name"]
    return [f"{label}: {len(names)} {note}: {', '.join(names[:3])}" + (", ..." if len(names) > 3 else "")
            for note, names in found.items()]
