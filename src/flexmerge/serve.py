"""A thin HTTP endpoint over :class:`~flexmerge.runtime.MultiTaskModel` (JSON in, JSON out).

    flexmerge serve out/ --port 8000          # localhost only by default

Routes:

* ``GET  /tasks``            -> ``{"tasks": [...], "size_units": u, "method": {...}}``
* ``POST /tasks/<task>``     body ``{"inputs": X}``            -> ``{"outputs": Y}``
* ``POST /batch``            body ``{"inputs": {task: X, ...}}`` -> ``{"outputs": {task: Y, ...}}``

``X`` is what the model takes, as JSON: for HF models a dict of nested lists
(``{"input_ids": [[...]], "attention_mask": [[...]]}``) or ``{"text": ["...", ...]}`` (tokenised
with the task's own tokenizer, padded to the longest row of the whole request); for plain modules
a nested list (one tensor) or ``{"args": [...]}`` (several positional tensors). Integer lists
become int64 tensors, others float32.
``Y``: tensors as nested lists; HF model outputs as a dict of their fields. A
:class:`~flexmerge.errors.FlexMergeError` (unknown task, shapes that disagree...) answers 400 with
``{"error": message}``. One request runs at a time (the model's lock); the routing of rows by task
happens inside one request, so a client batches several tasks with ``/batch``.
"""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from .errors import FlexMergeError
from .runtime import MultiTaskModel, _hf_config_dir

__all__ = ["make_server", "serve"]


def _to_tensor(value: Any, name: str) -> torch.Tensor:
    try:
        t = torch.tensor(value)
    except (TypeError, ValueError) as exc:
        raise FlexMergeError(f"input '{name}' is not a rectangular list of numbers ({exc})") from None
    if t.dtype in (torch.float64,):
        t = t.to(torch.float32)
    return t


def _outputs(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, dict):
        return {k: _outputs(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_outputs(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


class _Tokenizers:
    """Each task's tokenizer from its HF source directory, loaded on first use (offline)."""

    def __init__(self, mt: MultiTaskModel):
        self.mt = mt
        self._cache: dict[str, Any] = {}

    def __call__(self, task: str):
        if task not in self._cache:
            cdir = _hf_config_dir(self.mt.bundle, task)
            if cdir is None:
                raise FlexMergeError(f"task '{task}' has no tokenizer (its source is not an HF directory); "
                                     "send token ids instead of text")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import transformers

            try:
                self._cache[task] = transformers.AutoTokenizer.from_pretrained(str(cdir), local_files_only=True)
            except Exception as exc:
                raise FlexMergeError(f"task '{task}': no tokenizer in {cdir} ({str(exc).splitlines()[0]}); "
                                     "send token ids instead of text") from None
        return self._cache[task]


def _prepare(batch: dict, tokenizers: _Tokenizers) -> dict:
    """JSON inputs -> tensors; texts tokenised and padded to one length for the whole request."""
    if not isinstance(batch, dict) or not batch:
        raise FlexMergeError('give {"inputs": {task: inputs, ...}} with at least one task')
    texts = {t: x["text"] for t, x in batch.items() if isinstance(x, dict) and "text" in x}
    longest = 0
    encoded = {}
    for t, lines in texts.items():
        if isinstance(lines, str):
            lines = [lines]
        tok = tokenizers(t)
        encoded[t] = tok(list(lines), truncation=True)
        longest = max([longest] + [len(ids) for ids in encoded[t]["input_ids"]])
    out = {}
    for t, x in batch.items():
        if t in encoded:
            tok = tokenizers(t)
            enc = tok.pad(encoded[t], padding="max_length", max_length=longest, return_tensors="pt")
            out[t] = {k: v for k, v in enc.items()}
        elif isinstance(x, dict) and set(x) == {"args"} and isinstance(x["args"], list):
            out[t] = tuple(_to_tensor(v, f"args[{i}]") for i, v in enumerate(x["args"]))
        elif isinstance(x, dict):
            out[t] = {k: (_to_tensor(v, k) if isinstance(v, list) else v) for k, v in x.items()}
        else:
            out[t] = _to_tensor(x, "input")
    return out


def make_server(mt: MultiTaskModel, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server (not started) answering the routes of the module doc for ``mt``."""
    tokenizers = _Tokenizers(mt)

    class Handler(BaseHTTPRequestHandler):
        server_version = "flexmerge"

        def log_message(self, fmt, *args):  # quiet by default
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/tasks":
                self._reply(200, {"tasks": mt.tasks, "size_units": mt.bundle.size_units,
                                  "method": mt.bundle.method})
            else:
                self._reply(404, {"error": f"no route {self.path}; use GET /tasks, POST /tasks/<task>, POST /batch"})

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                if not isinstance(body, dict) or "inputs" not in body:
                    raise FlexMergeError('the body must be a JSON object with "inputs"')
                path = self.path.rstrip("/")
                if path == "/batch":
                    inputs = body["inputs"]
                    single = None
                elif path.startswith("/tasks/"):
                    single = path[len("/tasks/"):]
                    inputs = {single: body["inputs"]}
                else:
                    self._reply(404, {"error": f"no route {self.path}; use POST /tasks/<task> or POST /batch"})
                    return
                outputs = mt(_prepare(inputs, tokenizers))
                result = _outputs(outputs[single]) if single is not None else \
                    {t: _outputs(v) for t, v in outputs.items()}
                self._reply(200, {"outputs": result})
            except FlexMergeError as exc:
                self._reply(400, {"error": str(exc)})
            except json.JSONDecodeError as exc:
                self._reply(400, {"error": f"the body is not JSON ({exc.msg})"})
            except Exception as exc:  # a model error: report it, keep serving
                self._reply(500, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})

    return ThreadingHTTPServer((host, port), Handler)


def serve(bundle: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
          rebuild_policy: str = "on_the_fly", cache_budget_bytes: int | None = None,
          verify: bool = True, model_factory=None) -> None:
    """Load ``bundle`` and serve it until interrupted (``flexmerge serve``)."""
    mt = MultiTaskModel.from_bundle(Path(bundle), model_factory=model_factory, rebuild_policy=rebuild_policy,
                                    cache_budget_bytes=cache_budget_bytes, verify=verify)
    server = make_server(mt, host, port)
    print(f"serving {len(mt.tasks)} tasks ({', '.join(mt.tasks)}) on http://{host}:{server.server_port}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
