"""``flexmerge curve``: accuracy-size curves of a user's own models.

    flexmerge curve merge.yaml --sizes 1,1.5,2,4 --methods task_arithmetic,ties \\
        --evaluator my_module:evaluate -o curve/

``--ray`` runs the evaluator calls as Ray tasks (:mod:`flexmerge.evaluate.distributed`); a rerun
into the same ``-o`` continues an interrupted sweep (``--no-resume`` starts afresh;
:mod:`flexmerge.evaluate.resume`).

Thin: it parses, imports the evaluator (``module:function`` with the module importable or in the
current directory, or ``path/to/file.py:function``), calls :func:`flexmerge.evaluate.sweep`,
which writes ``curve.csv``, ``curve.json`` and the PNG plots, and prints the table. Registered in
:mod:`flexmerge.cli` with ``app.command()(curve)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import FlexMergeError


def _method_specs(methods: Optional[str], sets: Optional[List[str]]) -> Optional[list]:
    """``--methods a,b`` plus ``--set [METHOD.]KEY=VALUE`` -> method specs for the sweep.

    ``KEY=VALUE`` goes to every listed method that has parameter KEY (an error if none has it);
    ``METHOD.KEY=VALUE`` to that method only.
    """
    from .config import parse_assignments
    from .evaluate import CHANNEL_MERGING
    from .methods import method_class

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    if methods is not None and not names:
        raise FlexMergeError(f"--methods {methods!r} names no method; give e.g. --methods task_arithmetic,ties")
    twice = sorted({n for n in names or [] if names.count(n) > 1})
    if twice:
        raise FlexMergeError(f"--methods lists {', '.join(twice)} more than once; give each method once")
    if not sets:
        return names
    if names is None:
        raise FlexMergeError("--set needs --methods (which methods the parameters are for)")
    specs = {n: {"name": n} for n in names}
    for item in sets:
        key, sep, value = item.partition("=")
        target, dot, param = key.strip().rpartition(".")
        assigned = parse_assignments([f"{param}={value}"]) if sep else parse_assignments([item])
        if dot:
            if target not in specs:
                raise FlexMergeError(f"--set {item}: method '{target}' is not in --methods ({', '.join(names)})")
            specs[target].update(assigned)
            continue
        takers = []
        for n in names:
            if n == CHANNEL_MERGING:
                allowed = {"lambda", "max_iters"}
            else:
                fields = method_class(n).Params.model_fields
                allowed = {f.alias or k for k, f in fields.items()} | set(fields)
            if param in allowed:
                specs[n].update(assigned)
                takers.append(n)
        if not takers:
            raise FlexMergeError(f"--set {item}: none of the methods {', '.join(names)} has a parameter "
                                 f"'{param}'; see 'flexmerge methods'")
    return [specs[n] if len(specs[n]) > 1 else n for n in names]


def curve(config: Path = typer.Argument(..., help="merge config (YAML): base, tasks, exclude, blocks..."),
          sizes: str = typer.Option("1,1.5,2,4", "--sizes", "-s",
                                    help="comma-separated sizes in model units (a mask method also "
                                         "runs at its own minimum)"),
          methods: Optional[str] = typer.Option(None, "--methods", "-m",
                                                help="comma-separated methods, e.g. task_arithmetic,ties,"
                                                     "channel_merging (default: the config's method)"),
          evaluator: str = typer.Option(..., "--evaluator", "-e",
                                        help="module:function or path/to/file.py:function; called as "
                                             "f(task_name, state_dict) -> score (higher is better)"),
          output: Path = typer.Option(Path("curve"), "-o", "--output",
                                      help="directory for curve.csv, curve.json and the plots"),
          orders: Optional[str] = typer.Option(None, "--orders",
                                               help="ablation: greedy,left-right,right-left,random"),
          linkages: Optional[str] = typer.Option(None, "--linkages", help="ablation: min,max,avg"),
          seeds: str = typer.Option("0,1,2", "--seeds", help="seeds of the 'random' order"),
          ablation_method: Optional[str] = typer.Option(None, "--ablation-method",
                                                        help="method of the ablation runs (default: the first)"),
          set_: Optional[List[str]] = typer.Option(None, "--set",
                                                   help="method parameter [METHOD.]KEY=VALUE, repeatable"),
          model_factory: Optional[str] = typer.Option(None, "--model-factory",
                                                      help="module:function returning a torch module per "
                                                           "task; the evaluator then gets the module"),
          zero_shot: bool = typer.Option(True, "--zero-shot/--no-zero-shot",
                                         help="also evaluate the pretrained weights (+ each task's own heads)"),
          ylabel: str = typer.Option("score", "--metric", help="name of the score in plots (e.g. accuracy)"),
          plots: bool = typer.Option(True, "--plots/--no-plots", help="write PNG plots"),
          progress: bool = typer.Option(True, "--progress/--no-progress", help="progress output on stderr"),
          planner: Optional[str] = typer.Option(None, "--planner",
                                                help="distortion (default) | similarity (the paper's greedy) | hybrid | auto "
                                                     "(overrides the config's 'planner')"),
          calibrate: Optional[str] = typer.Option(None, "--calibrate",
                                                  help="validation evaluator (module:function or file.py:function, "
                                                       "scoring held-out validation examples, never test ones): "
                                                       "also choose the planner and the method's scale per size "
                                                       "by validation score ('calibrated' rows)"),
          budget: Optional[int] = typer.Option(None, "--budget", min=1,
                                               help="evaluator calls per method for --calibrate (default: "
                                                    "N x (1 + 6 x sizes))"),
          recalibrate_bn: Optional[str] = typer.Option(None, "--recalibrate-bn",
                                                       help="a data directory (one folder of unlabeled images or "
                                                            "tensors per task) or module:function / "
                                                            "file.py:function, batches(task) -> "
                                                            "iterable of unlabeled input batches: re-estimate "
                                                            "BatchNorm statistics of every merged model (needs "
                                                            "--model-factory)"),
          resume: bool = typer.Option(True, "--resume/--no-resume",
                                      help="reuse the finished rows of the curve.json already in -o that the "
                                           "same setting (config, checkpoints, evaluator, method and its "
                                           "parameters, size, order/linkage/seed) produced, so an interrupted "
                                           "sweep continues; --no-resume evaluates every row again"),
          ray: bool = typer.Option(False, "--ray",
                                   help="run the evaluator calls as Ray tasks, one CPU each, on a local Ray "
                                        "cluster started (and shut down) for this sweep; needs "
                                        "the ray extra: pip install -e \".\\[ray]\""),
          ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                    help="join the Ray cluster at this address (e.g. auto, "
                                                         "ray://host:10001) instead of starting one; implies "
                                                         "--ray. The evaluator's module must be importable "
                                                         "on the cluster's nodes")):
    """Accuracy-size curves: evaluate merge methods at several sizes with your own evaluator."""
    from rich.console import Console
    from rich.markup import escape

    from .evaluate import load_callable, sweep

    out = Console(width=None if sys.stdout.isatty() else 200)  # a pipe or file gets whole rows
    err = Console(stderr=True, highlight=False)
    if ray or ray_address is not None:
        from .evaluate.distributed import import_ray

        import_ray()  # not installed: one line, exit 2, before importing the user's code
    ev = load_callable(evaluator, "evaluator")
    factory = load_callable(model_factory, "model factory") if model_factory else None
    if budget is not None and calibrate is None:
        raise FlexMergeError("--budget is the number of evaluator calls of --calibrate; give --calibrate too")
    validation = load_callable(calibrate, "validation evaluator") if calibrate else None
    recal = None
    if recalibrate_bn is not None:
        from .recalibrate import Recalibration

        if factory is None:
            raise FlexMergeError("--recalibrate-bn needs --model-factory (the model the batches run through)")
        from .config import load_config
        from .recalibration_data import recalibration_batches

        tasks = list(load_config(config).tasks)
        recal = Recalibration(recalibration_batches(recalibrate_bn, tasks), factory)
    specs = _method_specs(methods, set_)
    ablation = None
    if ablation_method:
        ablation = [ablation_method.strip()]
        if specs is not None:
            for s in specs:
                if (s if isinstance(s, str) else s["name"]) == ablation[0]:
                    ablation = [s]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise FlexMergeError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    if planner is not None:
        from .config import load_config

        config = load_config(config, {"planner": planner})
    result = sweep(config, specs, sizes, ev, model_factory=factory, orders=orders, linkages=linkages,
                   seeds=seed_list, ablation_methods=ablation,
                   zero_shot=zero_shot, out=output, plots=plots, ylabel=ylabel,
                   log=(lambda msg: err.print(msg, markup=False)) if progress else None, progress=progress,
                   evaluator_name=evaluator, validation_evaluator=validation, calibration_budget=budget,
                   validation_evaluator_name=calibrate,
                   recalibrate=recal, resume=resume, ray=ray, ray_address=ray_address)
    out.print(result.rich_table(title=escape(f"{ylabel} vs size ({len(result.tasks)} tasks, evaluator "
                                             f"{result.meta['evaluator']})"), width=out.width))
    for note in result.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    files = sorted(p.name for p in Path(output).iterdir() if p.suffix in (".csv", ".json", ".png"))
    out.print(f"wrote {', '.join(files)} to {output}", markup=False, highlight=False)
