"""Sweeps on Ray: the evaluator calls of :func:`~flexmerge.evaluate.sweep` as Ray tasks.

Evaluation, not merging, takes most of a sweep's time (FlexMerge, Dhasade et al., ICLR 2026), so
only the evaluator calls are distributed. The driver merges each distinct model once, as in a
serial sweep, puts it in Ray's object store (an in-memory bundle, the compact stored form, or the
state dicts of the references) and submits one task per (model, task name); a worker rebuilds the
task's state dict from the bundle and calls the evaluator exactly as the serial session does
(:func:`~flexmerge.evaluate.session.evaluate_one`: model factory, score checks). The session adds
the rows in the serial order as their scores arrive, so the table equals the serial sweep's.

* Workers: each call asks for one CPU (``ray_options`` adds, e.g., ``num_gpus``); a call whose
  worker dies is retried by Ray (``max_retries``); an evaluator that raises is not retried, its
  error ends the sweep as in the serial one. At most ``max_pending`` merged models are in flight.
* Code: the evaluator and model factory travel through the object store once (cloudpickle);
  functions loaded from a file by ``path/to/file.py:function`` are re-imported from that file in
  the worker, and the driver's ``sys.path`` and working directory are added to the worker's, so a
  ``module:function`` importable by the driver is importable by a local cluster's workers (a remote
  cluster needs the same paths, or the module installed).
* Threads: on a local cluster the driver merges on one torch thread while the sweep runs (then
  restores its setting): its merges share the cores with the one-CPU workers. Measured on text8
  (2 cores, ``bench/bench_ray_sweep.py --text8``, 64 evaluator calls, one run each): Ray 1.12x
  the serial sweep's time with the driver on torch's 2 threads; with one, 0.92x and 1.14x in two
  runs whose serial baselines differed by 19% (144 s and 121 s), so no gain is shown yet.
* Cluster: a Ray session already initialised in this process is used as is; otherwise
  ``ray.init(address)`` joins the cluster at ``address`` or, without one, starts a local cluster;
  either is shut down (disconnected) when the sweep ends.

``ray`` is an optional dependency (``pip install -e ".[ray]"``), imported only here.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import sys
import traceback
from typing import Any, Callable, Mapping

from ..errors import FlexMergeError
from .session import Pending, _EvalFailure, evaluate_one

RAY_INSTALL = 'pip install -e ".[ray]"'


def import_ray():
    """The ``ray`` module, or a one-line :class:`FlexMergeError` naming how to install it."""
    try:
        import ray
    except ImportError:
        raise FlexMergeError(f"--ray needs the 'ray' package, which is not installed; install it with "
                             f"{RAY_INSTALL} (or pip install \"ray>=2.9\")") from None
    return ray


class _FromFile:
    """A callable that a worker imports again from its file (``path/to/file.py:function``): the
    module that :func:`~flexmerge.evaluate.user_code.load_callable` made for it exists only in the
    driver."""

    def __init__(self, path: str, qualname: str):
        self.path, self.qualname = path, qualname

    def load(self) -> Callable:
        from .user_code import load_callable

        return load_callable(f"{self.path}:{self.qualname}", "evaluator")


def _shippable(fn: Any) -> Any:
    """``fn`` as it travels to the workers (see :class:`_FromFile`)."""
    if fn is None:
        return None
    mod_name = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", "")
    mod = sys.modules.get(mod_name or "")
    path = getattr(mod, "__file__", None)
    if (mod is not None and path and "<locals>" not in qual and mod_name != "__main__"
            and importlib.machinery.PathFinder.find_spec(mod_name.split(".")[0]) is None):
        return _FromFile(path, qual)
    return fn


def _compact(t):
    """A tensor that pickles only its own elements (a view of a larger storage is copied)."""
    import torch

    if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


_WORKER: dict[str, Any] = {}  # per worker process: the callables of the latest sweeps, by object id
_WORKER_KEEP = 4


def _worker_callable(box: list, paths: list[str]) -> Any:
    """The callable in ``box`` (an object id), deserialised once per worker process, after the
    driver's import paths are added."""
    import ray

    ref = box[0]
    if ref is None:
        return None
    key = ref.hex()
    if key not in _WORKER:
        for p in paths:
            if p not in sys.path and os.path.isdir(p):
                sys.path.append(p)
        obj = ray.get(ref)
        while len(_WORKER) >= _WORKER_KEEP:  # a long-lived cluster serves many sweeps
            _WORKER.pop(next(iter(_WORKER)))
        _WORKER[key] = obj.load() if isinstance(obj, _FromFile) else obj
    return _WORKER[key]


def _factory_modules(box: list) -> dict:
    """The model factory's modules (one per task, reused as the serial session does)."""
    key = f"modules:{box[0].hex() if box[0] is not None else None}"
    if key not in _WORKER:
        while len(_WORKER) >= _WORKER_KEEP:
            _WORKER.pop(next(iter(_WORKER)))
        _WORKER[key] = {}
    return _WORKER[key]


def _evaluate_remote(payload: Any, task: str, where: str, ev_box: list, factory_box: list, ev_name: str,
                     paths: list[str]) -> tuple:
    """One evaluator call in a Ray worker; the outcome as :class:`~flexmerge.evaluate.session.Pending`
    describes it (failures are returned, not raised, so that Ray retries only dead workers)."""
    notes: list[str] = []
    try:
        evaluator = _worker_callable(ev_box, paths)
        factory = _worker_callable(factory_box, paths)
        modules = _factory_modules(factory_box)
        sd = payload.state_dict(task) if hasattr(payload, "state_dict") else payload
        score = evaluate_one(evaluator, ev_name, factory, modules, task, sd, where, notes)
    except _EvalFailure as exc:
        remote = RemoteError(traceback.format_exc()) if exc.exc is not None else None
        return ("error", "eval", exc.message, notes, remote)
    except FlexMergeError as exc:
        return ("error", "input", str(exc), notes, None)
    except Exception as exc:  # e.g. the evaluator cannot be imported in the worker
        return ("error", "eval", f"evaluator '{ev_name}' failed on task '{task}' ({where}) in a Ray worker: "
                f"{type(exc).__name__}: {exc}", notes, RemoteError(traceback.format_exc()))
    return ("ok", score, notes)


class RemoteError(Exception):
    """The traceback of an evaluator failure in a Ray worker (chained to the sweep's error)."""


class _RayPending(Pending):
    def __init__(self, refs: dict[str, Any], where: str):
        self.refs, self.where, self.calls = refs, where, len(refs)

    def ready(self) -> bool:
        import ray

        refs = list(self.refs.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(done) == len(refs)

    def outcomes(self) -> dict[str, tuple]:
        import ray

        out = {}
        for task, ref in self.refs.items():
            try:
                out[task] = ray.get(ref)
            except Exception as exc:  # the worker died more often than max_retries allows, or Ray failed
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                out[task] = ("error", "eval", f"Ray failed to run the evaluator on task '{task}' ({self.where}): "
                             f"{type(exc).__name__}: {first}", [], RemoteError(str(exc)))
        self.refs = {}
        return out


def check_address(address: str, timeout: float = 5.0) -> None:
    """A one-line :class:`FlexMergeError` unless ``host:port`` (or ``ray://host:port``) accepts a TCP
    connection: ``ray.init`` would otherwise wait minutes for an unreachable cluster. ``auto`` and
    ``local`` are Ray's own to resolve."""
    import socket

    text = address.strip()
    host, sep, port = text.removeprefix("ray://").rpartition(":")
    if text in ("auto", "local") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise FlexMergeError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check "
                             "--ray-address: the address that 'ray start --head' printed, or auto for a "
                             "cluster on this machine") from None


class RayExecutor:
    """Runs a session's evaluator calls as Ray tasks (see the module docstring)."""

    def __init__(self, address: str | None = None, options: Mapping[str, Any] | None = None,
                 max_retries: int = 3, log: Callable[[str], None] | None = None):
        self.address = address
        self.options = dict(options or {})
        self.max_retries = int(max_retries)
        self.log = log or (lambda msg: None)
        self.max_pending = 2
        self.cpus = 0
        self._owns = False
        self._submitted: list[Any] = []
        self._driver_threads: int | None = None

    def start(self, evaluator: Callable, ev_name: str, model_factory: Callable | None, num_tasks: int) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            if self.address:
                check_address(self.address)
            try:
                ray.init(address=self.address or "local", include_dashboard=False, logging_level="WARNING")
            except Exception as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
                raise FlexMergeError(f"cannot start or join {where} ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}); check --ray-address "
                                     "(e.g. auto, or ray://host:10001)") from None
            self._owns = True
        try:
            self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            per_call = float(self.options.get("num_cpus", 1)) or 1.0
            slots = max(1, int(self.cpus // per_call))
            # enough merged models in flight to keep every slot busy, one more being merged
            self.max_pending = max(2, math.ceil(slots / max(1, num_tasks)) + 1)
            self.ev_name = ev_name
            self._ev = [ray.put(_shippable(evaluator))]
            self._factory = [ray.put(_shippable(model_factory)) if model_factory is not None else None]
            self._paths = [os.getcwd()] + [p for p in sys.path if p and os.path.isdir(p)]
            opts = {"num_cpus": 1, "max_retries": self.max_retries, "retry_exceptions": False, **self.options}
            self._remote = ray.remote(_evaluate_remote).options(**opts)
        except BaseException:
            self.close()
            raise
        if not self.address:  # the workers share this machine's cores with the driver's merges
            import torch

            self._driver_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        where = ("a local cluster" if self._owns and not self.address
                 else self.address or "the Ray session of this process")
        self.log(f"ray: evaluator calls as Ray tasks on {self.cpus} CPUs ({slots} at a time), {where}")

    def describe(self) -> dict:
        return {"cpus": self.cpus, "address": self.address, "options": self.options,
                "max_retries": self.max_retries}

    def submit(self, payload: Any, where: str) -> _RayPending:
        """Evaluate every task on ``payload``: an in-memory :class:`~flexmerge.bundle.Bundle` (put in
        the object store once) or ``(task, state_dict)`` pairs (one object per task)."""
        import ray

        if hasattr(payload, "state_dict"):
            if getattr(payload, "_mem", None) is not None:
                payload._mem = {f: {k: _compact(t) for k, t in d.items()} for f, d in payload._mem.items()}
            ref = ray.put(payload)
            tasks = list(payload.tasks)
            refs = {t: self._remote.remote(ref, t, where, self._ev, self._factory, self.ev_name, self._paths)
                    for t in tasks}
        else:  # (task, state dict) pairs, made one at a time: one object per task
            refs = {t: self._remote.remote(ray.put({k: _compact(v) for k, v in sd.items()}), t, where, self._ev,
                                           self._factory, self.ev_name, self._paths)
                    for t, sd in payload}
        self._submitted.extend(refs.values())
        return _RayPending(refs, where)

    def close(self) -> None:
        """Cancel the calls still running (a failed or interrupted sweep) and shut Ray down if this
        executor started or joined it."""
        try:
            import ray
        except ImportError:
            return
        if ray.is_initialized() and self._submitted:
            _, running = ray.wait(self._submitted, num_returns=len(self._submitted), timeout=0)
            for ref in running:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # finished meanwhile
                    pass
            if running:  # cancelling is asynchronous: let the calls end before the sweep returns
                ray.wait(running, num_returns=len(running), timeout=30)
        self._submitted = []
        if self._driver_threads is not None:
            import torch

            torch.set_num_threads(self._driver_threads)
            self._driver_threads = None
        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False
