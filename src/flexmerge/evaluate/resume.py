"""Resuming a sweep from the table in its output directory (``curve.json``).

The session writes the table after every row (:meth:`~flexmerge.evaluate.table.SweepResult.write`),
so an interrupted sweep leaves its finished rows behind. A rerun reuses a row only when it comes
from the same *setting* and the same *row*:

* the setting (:func:`setting`): flexmerge's version, the merge config, the checkpoint files
  (size and modification time of each), the evaluator and model factory (names, the sha256 of the
  file defining each, and an optional ``resume_key`` attribute of the evaluator for state the
  name does not show), and the BatchNorm recalibration callables (or data directory: its files' names, sizes and mtimes);
* the row (:func:`row_key`): run, method and its parameters, order, linkage, seed, requested size,
  note, and the merged model's per-tensor grouping (:meth:`Session.grouping_key`), so a plan that
  now reaches another grouping is evaluated again.

A reused row keeps its scores and its ``evaluated`` flag; every other field is recomputed, so the
finished table equals an uninterrupted run's. Rows of another setting are recomputed (the log says
which part differs); ``resume=False`` (``--no-resume``) ignores the old table.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable

from .table import JSON_NAME, SweepResult
from .user_code import callable_name


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_digest(fn: Any) -> str | None:
    """sha256 of the source file that defines ``fn`` (its function, or its class for a callable
    object); None when there is none (a builtin, code typed at a prompt)."""
    if fn is None:
        return None
    target = getattr(fn, "__func__", fn)
    if not (inspect.isfunction(target) or inspect.isclass(target)):
        target = type(target)
    try:
        path = inspect.getsourcefile(target)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except (TypeError, OSError):
        return None


def _file_stats(ref: Any) -> Any:
    """``[size, mtime_ns]`` of a checkpoint file, or of each file directly inside a checkpoint
    directory; ``"<in-memory>"`` for tensors given in memory."""
    if not isinstance(ref, (str, os.PathLike)):
        return "<in-memory>"
    p = Path(ref).expanduser()
    try:
        if p.is_dir():
            return {c.name: [c.stat().st_size, c.stat().st_mtime_ns] for c in sorted(p.iterdir()) if c.is_file()}
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def setting(cfg, evaluator, ev_name: str, model_factory, recalibrate) -> dict:
    """The parts of a sweep that its scores depend on, each as a short digest (see the module
    docstring); equal settings make rows reusable."""
    from .. import __version__

    key = getattr(evaluator, "resume_key", None)
    if callable(key):
        key = key()
    recal = None if recalibrate is None else [callable_name(recalibrate.batches),
                                             callable_name(recalibrate.model_factory),
                                             code_digest(recalibrate.batches)]
    if recal is not None and hasattr(recalibrate.batches, "fingerprint"):
        recal.append(recalibrate.batches.fingerprint())  # a data directory: its files' names, sizes, mtimes
    public = cfg.public_dict()
    sources = {"base": _file_stats(cfg.base), "tasks": {t: _file_stats(v) for t, v in cfg.tasks.items()}}
    return {"flexmerge": __version__, "config": _digest(public), "checkpoints": _digest(sources),
            "evaluator": ev_name, "evaluator_code": code_digest(evaluator),
            "evaluator_key": None if key is None else str(key),
            "model_factory": callable_name(model_factory) if model_factory is not None else None,
            "model_factory_code": code_digest(model_factory), "recalibrate": _digest(recal),
            "in_memory": "<in-memory>" in json.dumps(public)}


def setting_key(parts: dict) -> str:
    return _digest(parts)


def row_key(setting_digest: str, *fields: Any) -> str:
    """The identity of one row: the setting's digest and the fields that make the row."""
    return _digest([setting_digest, *fields])


def load_prior(out: Any, parts: dict, log: Callable[[str], None]) -> dict[str, dict]:
    """The reusable rows of the table in ``out`` (by row key), or ``{}`` with a log line saying why
    none are (no table, another setting, tensors in memory)."""
    if out is None:
        return {}
    path = Path(out).expanduser() / JSON_NAME
    if not path.is_file():
        return {}
    if parts.get("in_memory"):
        log(f"not resuming from {path}: the config holds tensors in memory, which the table cannot "
            "identify; every row is evaluated")
        return {}
    try:
        old = SweepResult.load(path)
    except Exception as exc:  # a damaged table of ours: start afresh (writing checks ownership)
        log(f"not resuming from {path} ({str(exc).splitlines()[0]}); every row is evaluated")
        return {}
    before = (old.meta.get("resume") or {}).get("setting")
    if not isinstance(before, dict):
        log(f"not resuming from {path}: it was written without resume information; every row is evaluated")
        return {}
    differs = [k for k in sorted(set(parts) | set(before)) if parts.get(k) != before.get(k)]
    if differs:
        log(f"not resuming from {path}: its rows come from another setting ({', '.join(differs)} "
            "differ); every row is evaluated and the table replaced")
        return {}
    rows = {r["key"]: r for r in old.rows if isinstance(r, dict) and isinstance(r.get("key"), str)
            and isinstance(r.get("scores"), dict)}
    log(f"resuming from {path}: {len(rows)} finished rows of the same setting"
        + ("" if old.complete else " (the sweep was interrupted)"))
    return rows
