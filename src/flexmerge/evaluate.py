"""Accuracy-size curves: sweep merge methods x sizes through a user evaluator.

The FlexMerge paper's results are curves of accuracy against deployed size, one per merge method
(Dhasade et al., ICLR 2026, Figs. 1 and 3-5), with the fine-tuned and zero-shot levels as
references and the *normalized* accuracy (merged / fine-tuned, per task, averaged over tasks;
Sec. 5 "Metrics", after Wang et al. 2024) on a second axis. :func:`sweep` produces that table for
any merge config and any evaluator; :mod:`flexmerge.plots` draws it.

The evaluator
-------------
``evaluator(task_name, state_dict) -> float``: ``state_dict`` is the task's complete rebuilt state
dict (the same keys as the task's checkpoint, task-specific heads included), ``float`` any score
where higher is better (accuracy, for example). With ``model_factory`` (``model_factory(task_name)
-> torch.nn.Module``, called once per task, the module is then reused), the sweep loads each state
dict into that task's module (``load_state_dict(strict=False)``; an unexpected key is an error, a
missing one a note) and calls ``evaluator(task_name, module)`` instead.

What one sweep does (and does not do again)
-------------------------------------------
* Fine-tuned reference: each task's own checkpoint is evaluated once (or taken from
  ``finetuned=``); zero-shot (optional): the pretrained weights with the task's own task-specific
  (excluded) tensors, once per task.
* One :class:`~flexmerge.engine.FlexMerge` per method: its global pass (TIES trim, DARE, ...) runs
  once; its plan is made once; ablation plans (orders, linkages, random seeds) are re-planned from
  the cached Gram matrices without reading tensors. Methods that do not transform task vectors
  share one similarity pass.
* Every distinct merged model is evaluated once: results are cached in memory by (method and
  parameters, per-tensor grouping), so a size requested twice, the same grouping reached by two
  orders, or the largest size (every task keeps its checkpoint, so its scores *are* the
  fine-tuned ones) cost no evaluation. Nothing is cached on disk.
* ``channel_merging`` (the baseline in :mod:`flexmerge.baselines.channel_merging`) is accepted as
  a method name; it takes integer sizes only (others are skipped with a note).
* A size outside a method's range is skipped with a note; a mask method (TALL/consensus, EMR) is
  also evaluated at its own minimum size (``requested_size = "min"``).

Output: rows (see :data:`CSV_FIELDS`) written after every row, atomically, to ``curve.csv`` and
``curve.json`` in ``out``; a failing evaluator raises :class:`~flexmerge.errors.FlexMergeError`
naming it, and the table so far stays written (``"complete": false`` in the JSON).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import FlexMergeError
from .io import atomic_path, write_json_atomic

CURVE_FORMAT = "flexmerge-curve"
CURVE_VERSION = 1
CSV_NAME = "curve.csv"
JSON_NAME = "curve.json"
ORDERS = ("greedy", "left-right", "right-left", "random")
LINKAGES = ("min", "max", "avg")
CHANNEL_MERGING = "channel_merging"
CSV_FIELDS = ["run", "method", "params", "order", "linkage", "seed", "requested_size", "size_units",
              "size_bytes", "steps", "average", "normalized"]
"""Leading CSV columns; then ``score:<task>`` per task, then ``evaluated`` and ``note``."""

Evaluator = Callable[[str, Any], float]


# ------------------------------------------------------------------------------------------
# results


@dataclass
class SweepResult:
    """The table of one sweep: reference levels, one row per (run, method, size), notes."""

    tasks: list[str]
    rows: list[dict] = field(default_factory=list)
    finetuned: dict[str, float] = field(default_factory=dict)
    zero_shot: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    complete: bool = False

    # ---- views -----------------------------------------------------------------------------
    def select(self, run: str | None = None, method: str | None = None) -> list[dict]:
        return [r for r in self.rows if (run is None or r["run"] == run)
                and (method is None or r["method"] == method)]

    @property
    def finetuned_average(self) -> float | None:
        return _mean(self.finetuned.values()) if self.finetuned else None

    @property
    def zero_shot_average(self) -> float | None:
        return _mean(self.zero_shot.values()) if self.zero_shot else None

    # ---- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": CURVE_FORMAT, "version": CURVE_VERSION, "complete": self.complete,
                "tasks": self.tasks, "finetuned": self.finetuned, "zero_shot": self.zero_shot,
                "notes": self.notes, "meta": self.meta, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "curve table") -> "SweepResult":
        if d.get("format") != CURVE_FORMAT:
            raise FlexMergeError(f"{where} is not a flexmerge curve table (no 'format: {CURVE_FORMAT}'); "
                                 "make one with 'flexmerge curve'")
        return cls(tasks=list(d["tasks"]), rows=list(d["rows"]), finetuned=dict(d.get("finetuned") or {}),
                   zero_shot=d.get("zero_shot"), notes=list(d.get("notes", [])), meta=dict(d.get("meta", {})),
                   complete=bool(d.get("complete", False)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SweepResult":
        p = Path(path)
        if p.is_dir():
            p = p / JSON_NAME
        try:
            return cls.from_dict(json.loads(p.read_text()), where=str(p))
        except FileNotFoundError:
            raise FlexMergeError(f"curve table not found: {p}; make one with 'flexmerge curve'") from None
        except json.JSONDecodeError as exc:
            raise FlexMergeError(f"{p} is not valid JSON ({exc.msg}); re-run 'flexmerge curve'") from None

    def csv_header(self) -> list[str]:
        return CSV_FIELDS + [f"score:{t}" for t in self.tasks] + ["evaluated", "note"]

    def csv_rows(self) -> list[list]:
        out = []
        for r in self.rows:
            line = [r["run"], r["method"], json.dumps(r["params"], sort_keys=True), r["order"] or "",
                    r["linkage"] or "", "" if r["seed"] is None else r["seed"], _cell(r["requested_size"]),
                    repr(r["size_units"]), r["size_bytes"], "" if r["steps"] is None else r["steps"],
                    _cell(r["average"]), _cell(r["normalized"])]
            line += [_cell(r["scores"].get(t)) for t in self.tasks]
            line += [int(bool(r.get("evaluated"))), r.get("note", "")]
            out.append(line)
        return out

    def write(self, out: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``curve.csv`` and ``curve.json`` into directory ``out`` (each atomically)."""
        root = Path(out).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = root / CSV_NAME, root / JSON_NAME
        with atomic_path(csv_path, is_dir=False) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(self.csv_header())
                w.writerows(self.csv_rows())
        write_json_atomic(json_path, self.to_dict())
        return csv_path, json_path

    def rich_table(self, max_tasks: int = 8, title: str | None = None, width: int | None = None):
        """A :class:`rich.table.Table` of the rows; ablation rows carry their order and linkage
        (and seed) after the method name. Per-task columns are added when there are at most
        ``max_tasks`` tasks and the table still fits in ``width`` characters (a console's width;
        ``None``: no limit), so that no cell is ever cut short."""
        from rich.markup import escape
        from rich.table import Table

        names = []
        for r in self.rows:
            name = r["method"]
            if r["run"] in ("order", "linkage"):
                name += f" ({r['order']}, {r['linkage']}" + (f", seed {r['seed']}" if r["seed"] is not None else "") + ")"
            names.append(name)
        rows = [[escape(name), _cell(r["requested_size"]) or "-", f"{r['size_units']:.4g}",
                 _human_bytes(r["size_bytes"]), _fmt(r["average"]), _fmt(r["normalized"])]
                for name, r in zip(names, self.rows)]
        columns = ["method", "size", "units", "bytes", "average", "normalized"]

        def table_width(cols: list[str], cells: list[list[str]]) -> int:
            widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
            return sum(widths) + 3 * len(cols) + 1  # rich's default padding and borders

        with_tasks = [row + [_fmt(r["scores"].get(t)) for t in self.tasks] for row, r in zip(rows, self.rows)]
        show_tasks = len(self.tasks) <= max_tasks and (
            width is None or table_width(columns + list(self.tasks), with_tasks) <= width)
        table = Table(title=title, caption=None if show_tasks or not self.tasks else
                      "per-task scores: see curve.csv (or widen the terminal)")
        for c in columns + (list(self.tasks) if show_tasks else []):
            table.add_column(escape(c), justify="left" if c == "method" else "right", no_wrap=True)
        for row in (with_tasks if show_tasks else rows):
            table.add_row(*row)
        return table


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else float("nan")


# ------------------------------------------------------------------------------------------
# loading user callables


def callable_name(fn: Any) -> str:
    """``module:qualname`` of a callable (for messages and the table's metadata)."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}:{qual}" if mod else repr(fn)


def load_callable(spec: str, what: str = "evaluator") -> Callable:
    """Import ``module:function`` (module on ``sys.path`` or the current directory) or
    ``path/to/file.py:function``; ``function`` may be dotted (``module:obj.method``)."""
    text = str(spec).strip()
    hint = (f"give {what} as module:function (module importable or in the current directory) or "
            "path/to/file.py:function")
    left, sep, attr = text.rpartition(":")
    if not sep or not left or not attr:
        raise FlexMergeError(f"{what} '{text}' is not of the form module:function; {hint}")
    is_file = left.endswith(".py") or "/" in left or os.sep in left
    try:
        if is_file:
            path = Path(left).expanduser()
            if not path.is_file():
                raise FlexMergeError(f"{what} '{text}': file {path} not found; {hint}")
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            name = f"_flexmerge_user_{path.stem}_{digest}"
            module = sys.modules.get(name)
            if module is None:
                ispec = importlib.util.spec_from_file_location(name, path)
                if ispec is None or ispec.loader is None:
                    raise FlexMergeError(f"{what} '{text}': cannot load {path} as Python; {hint}")
                module = importlib.util.module_from_spec(ispec)
                parent = str(path.resolve().parent)
                if parent not in sys.path:
                    sys.path.insert(0, parent)
                sys.modules[name] = module
                try:
                    ispec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
        else:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(left)
    except FlexMergeError:
        raise
    except ModuleNotFoundError as exc:
        raise FlexMergeError(f"{what} '{text}': cannot import module '{left}' ({exc}); {hint}") from None
    except Exception as exc:
        raise FlexMergeError(f"{what} '{text}': importing '{left}' failed with "
                             f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FlexMergeError(f"{what} '{text}': '{left}' has no attribute '{attr}'; check the "
                                 "function name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FlexMergeError(f"{what} '{text}' is a {type(obj).__name__}, not a callable")
    return obj


# ------------------------------------------------------------------------------------------
# arguments


def parse_sizes(sizes: str | float | Sequence[float | str]) -> list[float | str]:
    """``"1,1.5,2"`` or ``[1, 1.5, 2]`` -> ``[1.0, 1.5, 2.0]`` (order kept, duplicates dropped);
    byte sizes (``"40MB"``) stay strings."""
    from .plan import parse_size

    items = [s for s in str(sizes).split(",")] if isinstance(sizes, str) else \
        ([sizes] if isinstance(sizes, (int, float)) else list(sizes))
    out: list[float | str] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        units, _nbytes = parse_size(item.strip() if isinstance(item, str) else item)
        value: float | str = float(units) if units is not None else str(item).strip()
        if value not in out:
            out.append(value)
    if not out:
        raise FlexMergeError("no sizes given; pass e.g. --sizes 1,1.5,2,4")
    return out


def parse_list(text: str | Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    if text is None:
        return []
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    for s in items:
        if s not in allowed:
            raise FlexMergeError(f"unknown {what} '{s}'; use {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _method_name(spec: Any) -> str:
    from .methods import MergeMethod

    if isinstance(spec, MergeMethod):
        return spec.name
    if isinstance(spec, Mapping):
        name = spec.get("name")
        if not isinstance(name, str):
            raise FlexMergeError("a method given as a mapping needs a 'name' key, e.g. {name: ties, k: 0.2}")
        return name
    if isinstance(spec, str):
        return spec
    raise FlexMergeError(f"a method must be a name, a mapping or a MergeMethod, got {type(spec).__name__}")


# ------------------------------------------------------------------------------------------
# the sweep


class _EvalFailure(Exception):
    def __init__(self, who: str, task: str, where: str, exc: BaseException):
        super().__init__(f"{who} failed on task '{task}' ({where}): {type(exc).__name__}: {exc}")
        self.message = str(self)
        self.exc = exc


class _Sweep:
    def __init__(self, config, evaluator, model_factory, finetuned, zero_shot, out, log, progress):
        from .config import MergeConfig, load_config, make_config
        from .validate import open_models

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
        from .sizes import CostModel

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
            if isinstance(value, bool):
                raise TypeError
            score = float(value)
        except (TypeError, ValueError):
            raise _EvalFailure(f"evaluator '{self.ev_name}'", task, where,
                               TypeError(f"returned {type(value).__name__}, not a number")) from None
        return score

    def _evaluate_all(self, make_state_dict: Callable[[str], Mapping], where: str) -> dict[str, float]:
        return {t: self._call(t, make_state_dict(t), where) for t in self.tasks}

    # ---- references ------------------------------------------------------------------------
    def references(self, zero_shot) -> None:
        m = self.models
        if self._given_ft is not None:
            missing = [t for t in self.tasks if t not in self._given_ft]
            if missing:
                raise FlexMergeError(f"finetuned scores lack tasks {missing}; give a score for every task")
            ft = {t: float(self._given_ft[t]) for t in self.tasks}
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
            zs = {t: float(zero_shot[t]) for t in self.tasks}
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
    from .engine import FlexMerge

    t0 = time.perf_counter()
    size_list = parse_sizes(sizes)
    order_list = parse_list(orders, ORDERS, "order")
    linkage_list = parse_list(linkages, LINKAGES, "linkage")
    seed_list = [int(s) for s in (seeds if not isinstance(seeds, str) else seeds.split(","))]
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
                        steps = p.prefix_for(size)
                    except FlexMergeError as exc:
                        note = f"{name}: size {size} skipped ({exc})"
                        if note not in st.result.notes:
                            st.result.notes.append(note)
                        st.log(note)
                        continue
                    done.add(steps)
                    st.run(fm=fm, grouping=p.grouping(steps), plan=p, method_name=name, params=params,
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
        from .plots import plot_all

        plot_all(st.result, out, ylabel=ylabel)
    return st.result


def _channel_merging(st: _Sweep, spec: Any, sizes: list) -> None:
    from .baselines.channel_merging import ChannelMerging, integer_size

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
