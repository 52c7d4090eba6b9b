"""The ``flexmerge`` command: thin, it parses, calls the library and prints.

Every bad input ends as one line ``error: ...`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import FlexMergeError, Terminated
from .outputs import check_target, json_format_of


def _click_classes(name: str) -> tuple:
    """The click exception class ``name`` from click and from typer's vendored copy, if any."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None:
            found.append(cls)
    return tuple(found)


UsageError, Abort, ClickExit, NoArgsIsHelp = (_click_classes(n) for n in ("UsageError", "Abort", "Exit",
                                                                           "NoArgsIsHelpError"))

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-free model merging at any size (FlexMerge, Dhasade et al., ICLR 2026).")
out = Console()

ConfigArg = typer.Argument(None, help="merge config (YAML); keys can be overridden by the options")
BaseOpt = typer.Option(None, "--base", help="pretrained checkpoint (overrides 'base')")
TaskOpt = typer.Option(None, "--task", "-t", help="NAME=PATH, repeatable (overrides 'tasks')")
ExcludeOpt = typer.Option(None, "--exclude", help="regex of task-specific parameters, repeatable")
BlocksOpt = typer.Option(None, "--blocks", help="component | layer | tensor | model")
MethodOpt = typer.Option(None, "--method", "-m", help="merge method (see 'flexmerge methods')")
SetOpt = typer.Option(None, "--set", help="method parameter KEY=VALUE, repeatable (e.g. lambda=1.5)")
LinkageOpt = typer.Option(None, "--linkage", help="min | max | avg")
OrderOpt = typer.Option(None, "--order", help="greedy | left-right | right-left | random")
SeedOpt = typer.Option(None, "--seed", help="random seed")
PlannerOpt = typer.Option(None, "--planner", help="distortion (default) | similarity (the paper's greedy) | hybrid | auto")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="progress bars on a terminal")
ForceOpt = typer.Option(False, "--force", help="replace an existing output even if flexmerge did not make it")
MaxShardOpt = typer.Option("5GB", "--max-shard-size", help="HF outputs: largest weights file, e.g. 500MB, 5GB or bytes; "
                                                           "larger weights are sharded with an index json")


def _job(config, base, task, exclude, blocks, method, sets, linkage, order, seed, progress, planner=None):
    from .adapters import open_job  # FlexMerge, or AdapterMerge when the tasks are PEFT adapter directories
    from .config import parse_assignments

    overrides = {"base": base, "exclude": exclude or None, "blocks": blocks, "linkage": linkage,
                 "order": order, "seed": seed, "planner": planner}
    if task:
        pairs = {}
        for item in task:
            name, sep, path = item.partition("=")
            if not sep:
                raise FlexMergeError(f"--task expects NAME=PATH, got {item!r}")
            if name in pairs:
                raise FlexMergeError(f"--task: the name '{name}' is given twice ({pairs[name]!r} and "
                                     f"{path!r}); give every task a distinct name")
            pairs[name] = path
        overrides["tasks"] = pairs
    if config is None:
        if base is None or not task:
            raise FlexMergeError("give a config file, or --base and at least two --task NAME=PATH")
        data = {k: v for k, v in overrides.items() if v is not None}
        return open_job(data, method=method, method_params=parse_assignments(sets), progress=progress)
    return open_job(config, method=method, method_params=parse_assignments(sets), overrides=overrides,
                    progress=progress)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def blocks(config: Optional[Path] = ConfigArg, base: Optional[str] = BaseOpt,
           task: Optional[List[str]] = TaskOpt, exclude: Optional[List[str]] = ExcludeOpt,
           blocks: Optional[str] = BlocksOpt):
    """How the model is cut into blocks: block, tensors, parameters, share of the model."""
    fm = _job(config, base, task, exclude, blocks, None, None, None, None, None, False)
    table = Table(title=f"{len(fm.blockmap)} blocks, {len(fm.tasks)} tasks")
    for col in ("block", "tensors", "parameters", "bytes", "share"):
        table.add_column(col, justify="left" if col == "block" else "right")
    for row in fm.blocks_table():
        table.add_row(row["block"], str(row["tensors"]), f"{row['parameters']:,}", _fmt_bytes(row["bytes"]),
                      f"{100 * row['share']:.2f}%")
    out.print(table)
    spec = fm.models.task_specific_bytes()
    if any(spec.values()):
        out.print("task-specific (never merged): " + ", ".join(f"{t} {_fmt_bytes(b)}" for t, b in spec.items()))


@app.command()
def plan(config: Optional[Path] = ConfigArg, output: Path = typer.Option(..., "-o", "--output", help="plan.json to write"),
         base: Optional[str] = BaseOpt, task: Optional[List[str]] = TaskOpt,
         exclude: Optional[List[str]] = ExcludeOpt, blocks: Optional[str] = BlocksOpt,
         method: Optional[str] = MethodOpt, set_: Optional[List[str]] = SetOpt,
         linkage: Optional[str] = LinkageOpt, order: Optional[str] = OrderOpt,
         seed: Optional[int] = SeedOpt, progress: bool = ProgressOpt, force: bool = ForceOpt,
         planner: Optional[str] = PlannerOpt):
    """Plan every size from N model units down to the minimum (one streaming pass)."""
    fm = _job(config, base, task, exclude, blocks, method, set_, linkage, order, seed, progress, planner)
    check_target(output, what="plan file", replaceable=lambda q: json_format_of(q) == "flexmerge-plan",
                 force=force, hint="choose a new file name")
    p = fm.plan()
    p.save(output, force=force)
    out.print(f"plan: {len(p.steps)} merges over {len(p.blocks)} blocks, sizes {p.max_units:.4g} -> "
              f"{p.min_units:.4g} units ({_fmt_bytes(p.max_bytes)} -> {_fmt_bytes(p.min_bytes)}), "
              f"method {p.method['name']}, planner {p.planner}, linkage {p.linkage}, order {p.order}; wrote {output}")


@app.command()
def merge(config: Optional[Path] = ConfigArg,
          size: str = typer.Option(..., "--size", "-s", help="target size: model units (2.5) or bytes (40MB)"),
          output: Optional[Path] = typer.Option(None, "-o", "--output", help="bundle directory to write"),
          hf_out: Optional[Path] = typer.Option(
              None, "--hf-out", help="instead of a bundle, write the one merged model (all tasks share it, e.g. "
                                     "at --size 1 with a plain method) as an HF model directory"),
          max_shard_size: str = MaxShardOpt,
          plan_file: Optional[Path] = typer.Option(None, "--plan", help="reuse a plan.json"),
          base: Optional[str] = BaseOpt, task: Optional[List[str]] = TaskOpt,
          exclude: Optional[List[str]] = ExcludeOpt, blocks: Optional[str] = BlocksOpt,
          method: Optional[str] = MethodOpt, set_: Optional[List[str]] = SetOpt,
          linkage: Optional[str] = LinkageOpt, order: Optional[str] = OrderOpt,
          seed: Optional[int] = SeedOpt, progress: bool = ProgressOpt, force: bool = ForceOpt,
          planner: Optional[str] = PlannerOpt,
          dry_run: bool = typer.Option(False, "--dry-run", help="check the inputs and the size, print the "
                                                                "predicted peak memory, and stop before any "
                                                                "tensor is read"),
          recalibrate_bn: Optional[str] = typer.Option(
              None, "--recalibrate-bn", help="a data directory (one folder of unlabeled images or tensors per "
                                             "task) or module:function / file.py:function, batches(task) -> "
                                             "iterable of unlabeled input batches: re-estimate BatchNorm "
                                             "statistics after merging (needs --model-factory)"),
          model_factory: Optional[str] = typer.Option(
              None, "--model-factory", help="module:function or file.py:function, task -> torch module of the "
                                            "task's architecture (for --recalibrate-bn)")):
    """Merge to a target size and write a bundle (or, with --hf-out, the one merged model)."""
    from .bundle_format import is_bundle_dir
    from .plan import Plan

    if dry_run and output is None and hf_out is None:
        output = Path(".")  # not written: a dry run stops before any output
    elif (output is None) == (hf_out is None):
        raise FlexMergeError("give either -o DIR (a bundle) or --hf-out DIR (the one merged model as an HF "
                             "directory)")
    if hf_out is not None:
        from .export import _is_export_dir
        from .shards import parse_shard_size

        parse_shard_size(max_shard_size)
        check_target(hf_out, what="HF output", replaceable=_is_export_dir, force=force, hint="choose a new directory")
        if recalibrate_bn or model_factory:
            raise FlexMergeError("--recalibrate-bn is for bundles; drop it with --hf-out, or write a bundle with -o")
    elif not dry_run:
        check_target(output, what="output", replaceable=is_bundle_dir, force=force,
                     hint="choose a new or empty directory")
    fm = _job(config, base, task, exclude, blocks, method, set_, linkage, order, seed, progress, planner)
    recal = _recalibration(recalibrate_bn, model_factory, fm.tasks)
    if plan_file is not None:
        fm.use_plan(Plan.load(plan_file))
    target = fm.target_bytes(size)  # range check before any heavy work
    if dry_run:
        _dry_run(fm, size, target)
        return
    if hf_out is not None:
        from .merged_hf import write_merged_hf

        path, grouping = write_merged_hf(fm, size, hf_out, max_shard_size=max_shard_size, force=force)
        out.print(f"merged model: {grouping.size_units:.4g} units ({_fmt_bytes(grouping.size_bytes)}; requested "
                  f"{size}), one model for {len(fm.tasks)} tasks, method {fm.method.describe()['name']}; wrote "
                  f"HF directory {path}")
        return
    bundle = fm.merge(size, output, force=force, recalibrate=recal)
    done = bundle.manifest["plan"].get("recalibration")
    note = f"; BatchNorm statistics re-estimated on {min(done['examples'].values())}+ examples per task" if done else ""
    out.print(f"bundle: {bundle.size_units:.4g} units ({_fmt_bytes(bundle.size_bytes)}; requested {size}) for "
              f"{len(bundle.tasks)} tasks, method {bundle.method['name']}{note}; wrote {output}")


def _dry_run(fm, size: str, target: int) -> None:
    """What ``merge --dry-run`` prints: the inputs, the target and the predicted peak memory
    (:mod:`flexmerge.memory`), from tensor headers alone."""
    from .engine import FlexMerge
    from .memory import estimate

    if not isinstance(fm, FlexMerge):
        raise FlexMergeError("--dry-run predicts the memory of merging full checkpoints; these tasks are adapters, "
                             "whose merge holds one adapted module at a time")
    inputs = sum(p.stat().st_size for src in [fm.models.base, *fm.models.tasks.values()] for p in src.files())
    grouping = fm.known_grouping(size)
    est = estimate(fm, grouping, will_plan=grouping is None)
    out.print(f"dry run: {len(fm.tasks)} tasks + base, {_fmt_bytes(inputs)} of checkpoints, "
              f"{len(fm.blockmap)} blocks, method {fm.method.describe()['name']}; target {size} = "
              f"{_fmt_bytes(target)}" + ("" if grouping is not None else "; the plan pass (one read of every "
                                         "checkpoint) comes first"))
    for line in est.lines():
        out.print(line)


def _recalibration(batches: Optional[str], model_factory: Optional[str], tasks: list[str]):
    """``--recalibrate-bn`` and ``--model-factory`` -> a :class:`~flexmerge.recalibrate.Recalibration`
    (or None), the callables imported and a data directory checked before any heavy work."""
    if batches is None and model_factory is None:
        return None
    if batches is None or model_factory is None:
        raise FlexMergeError("--recalibrate-bn and --model-factory go together: the batches of unlabeled inputs "
                             "per task and the model they run through; give both")
    from .evaluate.user_code import load_callable
    from .recalibrate import Recalibration
    from .recalibration_data import recalibration_batches

    return Recalibration(recalibration_batches(batches, tasks), load_callable(model_factory, "model factory"))


@app.command()
def inspect(bundle_dir: Path = typer.Argument(..., help="a bundle directory"),
            as_json: bool = typer.Option(False, "--json", help="print JSON"),
            verify: bool = typer.Option(False, "--verify", help="also check every file's sha256 (reads the whole bundle)")):
    """Sizes, groups per block and method of a bundle (the manifest is always checked)."""
    from .bundle import Bundle

    b = Bundle.load(bundle_dir)
    if verify:
        b.verify()
    s = b.summary()
    if as_json:
        print(json.dumps(s, indent=1))
        return
    from .methods.base import method_text

    size = s["size"]
    out.print(f"{bundle_dir}: {size['units']:.4g} of {size['max_units']} units, {_fmt_bytes(size['bytes'])} "
              f"(+ {_fmt_bytes(size['task_specific_total'])} task-specific), method {method_text(s['method'])}"
              + (", checksums verified" if verify else ""), markup=False)
    table = Table()
    for col in ("block", "groups", "stored"):
        table.add_column(col)
    for blk in s["blocks"]:
        groups = " | ".join("+".join(g) for g in blk["groups"])
        kinds = ",".join(sorted(set(blk["kinds"]))) + (" +pretrained" if blk["store_base"] else "")
        table.add_row(blk["name"], groups, kinds)
    out.print(table)
    recal = s.get("recalibration")
    if recal:
        out.print("BatchNorm statistics re-estimated on data: " + ", ".join(
            f"{t} {n} examples" for t, n in recal["examples"].items()), markup=False)
    for note in s.get("notes", []):
        out.print(f"note: {note}", markup=False)


@app.command()
def export(bundle_dir: Path = typer.Argument(..., help="a bundle directory"),
           task: Optional[str] = typer.Option(None, "--task", "-t", help="task to export"),
           output: str = typer.Option(..., "-o", "--output", help="where to write the checkpoint (a directory for HF inputs)"),
           force: bool = ForceOpt, max_shard_size: str = MaxShardOpt,
           adapter_set: bool = typer.Option(False, "--adapter-set", help="adapter bundles: every task as named PEFT "
                                                                          "adapters plus adapters.json (task -> adapter)")):
    """Write one task as a plain checkpoint of the same kind as its input (checksums verified);
    for an adapter bundle, a PEFT adapter directory (or with --adapter-set, every task's)."""
    from .bundle import Bundle

    if (task is None) == (not adapter_set):
        raise FlexMergeError("give either --task NAME or --adapter-set (adapter bundles)")
    b = Bundle.load(bundle_dir)
    if adapter_set or b.manifest.get("adapter"):
        from .adapters.export import export_adapter, export_adapter_set

        path = export_adapter_set(b, output, force=force) if adapter_set else export_adapter(b, task, output, force=force)
        out.print(f"exported {'every task' if adapter_set else f'task {task}'} as PEFT adapters to {path}")
        return
    path = b.export(task, output, force=force, max_shard_size=max_shard_size)
    out.print(f"exported task {task} to {path}")


@app.command()
def methods():
    """List the merge methods and their parameters."""
    from .methods import available_methods, method_class

    for name in available_methods():
        cls = method_class(name)
        params = ", ".join(f"{f.alias or k}={f.default}" for k, f in cls.Params.model_fields.items())
        out.print(f"{name:18s} {params}", markup=False)
        if cls.note:
            out.print(f"{'':18s} note: {cls.note}", markup=False, soft_wrap=True)


@app.command()
def demo(output: Optional[Path] = typer.Option(None, "-o", "--output", help="where to write the table and plots (default: <cache>/text8/<recipe>/demo)"),
         methods: str = typer.Option("task_arithmetic,ties", "--methods", "-m", help="comma-separated methods"),
         sizes: str = typer.Option("1,1.5,2.5,4", "--sizes", "-s", help="comma-separated sizes in model units"),
         tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated tasks (default sst2,trec,agnews,subj)"),
         data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="text data sets (default $FLEXMERGE_DATA or ../shared/datasets/text)"),
         cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="checkpoint cache (default $FLEXMERGE_CACHE or ~/.cache/flexmerge)"),
         max_train: Optional[int] = typer.Option(None, "--max-train", help="training examples per task (default 500)"),
         max_test: Optional[int] = typer.Option(None, "--max-test", help="test examples per task (default 200)"),
         progress: bool = ProgressOpt):
    """Fine-tune 4 real text tasks (or reuse the cache), merge at several sizes, print accuracies."""
    from .demo import run_demo
    from .evaluate import parse_sizes

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    result = run_demo(output, methods=split(methods), sizes=parse_sizes(sizes),
                      tasks=split(tasks) if tasks else None, data_dir=data_dir, cache_dir=cache_dir,
                      max_train=max_train, max_test=max_test, progress=progress)
    out.print(result.rich_table(title="accuracy vs size (fine-tuned and zero-shot rows are the references)",
                                width=out.width))
    out.print(f"table and plots in {result.out_dir}: curve.csv, accuracy_vs_size.png, normalized_vs_size.png")


@app.command()
def serve(bundle_dir: Path = typer.Argument(..., help="a bundle directory"),
          port: int = typer.Option(8000, "--port", help="port on 127.0.0.1"),
          host: str = typer.Option("127.0.0.1", "--host", help="address to bind (localhost by default)"),
          rebuild_policy: str = typer.Option("on_the_fly", "--rebuild-policy", help="mask bundles: on_the_fly | cache"),
          cache_budget: Optional[int] = typer.Option(None, "--cache-budget-bytes", help="memory budget of the cache policy"),
          max_body: int = typer.Option(4 * 2**20, "--max-body-bytes", help="largest request body (413 above)"),
          max_rows: int = typer.Option(256, "--max-rows", help="most rows per request, all tasks together"),
          max_tokens: int = typer.Option(8192, "--max-tokens", help="most rows x tokens per request"),
          timeout: float = typer.Option(30.0, "--timeout", help="seconds for a request's headers and body"),
          max_connections: int = typer.Option(64, "--max-connections", help="open connections (503 above)"),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch threads of the model (default: torch's)")):
    """Serve every task of a bundle over HTTP (JSON): GET /tasks, POST /tasks/<task>, POST /batch."""
    from .serve import Limits, serve as run_server

    limits = Limits(max_body_bytes=max_body, max_rows=max_rows, max_tokens=max_tokens, timeout=timeout,
                    max_connections=max_connections)
    run_server(bundle_dir, host=host, port=port, rebuild_policy=rebuild_policy, cache_budget_bytes=cache_budget,
               limits=limits, threads=threads)


from .curve_cli import curve  # noqa: E402

app.command()(curve)


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _signals():
    """SIGTERM/SIGHUP -> :class:`Terminated` while the command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}  # even where
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a shell started us with SIGINT ignored (background jobs)
        previous[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _left_behind(argv: list[str] | None) -> str:
    """What an interrupted command leaves: nothing, except ``curve``, whose table keeps the rows
    finished so far (written after every row) for a rerun to resume from."""
    args = sys.argv[1:] if argv is None else argv
    if next((a for a in args if not a.startswith("-")), None) == "curve":
        return "the rows finished so far are kept in the output directory; rerun the same command to resume"
    return "nothing was written"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning every expected failure into one line and exit code 2.

    Exit codes: 0 success; 2 bad input (one line ``error: ...``); 130 interrupted (SIGINT),
    143 terminated (SIGTERM), 129 (SIGHUP); 1 an internal error (one line; set
    ``FLEXMERGE_DEBUG=1`` for the traceback). Interrupted commands remove their temporary outputs.
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with _signals():
            rv = app(args=argv, standalone_mode=False)
    except FlexMergeError as exc:
        err.print(f"error: {exc}", markup=False)
        return 2
    except NoArgsIsHelp:  # the framework has printed the help already
        return 0
    except UsageError as exc:
        hint = f" (see 'flexmerge {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else " (see 'flexmerge --help')"
        err.print(f"error: {' '.join(exc.format_message().split())}{hint}", markup=False)
        return 2
    except (*Abort, KeyboardInterrupt):
        err.print(f"error: interrupted; {_left_behind(argv)}", markup=False)
        return 130
    except Terminated as exc:
        err.print(f"error: terminated by signal {exc.signum}; {_left_behind(argv)}", markup=False)
        return 128 + exc.signum
    except ClickExit as exc:
        return exc.exit_code
    except MemoryError:
        err.print("error: out of memory; use a smaller model or size, or a machine with more memory", markup=False)
        return 2
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        err.print(f"error: cannot access{where}: {exc.strerror or exc}; check the path and its permissions",
                  markup=False)
        return 2
    except Exception as exc:  # a bug: one line, traceback on request
        if os.environ.get("FLEXMERGE_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:300]
        err.print(f"error: internal error ({type(exc).__name__}: {text}); please report it with the command "
                  "(FLEXMERGE_DEBUG=1 shows the traceback)", markup=False)
        return 1
    if rv == 130:  # typer turns KeyboardInterrupt into Exit(130) after every ``finally`` ran
        err.print(f"error: interrupted; {_left_behind(argv)}", markup=False)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Entry point for ``python -m flexmerge.cli``-style callers; the console script is
    :func:`flexmerge._entry.run` (handlers installed before the heavy imports)."""
    sys.exit(main())
