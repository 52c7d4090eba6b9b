"""The sweep: every method at every size (and the ablation runs) through a user evaluator, each
distinct merged model evaluated once (see :mod:`flexmerge.evaluate`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import FlexMergeError
from .arguments import (CHANNEL_MERGING, LINKAGES, ORDERS, _check_methods, _method_name, _parse_seeds,
                        parse_list, parse_sizes)
from .table import CSV_NAME, SweepResult, _mean
from .user_code import callable_name

Evaluator = Callable[[str, Any], float]


def score_value(value: Any, who: str, task: str, where: str) -> float:
    """``value`` as a finite float, or a one-line :class:`FlexMergeError` naming ``who``, the task
    and the value. Only real numbers count (``int``, ``float``, numpy scalars): a bool, a string,
    ``None`` or a tensor is a bug in the evaluator, and NaN or an infinity is never a score."""
    import numbers

    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        shown = f"a {type(value).__name__}"
        if isinstance(value, (bool, np.bool_, str)):
            shown += f" ({value!r:.60})"
        raise FlexMergeError(f"{who} returned {shown} for task '{task}' ({where}), not a number; "
                             "return a float score (higher is better), e.g. float(accuracy)")
    score = float(value)
    if not math.isfinite(score):
        raise FlexMergeError(f"{who} returned {score} for task '{task}' ({where}); return a finite score "
                             "(NaN or infinity is never recorded)")
    return score


class _EvalFailure(Exception):
    def __init__(self, who: str, task: str, where: str, exc: BaseException):
        super().__init__(f"{who} failed on task '{task}' ({where}): {type(exc).__name__}: {exc}")
        self.message = str(self)
        self.exc = exc


class _BadScore(_EvalFailure):
    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.message = message
        self.exc = None


class _Sweep:
    def __init__(self, config, evaluator, model_factory, finetuned, zero_shot, out, log, progress):
        from ..config import MergeConfig, load_config, make_config
        from ..validate import open_models

        if isinstance(config, (str, os.PathLike)):
            self.cfg = load_config(config)
        else:
            self.cfg = config if isinstance(config, MergeConfig) else make_config(dict(config))
        if not callable(evaluator):
            raise FlexMergeError(f"evaluator must be a callable (task_name, state_dict) -> float, got "
                                 f"{type(evaluator).__name__}")
        if model_factory is not None and not callable(model_factory):
            raise FlexMergeError(f"model_factory must be a callable task_name -> torch.nn.Module, got "
                                 f"{type(model_factory).__name__}")
        self.models = open_models(self.cfg)
        self.tasks = self.models.task_names
        self.evaluator = evaluator
        self.ev_name = callable_name(evaluator)
        self.factory = model_factory
        self.out = out
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.modules: dict[str, Any] = {}
        self.cache: dict[str, dict[str, float]] = {}
        self.evaluations = 0
        from ..sizes import CostModel

        unit_bytes = CostModel(self.models.blockmap).unit_bytes
        self.result = SweepResult(tasks=list(self.tasks), meta={
            "evaluator": self.ev_name,
            "model_factory": callable_name(model_factory) if model_factory is not None else None,
            "config": self.cfg.public_dict(), "unit_bytes": unit_bytes, "max_units": len(self.tasks),
            "task_specific_bytes": self.models.task_specific_bytes()})
        self._given_ft = finetuned

    # ---- evaluation ------------------------------------------------------------------------
    def _module(self, task: str):
        if task not in self.modules:
            try:
                module = self.factory(task)
            except Exception as exc:
                raise _EvalFailure(f"model_factory '{callable_name(self.factory)}'", task,
                                   "building the model", exc) from exc
            if not hasattr(module, "load_state_dict"):
                raise FlexMergeError(f"model_factory '{callable_name(self.factory)}' returned a "
                                     f"{type(module).__name__} for task '{task}', not a torch.nn.Module")
            self.modules[task] = module
        return self.modules[task]

    def _call(self, task: str, sd: Mapping, where: str) -> float:
        obj: Any = sd
        if self.factory is not None:
            module = self._module(task)
            try:
                res = module.load_state_dict(dict(sd), strict=False)
            except Exception as exc:
                raise _EvalFailure(f"model_factory '{callable_name(self.factory)}'", task,
                                   f"{where}: loading the state dict", exc) from exc
            if res.unexpected_keys:
                raise FlexMergeError(f"model_factory '{callable_name(self.factory)}': the module for task "
                                     f"'{task}' has no parameters {sorted(res.unexpected_keys)[:5]} that the "
                                     "checkpoint has; return the task's own architecture")
            if res.missing_keys:
                note = (f"task {task}: the model_factory module has parameters the checkpoint lacks "
                        f"({', '.join(sorted(res.missing_keys)[:5])}); they keep the module's values")
                if note not in self.result.notes:
                    self.result.notes.append(note)
            obj = module
        try:
            value = self.evaluator(task, obj)
        except Exception as exc:
            raise _EvalFailure(f"evaluator '{self.ev_name}'", task, where, exc) from exc
        self.evaluations += 1
        try:
            return score_value(value, f"evaluator '{self.ev_name}'", task, where)
        except FlexMergeError as exc:
            raise _BadScore(str(exc)) from None

    def _evaluate_all(self, make_state_dict: Callable[[str], Mapping], where: str) -> dict[str, float]:
        return {t: self._call(t, make_state_dict(t), where) for t in self.tasks}

    # ---- references ------------------------------------------------------------------------
    def references(self, zero_shot) -> None:
        m = self.models
        if self._given_ft is not None:
            missing = [t for t in self.tasks if t not in self._given_ft]
            if missing:
                raise FlexMergeError(f"finetuned scores lack tasks {missing}; give a score for every task")
            ft = {t: score_value(self._given_ft[t], "finetuned scores", t, "given") for t in self.tasks}
        else:
            ft = self._evaluate_all(lambda t: {n: m.tasks[t].get(n) for n in m.tasks[t].names()},
                                    "fine-tuned checkpoint")
        self.result.finetuned = ft
        self._reference_row("fine-tuned", ft, len(self.tasks), evaluated=self._given_ft is None)
        zs = None
        if isinstance(zero_shot, Mapping):
            missing = [t for t in self.tasks if t not in zero_shot]
            if missing:
                raise FlexMergeError(f"zero_shot scores lack tasks {missing}; give a score for every task")
            zs = {t: score_value(zero_shot[t], "zero_shot scores", t, "given") for t in self.tasks}
        elif zero_shot:
            zs = self._evaluate_all(self._zero_shot_state_dict, "zero-shot")
        self.result.zero_shot = zs
        if zs is not None:
            self._reference_row("zero-shot", zs, 1, evaluated=not isinstance(zero_shot, Mapping))
        self.save()

    def _zero_shot_state_dict(self, task: str) -> dict:
        """Pretrained weights for every merged tensor, the task's own task-specific tensors."""
        m = self.models
        own = set(m.task_specific.get(task, []))
        src = m.tasks[task]
        return {n: (src.get(n) if n in own else m.base.get(m.aliases.get(n, n))) for n in src.names()}

    def _reference_row(self, name: str, scores: dict, units: int, evaluated: bool) -> None:
        unit = self.result.meta["unit_bytes"]
        self._add_row(run="reference", method=name, params={}, order=None, linkage=None, seed=None,
                      requested=None, units=float(units), nbytes=units * unit, steps=None, scores=scores,
                      evaluated=evaluated, note="")

    def _add_row(self, *, run, method, params, order, linkage, seed, requested, units, nbytes, steps,
                 scores, evaluated, note) -> dict:
        ft = self.result.finetuned
        norm_scores = {t: (scores[t] / ft[t] if ft.get(t) is not None and ft[t] > 0 and math.isfinite(ft[t])
                           else None) for t in self.tasks}
        normalized = None if any(v is None for v in norm_scores.values()) else _mean(norm_scores.values())
        if normalized is None and ft:
            note_ = ("normalized scores need positive fine-tuned scores; tasks "
                     f"{[t for t in self.tasks if norm_scores[t] is None]} have none")
            if note_ not in self.result.notes:
                self.result.notes.append(note_)
        row = {"run": run, "method": method, "params": params, "order": order, "linkage": linkage,
               "seed": seed, "requested_size": requested, "size_units": float(units), "size_bytes": int(nbytes),
               "steps": steps, "scores": dict(scores), "average": _mean(scores.values()),
               "normalized": normalized, "normalized_scores": norm_scores, "evaluated": bool(evaluated),
               "note": note}
        self.result.rows.append(row)
        return row

    def save(self) -> None:
        self.result.meta["evaluations"] = self.evaluations
        if self.out is not None:
            self.result.write(self.out)

    # ---- merged models ---------------------------------------------------------------------
    def grouping_key(self, method_key: str, blockmap, grouping) -> str:
        n = len(self.tasks)
        if all(len(groups) == n for groups in grouping.groups.values()):
            return "original"  # every task keeps its own checkpoint: the fine-tuned scores
        per_tensor = sorted((p, repr(grouping.groups[b.name])) for b in blockmap.blocks for p in b.params)
        h = hashlib.sha256(method_key.encode())
        for p, g in per_tensor:  # by tensor, so block granularity does not matter
            h.update(p.encode() + b"\x1f" + g.encode() + b"\x1e")
        return h.hexdigest()

    def run(self, *, fm, grouping, plan, method_name, params, run, order, linkage, seed, requested,
            note="") -> dict:
        method_key = json.dumps([fm.method.describe(), fm.method.seed if fm.method.randomized else None],
                                sort_keys=True, default=str)
        key = self.grouping_key(method_key, fm.blockmap, grouping)
        size = f"{grouping.size_units:.4g} units"
        where = f"{method_name} at {size}"
        if run != "main":
            where += f" ({run} ablation: order {order}, linkage {linkage}" + \
                (f", seed {seed})" if seed is not None else ")")
        if key == "original":
            scores, evaluated = dict(self.result.finetuned), False
        elif key in self.cache:
            scores, evaluated = self.cache[key], False
        else:
            bundle = fm.merge(grouping=grouping, plan=plan)
            scores = self._evaluate_all(bundle.state_dict, where)
            del bundle
            self.cache[key] = scores
            evaluated = True
        row = self._add_row(run=run, method=method_name, params=params, order=order, linkage=linkage,
                            seed=seed, requested=requested, units=grouping.size_units,
                            nbytes=grouping.size_bytes, steps=grouping.steps, scores=scores,
                            evaluated=evaluated, note=note)
        norm = row["normalized"]
        self.log(f"{where}: average {row['average']:.4f}"
                 + (f", normalized {norm:.4f}" if norm is not None else "")
                 + ("" if evaluated else " (reused)"))
        self.save()
        return row


def sweep(config: Any, methods: Sequence[Any] | str | None, sizes: Sequence[float | str] | str,
          evaluator: Evaluator, *, model_factory: Callable[[str], Any] | None = None,
          orders: Sequence[str] | str | None = None, linkages: Sequence[str] | str | None = None,
          seeds: Sequence[int] = (0, 1, 2), ablation_methods: Sequence[Any] | None = None,
          finetuned: Mapping[str, float] | None = None, zero_shot: bool | Mapping[str, float] = False,
          out: str | os.PathLike | None = None, plots: bool = True, ylabel: str = "score",
          log: Callable[[str], None] | None = None, progress: bool = False,
          evaluator_name: str | None = None) -> SweepResult:
    """Evaluate every method at every size (and the ablation runs); return the table.

    ``config``: merge config (YAML path, dict or MergeConfig). ``methods``: names, ``{name, **params}``
    mappings, :class:`~flexmerge.methods.MergeMethod` instances or ``"channel_merging"`` (a
    comma-separated string also works; ``None`` = the config's method). ``sizes``: model units
    (``[1, 1.5, 2]`` or ``"1,1.5,2"``; byte strings such as ``"40MB"`` work for plan methods).
    ``evaluator`` / ``model_factory``: see the module docstring. ``orders`` / ``linkages``: extra
    runs for the paper's ablations (Sec. 5.3, Fig. 6: orders at the config's linkage, linkages at
    the config's order; ``random`` once per seed in ``seeds``) of ``ablation_methods`` (default: the
    first method). ``finetuned``: known fine-tuned scores per task (skips evaluating the
    checkpoints); ``zero_shot``: ``True`` to evaluate the pretrained weights + each task's own
    task-specific tensors, or known scores per task. ``out``: directory for ``curve.csv``,
    ``curve.json`` and (``plots=True``) the PNG plots. ``log``: called with one line per result.
    ``evaluator_name``: how messages and the table name the evaluator (default ``module:qualname``).
    """
    from ..engine import FlexMerge

    t0 = time.perf_counter()
    size_list = parse_sizes(sizes)
    order_list = parse_list(orders, ORDERS, "order")
    linkage_list = parse_list(linkages, LINKAGES, "linkage")
    seed_list = _parse_seeds(seeds)
    if "random" in order_list and not seed_list:
        raise FlexMergeError("order 'random' needs at least one seed; pass e.g. --seeds 0,1,2")
    st = _Sweep(config, evaluator, model_factory, finetuned, zero_shot, out, log, progress)
    if evaluator_name:
        st.ev_name = st.result.meta["evaluator"] = evaluator_name
    cfg = st.cfg
    if methods is None:
        method_specs: list[Any] = [cfg.method]
    elif isinstance(methods, str):
        method_specs = [m.strip() for m in methods.split(",") if m.strip()]
    else:
        method_specs = list(methods)
    if not method_specs:
        raise FlexMergeError("no methods given; pass e.g. --methods task_arithmetic,ties")
    names = [_method_name(m) for m in method_specs]
    _check_methods(method_specs, cfg.seed)  # bad names or parameters fail before any evaluation
    ablate = order_list or linkage_list
    if ablation_methods is None:
        ablation_specs = [method_specs[0]] if ablate else []
    else:
        ablation_specs = list(ablation_methods) if ablate else []
    jobs: list[tuple[Any, bool, bool]] = [(spec, True, False) for spec in method_specs]
    for spec in ablation_specs:
        name = _method_name(spec)
        if name == CHANNEL_MERGING:
            raise FlexMergeError("channel_merging has no merge plan, so it has no order/linkage ablation; "
                                 "choose another ablation method")
        if name in names:
            i = names.index(name)
            jobs[i] = (jobs[i][0], True, True)
        else:
            jobs.append((spec, False, True))
    variants: list[tuple[str, str, str, int | None]] = []
    for o in order_list:
        for s in (seed_list if o == "random" else [None]):
            variants.append(("order", o, cfg.linkage, s))
    for lk in linkage_list:
        variants.append(("linkage", cfg.order, lk, cfg.seed if cfg.order == "random" else None))
    st.result.meta.update({"methods": [m if isinstance(m, (str, dict)) else _method_name(m) for m in method_specs],
                           "sizes": size_list, "orders": order_list, "linkages": linkage_list,
                           "seeds": seed_list, "ablation_methods": [_method_name(m) for m in ablation_specs]})
    try:
        st.references(zero_shot)
        shared_grams = None
        for spec, main, ablation in jobs:
            name = _method_name(spec)
            if name == CHANNEL_MERGING:
                _channel_merging(st, spec, size_list)
                continue
            fm = FlexMerge(cfg, method=spec, progress=progress)
            params = {k: v for k, v in fm.method.describe().items() if k != "name"}
            grams = shared_grams if not fm.method.transforms else None
            plan = fm.plan(grams=grams)
            if not fm.method.transforms and shared_grams is None:
                shared_grams = plan.grams
            extra = fm.method.stores_masks or fm.method.stores_scalars
            runs: list[tuple[str, str, str, int | None]] = []
            if main:
                runs.append(("main", cfg.order, cfg.linkage, cfg.seed if cfg.order == "random" else None))
            if ablation:
                runs += variants
            plans: dict[tuple, Any] = {(cfg.order, cfg.linkage, cfg.seed if cfg.order == "random" else None): plan}
            for run, order, linkage, seed in runs:
                pkey = (order, linkage, seed)
                if pkey not in plans:
                    plans[pkey] = fm.plan(order=order, linkage=linkage, seed=cfg.seed if seed is None else seed)
                p = plans[pkey]
                fm.cache_groups(True)  # the sizes of one plan share most groups: merge each once
                done: set[int] = set()
                for size in size_list:
                    try:
                        grouping = p.at(size)  # the plan's fit rule (prefix or fill)
                    except FlexMergeError as exc:
                        note = f"{name}: size {size} skipped ({exc})"
                        if note not in st.result.notes:
                            st.result.notes.append(note)
                        st.log(note)
                        continue
                    done.add(grouping.steps)
                    st.run(fm=fm, grouping=grouping, plan=p, method_name=name, params=params,
                           run=run, order=order, linkage=linkage, seed=seed, requested=size)
                if extra and len(p.steps) not in done:
                    st.run(fm=fm, grouping=p.grouping(len(p.steps)), plan=p, method_name=name,
                           params=params, run=run, order=order, linkage=linkage, seed=seed,
                           requested="min", note="the method's minimum size")
                fm.cache_groups(False)
        st.result.complete = True
    except _EvalFailure as exc:
        st.save()
        where = (f"; the partial table ({len(st.result.rows)} rows) is in {Path(out) / CSV_NAME}" if out is not None
                 else "; the partial table is attached to this error as .partial")
        err = FlexMergeError(exc.message + where)
        err.partial = st.result  # type: ignore[attr-defined]
        raise err from exc.exc
    except BaseException:
        st.save()
        raise
    st.result.meta["seconds"] = round(time.perf_counter() - t0, 3)
    st.save()
    if out is not None and plots:
        from ..plots import plot_all

        plot_all(st.result, out, ylabel=ylabel)
    return st.result


def _channel_merging(st: _Sweep, spec: Any, sizes: list) -> None:
    from ..baselines.channel_merging import ChannelMerging, integer_size

    params = dict(spec) if isinstance(spec, Mapping) else {}
    params.pop("name", None)
    lam = params.pop("lambda", params.pop("lam", None))
    max_iters = params.pop("max_iters", 100)
    if params:
        raise FlexMergeError(f"channel_merging: unknown parameters {sorted(params)} (allowed: lambda, max_iters)")
    cm = ChannelMerging(st.cfg, lam=lam, max_iters=max_iters, progress=st.progress)
    desc = {k: v for k, v in cm.describe().items() if k != "name"}
    for size in sizes:
        try:
            integer_size(size, cm.num_tasks)
        except FlexMergeError as exc:
            note = f"{CHANNEL_MERGING}: size {size} skipped ({exc})"
            if note not in st.result.notes:
                st.result.notes.append(note)
            st.log(note)
            continue
        st.run(fm=cm.fm, grouping=cm.grouping(size), plan=None, method_name=CHANNEL_MERGING, params=desc,
               run="main", order=None, linkage=None, seed=None, requested=size)
