"""The sweep: every method at every size (and the ablation runs) through a user evaluator, each
distinct merged model evaluated once (see :mod:`flexmerge.evaluate`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import FlexMergeError
from .arguments import (CHANNEL_MERGING, LINKAGES, ORDERS, _check_methods, _method_name, _parse_seeds,
                        parse_list, parse_sizes)
from .session import Evaluator, Session, _EvalFailure
from .table import CSV_NAME, SweepResult, check_out
from .user_code import callable_name


def sweep(config: Any, methods: Sequence[Any] | str | None, sizes: Sequence[float | str] | str,
          evaluator: Evaluator, *, model_factory: Callable[[str], Any] | None = None,
          orders: Sequence[str] | str | None = None, linkages: Sequence[str] | str | None = None,
          seeds: Sequence[int] = (0, 1, 2), ablation_methods: Sequence[Any] | None = None,
          finetuned: Mapping[str, float] | None = None, zero_shot: bool | Mapping[str, float] = False,
          out: str | os.PathLike | None = None, plots: bool = True, ylabel: str = "score",
          log: Callable[[str], None] | None = None, progress: bool = False,
          evaluator_name: str | None = None, validation_evaluator: Evaluator | None = None,
          calibration_budget: int | None = None, validation_evaluator_name: str | None = None,
          recalibrate: Any = None, resume: bool = True, ray: bool = False, ray_address: str | None = None,
          ray_options: Mapping[str, Any] | None = None) -> SweepResult:
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
    ``validation_evaluator`` / ``calibration_budget``: also calibrate each method per size on
    validation data within that many evaluator calls per method (``None``: the default of
    :func:`~flexmerge.evaluate.calibrate.check_budget`) and evaluate the choices as ``calibrated``
    rows (:mod:`flexmerge.evaluate.calibrate`); ``validation_evaluator_name`` names it in messages. ``recalibrate``: a
    :class:`~flexmerge.recalibrate.Recalibration`: every merged model's BatchNorm statistics are
    re-estimated on data before it is evaluated (not the fine-tuned references, nor ``calibrated`` rows).
    ``resume``: reuse the finished rows of the table already in ``out`` that come from the same
    setting (an interrupted sweep continues where it stopped; :mod:`flexmerge.evaluate.resume`);
    ``False`` evaluates every row again. ``ray`` / ``ray_address``: run the evaluator calls as Ray
    tasks (:mod:`flexmerge.evaluate.distributed`; the Ray session already initialised in this
    process, else the cluster at ``ray_address``, else a local one started and shut down here);
    ``ray_options``: extra ``.options()`` of each call, e.g. ``{"num_gpus": 1}``, or
    ``{"max_retries": 0}`` (a call whose worker dies is retried 3 times by default).
    """
    from ..engine import FlexMerge

    t0 = time.perf_counter()
    size_list = parse_sizes(sizes)
    order_list = parse_list(orders, ORDERS, "order")
    linkage_list = parse_list(linkages, LINKAGES, "linkage")
    seed_list = _parse_seeds(seeds)
    if "random" in order_list and not seed_list:
        raise FlexMergeError("order 'random' needs at least one seed; pass e.g. --seeds 0,1,2")
    use_ray = bool(ray) or ray_address is not None
    if use_ray:
        from .distributed import import_ray

        import_ray()  # not installed: one line naming the extra, before any work
    if out is not None:
        check_out(out)  # a curve.csv/curve.json of the user's own: refuse before any evaluation
    st = Session(config, evaluator, model_factory, finetuned, zero_shot, out, log, progress)
    if validation_evaluator is not None:
        from .calibrate import check_budget

        if validation_evaluator is evaluator:
            raise FlexMergeError("the validation evaluator is the test evaluator; give one that scores "
                                 "held-out validation examples, never the test examples")
        if not callable(validation_evaluator):
            raise FlexMergeError(f"validation evaluator must be a callable (task_name, state_dict) -> float, "
                                 f"got {type(validation_evaluator).__name__}")
        check_budget(calibration_budget, len(st.tasks), len(size_list))
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
    if recalibrate is not None:  # the merged rows' BatchNorm statistics come from these callables
        st.result.meta["recalibrate"] = {"batches": callable_name(recalibrate.batches),
                                         "model_factory": callable_name(recalibrate.model_factory)}
    st.result.meta.update({"methods": [m if isinstance(m, (str, dict)) else _method_name(m) for m in method_specs],
                           "sizes": size_list, "orders": order_list, "linkages": linkage_list,
                           "seeds": seed_list, "ablation_methods": [_method_name(m) for m in ablation_specs]})
    st.resume(resume, recalibrate)
    opened: list = []  # every job's FlexMerge, closed (open checkpoint files) when the sweep ends
    if use_ray:
        from .distributed import RayExecutor

        st.executor = RayExecutor(address=ray_address, options=ray_options, log=st.log)
        st.executor.start(evaluator, st.ev_name, model_factory, len(st.tasks))
        st.result.meta["ray"] = st.executor.describe()
    try:
        st.references(zero_shot)
        shared_grams = None
        for spec, main, ablation in jobs:
            name = _method_name(spec)
            if name == CHANNEL_MERGING:
                _channel_merging(st, spec, size_list, recalibrate)
                continue
            fm = FlexMerge(cfg, method=spec, progress=progress, recalibrate=recalibrate)
            opened.append(fm)
            params = {k: v for k, v in fm.method.describe().items() if k != "name"}
            grams = shared_grams if not fm.method.has_transform else None
            plan = fm.plan(grams=grams)
            if not fm.method.has_transform and shared_grams is None:
                shared_grams = plan.grams
            extra = fm.method.stores_masks or fm.method.stores_scalars
            runs: list[tuple[str, str, str, int | None]] = []
            if main:
                runs.append(("main", cfg.order, cfg.linkage, cfg.seed if cfg.order == "random" else None))
            if ablation:
                runs += variants
            plans: dict[tuple, Any] = {
                (cfg.order, cfg.linkage, cfg.seed if cfg.order == "random" else None, cfg.planner): plan}
            for run, order, linkage, seed in runs:
                # the ablations are the paper's (Sec. 5.3): orders and linkages of the similarity planner
                planner = cfg.planner if run == "main" else "similarity"
                pkey = (order, linkage, seed, planner)
                if pkey not in plans:
                    plans[pkey] = fm.plan(order=order, linkage=linkage, seed=cfg.seed if seed is None else seed,
                                          planner=planner)
                p = plans[pkey]
                fm.cache_groups(True)  # the sizes of one plan share most groups: merge each once
                done: set[int] = set()
                for size in size_list:
                    try:
                        grouping = p.at(size)  # the plan's fit rule (prefix or fill)
                    except FlexMergeError as exc:
                        st.note(f"{name}: size {size} skipped ({exc})")
                        continue
                    done.add(grouping.steps)
                    st.run(fm=fm, grouping=grouping, plan=p, method_name=name, params=params,
                           run=run, order=order, linkage=linkage, seed=seed, requested=size)
                if extra and len(p.steps) not in done:
                    st.run(fm=fm, grouping=p.grouping(len(p.steps)), plan=p, method_name=name,
                           params=params, run=run, order=order, linkage=linkage, seed=seed,
                           requested="min", note="the method's minimum size")
                fm.cache_groups(False)
            if main and validation_evaluator is not None:
                from .calibrate import calibrated_runs

                calibrated_runs(st, spec, size_list, validation_evaluator, calibration_budget,
                                model_factory=model_factory, progress=progress,
                                evaluator_name=validation_evaluator_name)
        st.flush()
        st.result.complete = True
    except _EvalFailure as exc:
        st.save()
        where = (f"; the partial table ({len(st.result.rows)} rows) is in {Path(out) / CSV_NAME} (rerun the sweep "
                 "to continue from it)" if out is not None
                 else "; the partial table is attached to this error as .partial")
        err = FlexMergeError(exc.message + where)
        err.partial = st.result  # type: ignore[attr-defined]
        raise err from exc.exc
    except BaseException:
        st.save()
        raise
    finally:
        if st.executor is not None:
            st.executor.close()
        for job in opened:
            job.close()
    if st.prior or st.reused:
        st.log(f"resumed: {st.reused} rows reused from the previous table, {st.evaluations} evaluator calls made")
    st.result.meta["seconds"] = round(time.perf_counter() - t0, 3)
    st.save()
    if out is not None and plots:
        from ..plots import plot_all

        plot_all(st.result, out, ylabel=ylabel)
    return st.result


def _channel_merging(st: Session, spec: Any, sizes: list, recalibrate: Any = None) -> None:
    from ..baselines.channel_merging import ChannelMerging, integer_size

    params = dict(spec) if isinstance(spec, Mapping) else {}
    params.pop("name", None)
    lam = params.pop("lambda", params.pop("lam", None))
    max_iters = params.pop("max_iters", 100)
    if params:
        raise FlexMergeError(f"channel_merging: unknown parameters {sorted(params)} (allowed: lambda, max_iters)")
    cm = ChannelMerging(st.cfg, lam=lam, max_iters=max_iters, progress=st.progress)
    cm.fm.recalibration = recalibrate
    desc = {k: v for k, v in cm.describe().items() if k != "name"}
    for size in sizes:
        try:
            integer_size(size, cm.num_tasks)
        except FlexMergeError as exc:
            st.note(f"{CHANNEL_MERGING}: size {size} skipped ({exc})")
            continue
        st.run(fm=cm.fm, grouping=cm.grouping(size), plan=None, method_name=CHANNEL_MERGING, params=desc,
               run="main", order=None, linkage=None, seed=None, requested=size)
