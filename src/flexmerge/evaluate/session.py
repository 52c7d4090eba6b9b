"""One evaluation session of a sweep: the user's evaluator called on merged models, its scores
checked, every distinct merged model evaluated once, and the table's rows recorded
(:class:`Session`; see :mod:`flexmerge.evaluate` for what a sweep does).

:mod:`~flexmerge.evaluate.sweep` runs one session with the test evaluator;
:mod:`~flexmerge.evaluate.calibrate` runs a second one with the validation evaluator.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable, Mapping

from ..errors import FlexMergeError
from .table import SweepResult, _mean
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


def _non_finite_tensor(out: Any) -> str | None:
    """``"NaN"``/``"Inf"`` if a floating tensor in a model output (a tensor, or tuples, lists,
    dicts and HF ``ModelOutput`` of them) is not finite, else None."""
    import torch

    if isinstance(out, torch.Tensor):
        if out.is_floating_point() or out.is_complex():
            if not bool(torch.isfinite(out).all()):
                return "NaN" if bool(torch.isnan(out).any()) else "Inf"
        return None
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for x in items:
        bad = _non_finite_tensor(x)
        if bad:
            return bad
    return None


def _watch_outputs(module) -> list[str]:
    """A list that the module's forward hook fills with ``"NaN"``/``"Inf"`` whenever the module
    returns a non-finite output (one hook per module, installed on first use)."""
    seen = getattr(module, "_flexmerge_non_finite", None)
    if seen is None:
        seen = []

        def hook(_mod, _inputs, output):
            bad = _non_finite_tensor(output)
            if bad:
                seen.append(bad)

        module.register_forward_hook(hook)
        module._flexmerge_non_finite = seen
    return seen


def _non_finite_message(where: str, task: str, bad: str) -> str:
    return (f"the model for task '{task}' ({where}) gave {bad} outputs; the merged weights are not usable "
            "at this size (no score recorded): try smaller scaling parameters or another method")


class _EvalFailure(Exception):
    def __init__(self, who: str, task: str, where: str, exc: BaseException):
        super().__init__(f"{who} failed on task '{task}' ({where}): {type(exc).__name__}: {exc}")
        self.message = str(self)
        self.exc = exc


class _BadScore(_EvalFailure):
    def __init__(self, message: str, exc: BaseException | None = None):
        Exception.__init__(self, message)
        self.message = message
        self.exc = exc


def evaluate_one(evaluator, ev_name: str, factory, modules: dict, task: str, sd: Mapping, where: str,
                 notes: list[str]) -> float:
    """One evaluator call: ``sd`` loaded into the task's module from ``factory`` (built once into
    ``modules``) when there is one, the score checked (:func:`score_value`), a note appended to
    ``notes`` for parameters the checkpoint lacks. Raises :class:`_EvalFailure` (the evaluator or
    factory failed, or the model gave non-finite outputs) or :class:`FlexMergeError`. Used by the
    session and by the Ray workers of :mod:`flexmerge.evaluate.distributed`."""
    obj: Any = sd
    seen: list[str] = []
    if factory is not None:
        fname = f"model_factory '{callable_name(factory)}'"
        if task not in modules:
            try:
                module = factory(task)
            except Exception as exc:
                raise _EvalFailure(fname, task, "building the model", exc) from exc
            if not hasattr(module, "load_state_dict"):
                raise FlexMergeError(f"{fname} returned a {type(module).__name__} for task '{task}', not a "
                                     "torch.nn.Module")
            modules[task] = module
        module = modules[task]
        try:
            res = module.load_state_dict(dict(sd), strict=False)
        except Exception as exc:
            raise _EvalFailure(fname, task, f"{where}: loading the state dict", exc) from exc
        if res.unexpected_keys:
            raise FlexMergeError(f"{fname}: the module for task '{task}' has no parameters "
                                 f"{sorted(res.unexpected_keys)[:5]} that the checkpoint has; return the "
                                 "task's own architecture")
        if res.missing_keys:
            note = (f"task {task}: the model_factory module has parameters the checkpoint lacks "
                    f"({', '.join(sorted(res.missing_keys)[:5])}); they keep the module's values")
            if note not in notes:
                notes.append(note)
        obj = module
        seen = _watch_outputs(module)
        seen.clear()
    try:
        value = evaluator(task, obj)
    except Exception as exc:
        if seen:
            raise _BadScore(_non_finite_message(where, task, seen[0])) from None
        raise _EvalFailure(f"evaluator '{ev_name}'", task, where, exc) from exc
    if seen:
        raise _BadScore(_non_finite_message(where, task, seen[0]))
    try:
        return score_value(value, f"evaluator '{ev_name}'", task, where)
    except FlexMergeError as exc:
        raise _BadScore(str(exc)) from None


class Pending:
    """Scores being computed elsewhere (an executor such as :class:`~flexmerge.evaluate.distributed.
    RayExecutor`): ``calls`` evaluator calls; ``ready()`` without blocking, ``outcomes()`` blocking,
    one per task: ``("ok", score, notes)`` or ``("error", kind, message, notes, exc)`` with kind
    ``"eval"`` (an :class:`_EvalFailure`) or ``"input"`` (a :class:`FlexMergeError`)."""

    calls: int = 0
    scores: dict[str, float] | None = None  # set by the session once resolved

    def ready(self) -> bool:
        raise NotImplementedError

    def outcomes(self) -> dict[str, tuple]:
        raise NotImplementedError


class Session:
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
        self.cache: dict[str, Any] = {}  # grouping key -> scores (or the Pending computing them)
        self.evaluations = 0
        self.executor: Any = None  # e.g. a RayExecutor: evaluator calls elsewhere, rows kept in order
        self._queue: list[tuple] = []  # rows (or notes) waiting for earlier pending scores
        self.prior: dict[str, dict] = {}  # resume: reusable rows of the previous table, by row key
        self.setting_digest = ""
        self.reused = 0
        from ..sizes import CostModel

        unit_bytes = CostModel(self.models.blockmap).unit_bytes
        self.result = SweepResult(tasks=list(self.tasks), meta={
            "evaluator": self.ev_name,
            "model_factory": callable_name(model_factory) if model_factory is not None else None,
            "config": self.cfg.public_dict(), "unit_bytes": unit_bytes, "max_units": len(self.tasks),
            "task_specific_bytes": self.models.task_specific_bytes()})
        self._given_ft = finetuned

    def resume(self, enabled: bool, recalibrate: Any = None) -> None:
        """Record the sweep's setting in the table and, if ``enabled``, load the rows of the table
        in ``out`` that it can reuse (:mod:`flexmerge.evaluate.resume`)."""
        from . import resume

        parts = resume.setting(self.cfg, self.evaluator, self.ev_name, self.factory, recalibrate)
        self.setting_digest = resume.setting_key(parts)
        self.result.meta["resume"] = {"setting": parts}
        if enabled:
            self.prior = resume.load_prior(self.out, parts, self.log)

    def _row_key(self, *fields: Any) -> str:
        from .resume import row_key

        return row_key(self.setting_digest, *fields)

    # ---- evaluation ------------------------------------------------------------------------
    def _call(self, task: str, sd: Mapping, where: str) -> float:
        score = evaluate_one(self.evaluator, self.ev_name, self.factory, self.modules, task, sd, where,
                             self.result.notes)
        self.evaluations += 1
        return score

    def _evaluate_all(self, make_state_dict: Callable[[str], Mapping], where: str) -> dict[str, float]:
        return {t: self._call(t, make_state_dict(t), where) for t in self.tasks}

    def _resolve(self, pending: Pending) -> dict[str, float]:
        """The scores of ``pending`` (waiting for them), raising the first task's failure as the
        serial session would have."""
        if pending.scores is None:
            outcomes = pending.outcomes()
            scores = {}
            for t in self.tasks:
                out = outcomes[t]
                for note in out[-2] if out[0] == "error" else out[2]:
                    if note not in self.result.notes:
                        self.result.notes.append(note)
                if out[0] == "error":
                    if out[1] == "input":
                        raise FlexMergeError(out[2])
                    raise _BadScore(out[2], out[4])
                scores[t] = out[1]
                self.evaluations += 1
            pending.scores = scores
        return pending.scores

    def note(self, text: str) -> None:
        """Record a note in the table once (e.g. a size skipped) and log it (after the rows still
        waiting for their scores, so the notes keep the serial order)."""
        if self._queue:
            self._queue.append(("note", text))
        else:
            self._add_note(text)

    def _add_note(self, text: str) -> None:
        if text not in self.result.notes:
            self.result.notes.append(text)
        self.log(text)

    # ---- references ------------------------------------------------------------------------
    def _reference_scores(self, name: str, make_state_dict: Callable[[str], Mapping], where: str) -> Any:
        prior = self.prior.get(self._row_key("reference", name))
        if prior is not None and prior.get("evaluated") and set(prior["scores"]) == set(self.tasks):
            self.reused += 1
            self.log(f"{where}: reused from the previous table")
            return dict(prior["scores"])
        if self.executor is not None:
            return self.executor.submit(((t, make_state_dict(t)) for t in self.tasks), where)
        return self._evaluate_all(make_state_dict, where)

    def references(self, zero_shot) -> None:
        m = self.models
        if self._given_ft is not None:
            missing = [t for t in self.tasks if t not in self._given_ft]
            if missing:
                raise FlexMergeError(f"finetuned scores lack tasks {missing}; give a score for every task")
            ft = {t: score_value(self._given_ft[t], "finetuned scores", t, "given") for t in self.tasks}
        else:
            ft = self._reference_scores("fine-tuned", lambda t: {n: m.tasks[t].get(n) for n in m.tasks[t].names()},
                                        "fine-tuned checkpoint")
        # queued like the rows: with an executor the merging goes on while the references are evaluated
        self._queue.append(("ref", "fine-tuned", ft, len(self.tasks), self._given_ft is None))
        zs = None
        if isinstance(zero_shot, Mapping):
            missing = [t for t in self.tasks if t not in zero_shot]
            if missing:
                raise FlexMergeError(f"zero_shot scores lack tasks {missing}; give a score for every task")
            zs = {t: score_value(zero_shot[t], "zero_shot scores", t, "given") for t in self.tasks}
        elif zero_shot:
            zs = self._reference_scores("zero-shot", self._zero_shot_state_dict, "zero-shot")
        if zs is not None:
            self._queue.append(("ref", "zero-shot", zs, 1, not isinstance(zero_shot, Mapping)))
        self.flush(block=False)

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
                      evaluated=evaluated, note="", key=self._row_key("reference", name))

    def _add_row(self, *, run, method, params, order, linkage, seed, requested, units, nbytes, steps,
                 scores, evaluated, note, key=None) -> dict:
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
        if key is not None:
            row["key"] = key
        self.result.rows.append(row)
        return row

    def save(self) -> None:
        self.result.meta["evaluations"] = self.evaluations
        self.result.meta["reused_rows"] = self.reused
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
            note="") -> dict | None:
        """Evaluate (or reuse) one row. Returns the row, or None while its scores are pending on an
        executor (it is then added, in order, by :meth:`flush`)."""
        method_key = json.dumps([fm.method.describe(), fm.method.seed if fm.method.randomized else None],
                                sort_keys=True, default=str)
        key = self.grouping_key(method_key, fm.blockmap, grouping)
        size = f"{grouping.size_units:.4g} units"
        where = f"{method_name} at {size}"
        if run in ("order", "linkage"):
            where += f" ({run} ablation: order {order}, linkage {linkage}" + \
                (f", seed {seed})" if seed is not None else ")")
        elif run != "main":
            where += f" ({run}{': ' + note if note else ''})"
        row_key = self._row_key(run, method_name, params, order, linkage, seed, requested, note, key)
        prior = self.prior.get(row_key)
        how = ""
        if prior is not None and set(prior["scores"]) == set(self.tasks):
            scores, evaluated, how = dict(prior["scores"]), bool(prior.get("evaluated")), " (from the previous table)"
            self.reused += 1
            if key != "original":
                self.cache.setdefault(key, scores)
        elif key == "original":  # the fine-tuned scores (perhaps still pending: taken when the row is added)
            scores, evaluated = "finetuned", False
        elif key in self.cache:
            scores, evaluated = self.cache[key], False
        else:
            if self.executor is not None:
                self._wait_for_room()
            bundle = fm.merge(grouping=grouping, plan=plan)
            if self.executor is not None:
                scores = self.executor.submit(bundle, where)
            else:
                scores = self._evaluate_all(bundle.state_dict, where)
            del bundle
            self.cache[key] = scores
            evaluated = True
        fields = dict(run=run, method=method_name, params=params, order=order, linkage=linkage, seed=seed,
                      requested=requested, units=grouping.size_units, nbytes=grouping.size_bytes,
                      steps=grouping.steps, evaluated=evaluated, note=note, key=row_key)
        self._queue.append(("row", fields, scores, where, how))
        row = self.flush(block=False)
        return None if self._queue else row

    def _wait_for_room(self) -> None:
        """Before merging another model: wait (in row order) while the executor already has its
        ``max_pending`` merged models in flight."""
        while True:
            pending = {id(item[2]) for item in self._queue
                       if item[0] == "row" and isinstance(item[2], Pending) and item[2].scores is None}
            if len(pending) < self.executor.max_pending:
                return
            self.flush(block=True, count=1)

    def flush(self, block: bool = True, count: int | None = None) -> dict | None:
        """Add the queued rows whose scores are known, in order (all of them with ``block``, waiting;
        ``count``: at most that many rows); return the last row added."""
        row = None
        added = 0
        while self._queue and (count is None or added < count):
            item = self._queue[0]
            if item[0] == "note":
                self._queue.pop(0)
                self._add_note(item[1])
                continue
            scores = item[2]
            if isinstance(scores, Pending):
                if scores.scores is None and not block and not scores.ready():
                    break
                scores = self._resolve(scores)
                for k, v in list(self.cache.items()):
                    if v is item[2]:
                        self.cache[k] = scores
            self._queue.pop(0)
            if item[0] == "ref":
                _, name, _, units, evaluated = item
                if name == "fine-tuned":
                    self.result.finetuned = scores
                else:
                    self.result.zero_shot = scores
                self._reference_row(name, scores, units, evaluated)
                self.save()
                continue
            _, fields, _, where, how = item
            if scores == "finetuned":
                scores = dict(self.result.finetuned)
            row = self._add_row(scores=scores, **fields)
            norm = row["normalized"]
            self.log(f"{where}: average {row['average']:.4f}"
                     + (f", normalized {norm:.4f}" if norm is not None else "")
                     + (how or ("" if row["evaluated"] else " (reused)")))
            self.save()
            added += 1
        return row
