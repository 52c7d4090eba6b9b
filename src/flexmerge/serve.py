"""A thin HTTP endpoint over :class:`~flexmerge.runtime.MultiTaskModel` (JSON in, JSON out).

    flexmerge serve out/ --port 8000          # localhost only by default

Routes:

* ``GET  /tasks``            -> ``{"tasks": [...], "size_units": u, "method": {...}}``
* ``POST /tasks/<task>``     body ``{"inputs": X}``            -> ``{"outputs": Y}``
* ``POST /batch``            body ``{"inputs": {task: X, ...}}`` -> ``{"outputs": {task: Y, ...}}``

``X`` is what the model takes, as JSON: for HF models a dict of nested lists
(``{"input_ids": [[...]], "attention_mask": [[...]]}``, keys among the model's ``forward``
arguments) or ``{"text": ["...", ...]}`` (tokenised with the task's own tokenizer, padded to the
longest row of the whole request); for plain modules a nested list (one tensor) or
``{"args": [...]}`` (several positional tensors). Integer lists become int64 tensors, others
float32. ``Y``: tensors as nested lists; HF model outputs as a dict of their fields.

Every request gets an answer with a JSON body ``{"error": message}`` when it is not 200:

* **400** anything the model cannot take, checked before it runs: JSON that is not an object,
  invalid UTF-8, nesting deeper than a tensor's rank, unknown keys, ragged or non-numeric lists,
  non-finite numbers, float token ids, empty batches, ranks other than ``[rows, tokens]`` for
  token inputs, inputs of one task that disagree in shape, token ids outside ``[0, V)`` where ``V``
  is that task's input embedding's row count (likewise ``token_type_ids`` and ``position_ids``
  against their embeddings), sequences longer than the position embedding allows, more than
  ``max_rows`` rows or ``max_tokens`` tokens, unknown tasks, text for a bundle without a tokenizer.
  An ``IndexError``/``ValueError``/``TypeError``/``RuntimeError`` raised by the model's forward on
  inputs that passed these checks is also the input's (a shape the module does not take):
  400 naming it. 404 unknown route, 405 wrong method, 408 a request not received within
  ``timeout`` seconds, 411 no ``Content-Length`` (chunked bodies are refused), 413 a body over
  ``max_body_bytes`` (answered from the header, before reading the body; also to
  ``Expect: 100-continue``).
* **503** the server is full (``max_connections`` open connections: the next one is answered at
  once and closed, as ``uvicorn --limit-concurrency`` does) or out of memory for a request.
* **500** only for a fault of the server itself; the server keeps serving.

Defaults and why: ``max_tokens`` 8192 (rows x tokens of a request, all tasks together; a
BERT-base forward over 8192 tokens is ~1.4 TFLOP by the 2 x parameters per token estimate, some
seconds on a few CPU cores, so one request cannot hold the model for minutes; 0.27 s for the small
BERT of ``bench/bench_serve.py``); ``max_rows`` 256; ``max_body_bytes`` 4 MiB: a request at the token cap is
about 0.2 MiB of JSON (ids and mask), so 4 MiB leaves room for float inputs of plain modules
(~0.5 M numbers), while the worst-case JSON of that size (a list of one-element lists) parses into
~105 MB of Python objects (measured: 8 MiB -> 209 MB, 2.4 s); at most two bodies are parsed at a
time (the cores), so parsing memory stays bounded whatever the number of clients (bodies waiting
to be parsed hold at most ``max_connections`` x ``max_body_bytes``);
``timeout`` 30 s for headers and body together (a client trickling bytes is cut off; nginx's
header and body timeouts are 60 s each) and 5 s for an idle keep-alive connection (uvicorn's);
``max_connections`` 64. ``threads``: the model worker's torch intra-op threads (default torch's;
measured in ``bench/bench_serve.py`` on 2 cores shared with other work: 113-122 requests/s with
one thread, 13-16 with two, 70 with two and ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads spinning
at barriers while their partner is descheduled; give ``--threads 1`` on a shared machine).

Concurrency: each connection has its own thread (at most ``max_connections``); reading, parsing
and checking run there, so a slow client blocks nobody. The model itself runs in **one** worker
thread taking requests first come, first served: a :class:`MultiTaskModel` keeps the batch layout
of the running forward in its router and serialises calls with a lock, and its forward already uses
every intra-op thread, so running forwards side by side buys no throughput. First come, first
served and the token cap bound how long a short request waits behind large ones (measured in
``bench/bench_serve.py``).
"""

from __future__ import annotations

import errno
import inspect
import io
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import torch

from .errors import FlexMergeError
from .runtime import MultiTaskModel, _hf_config_dir, _Routed

__all__ = ["Limits", "make_server", "serve"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (see the module doc for the defaults' reasons)."""

    max_body_bytes: int = 4 * 2**20
    max_rows: int = 256
    max_tokens: int = 8192
    timeout: float = 30.0
    keepalive: float = 5.0
    max_connections: int = 64

    def check(self) -> "Limits":
        for name in ("max_body_bytes", "max_rows", "max_tokens", "max_connections"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FlexMergeError(f"--{name.replace('_', '-')} must be a positive integer; "
                                     f"got {getattr(self, name)!r}")
        for name in ("timeout", "keepalive"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (0 < v < 1e6):
                raise FlexMergeError(f"--{name} must be a positive number of seconds; got {v!r}")
        return self


class _BadRequest(Exception):
    def __init__(self, code: int, message: str, close: bool = False):
        super().__init__(message)
        self.code, self.message, self.close = code, " ".join(message.split()), close


MAX_RANK = 8
# forward arguments that are no row-first tensor a client may send
_DENY = {"self", "labels", "return_dict", "output_attentions", "output_hidden_states", "use_cache",
         "past_key_values", "cache_position", "head_mask", "decoder_head_mask", "cross_attn_head_mask",
         "encoder_outputs", "return_loss", "logits_to_keep", "num_logits_to_keep", "kwargs", "args"}
_ID_KEYS = {"input_ids", "decoder_input_ids", "token_type_ids", "position_ids",
            "attention_mask", "decoder_attention_mask"}
_POSITION_NAMES = ("position_embeddings", "wpe", "embed_positions")


def _depth(value: Any) -> int:
    d = 0
    while isinstance(value, list) and value:
        value = value[0]
        d += 1
        if d > MAX_RANK:
            break
    return d


def _to_tensor(value: Any, name: str, integer: bool = False) -> torch.Tensor:
    """A JSON value -> a tensor with a batch dimension, or a 400 naming ``name``."""
    if not isinstance(value, list):
        raise _BadRequest(400, f"input '{name}' is a {type(value).__name__}; give a nested list with a "
                          "batch dimension")
    if _depth(value) > MAX_RANK:
        raise _BadRequest(400, f"input '{name}' is nested deeper than {MAX_RANK} levels")
    try:
        t = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _BadRequest(400, f"input '{name}' is not a rectangular list of numbers ({msg})") from None
    if t.numel() == 0:
        raise _BadRequest(400, f"input '{name}' is empty (shape {list(t.shape)}); give at least one row")
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype == torch.int64):
        raise _BadRequest(400, f"input '{name}' holds {t.dtype} values; give numbers")
    if integer and t.is_floating_point():
        raise _BadRequest(400, f"input '{name}' holds non-integer numbers; token ids are integers")
    if t.is_floating_point():
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise _BadRequest(400, f"input '{name}' holds numbers that are not finite in float32")
    return t


def _finite_or_null(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return x


def _outputs(obj: Any) -> Any:
    """Model outputs as JSON values; non-finite floats become ``null`` (JSON has no NaN)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return _finite_or_null(t.tolist())
        return t.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _outputs(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_outputs(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def _reject_constant(name: str):
    raise _BadRequest(400, f"the body holds {name}, which is not JSON; give finite numbers")


class _Tokenizers:
    """Each task's tokenizer from its HF directory, loaded on first use (offline); one call at a time
    per tokenizer (fast tokenizers are not thread-safe)."""

    def __init__(self, mt: MultiTaskModel):
        self.mt = mt
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, task: str):
        with self._lock:
            if task not in self._cache:
                cdir = _hf_config_dir(self.mt.bundle, task)
                if cdir is None:
                    raise _BadRequest(400, f"task '{task}' has no tokenizer in the bundle; send token ids "
                                      "instead of text")
                import transformers

                try:
                    tok = transformers.AutoTokenizer.from_pretrained(str(cdir), local_files_only=True)
                except Exception as exc:
                    tok = exc
                self._cache[task] = (tok, threading.Lock())
            tok, lock = self._cache[task]
        if isinstance(tok, Exception):
            raise _BadRequest(400, f"task '{task}' has no usable tokenizer ({str(tok).splitlines()[0] if str(tok) else type(tok).__name__}); "
                              "send token ids instead of text")
        return tok, lock


class _App:
    """What the handler needs: the model, its input limits per task, the single model worker."""

    def __init__(self, mt: MultiTaskModel, limits: Limits, threads: int | None = None):
        self.mt = mt
        self.limits = limits.check()
        self.hf = getattr(mt, "_input_kind", "hf") == "hf"
        self.tokenizers = _Tokenizers(mt)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise FlexMergeError(f"threads must be a positive integer; got {threads!r}")
        init = (lambda: torch.set_num_threads(threads)) if threads else None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="flexmerge-serve-model", initializer=init)
        self.parsing = threading.BoundedSemaphore(2)
        model = mt.model
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.keys = [k for k, p in params.items() if k not in _DENY
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        # per task: how many rows each index input may address (None: unknown)
        self.vocab: dict[str, dict[str, int]] = {t: {} for t in mt.tasks}
        self.max_seq: dict[str, int | None] = {t: None for t in mt.tasks}
        if self.hf:
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            named = dict(model.named_modules())
            types = [m for n, m in named.items() if n.endswith("token_type_embeddings")]
            positions = [m for n, m in named.items() if n.rsplit(".", 1)[-1] in _POSITION_NAMES]
            for i, t in enumerate(mt.tasks):
                if emb is not None:
                    self.vocab[t]["input_ids"] = self.vocab[t]["decoder_input_ids"] = self._rows(emb, i)
                if len(types) == 1:
                    self.vocab[t]["token_type_ids"] = self._rows(types[0], i)
                if len(positions) == 1:
                    n = self._rows(positions[0], i)
                    if n is not None:
                        inner = positions[0].inner if isinstance(positions[0], _Routed) else positions[0]
                        offset = getattr(inner, "offset", None)
                        pad = getattr(inner, "padding_idx", None)
                        n -= offset if isinstance(offset, int) else (pad + 1 if isinstance(pad, int) else 0)
                        self.vocab[t]["position_ids"] = n
                        self.max_seq[t] = max(n, 1)

    @staticmethod
    def _rows(module, task_index: int) -> int | None:
        """Rows of the embedding ``module`` as task ``task_index`` runs it (task-specific
        embeddings may differ per task)."""
        if isinstance(module, _Routed):
            src = module._variants[module._mapping[task_index]][0]
            return int(src.shape[0])
        w = getattr(module, "weight", None)
        return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None

    # ---- request -> tensors -------------------------------------------------------------
    def prepare(self, batch: Any) -> dict:
        """JSON inputs ``{task: X}`` -> ``{task: tensors}``, every check of the module doc."""
        lim = self.limits
        if not isinstance(batch, dict) or not batch:
            raise _BadRequest(400, 'give "inputs": {task: inputs, ...} with at least one task')
        for t in batch:
            if t not in self.mt.tasks:
                raise _BadRequest(400, f"unknown task '{t}'; this bundle has: {', '.join(self.mt.tasks)}")
        texts = {}
        for t, x in batch.items():
            if isinstance(x, dict) and "text" in x:
                if not self.hf:
                    raise _BadRequest(400, "this bundle serves a plain torch module without a tokenizer; "
                                      "send tensors instead of text")
                if set(x) != {"text"}:
                    raise _BadRequest(400, f"task '{t}': give \"text\" alone (got {sorted(x)})")
                lines = [x["text"]] if isinstance(x["text"], str) else x["text"]
                if not isinstance(lines, list) or not lines or not all(isinstance(s, str) for s in lines):
                    raise _BadRequest(400, f"task '{t}': \"text\" must be a string or a non-empty list of strings")
                texts[t] = lines
        if sum(len(v) for v in texts.values()) > lim.max_rows:
            raise _BadRequest(400, f"the request has more than {lim.max_rows} rows; send fewer "
                              "(server option --max-rows)")
        out: dict[str, Any] = {}
        for t, x in batch.items():
            if t in texts:
                continue
            if not self.hf:
                if isinstance(x, dict) and set(x) == {"args"} and isinstance(x["args"], list) and x["args"]:
                    out[t] = tuple(_to_tensor(v, f"args[{i}]") for i, v in enumerate(x["args"]))
                elif isinstance(x, dict):
                    self._check_keys(t, x)
                    out[t] = {k: _to_tensor(v, k, k in _ID_KEYS) for k, v in x.items()}
                else:
                    out[t] = _to_tensor(x, "input")
            else:
                if not isinstance(x, dict) or not x:
                    raise _BadRequest(400, f"task '{t}': give a JSON object of inputs, e.g. "
                                      '{"input_ids": [[...]], "attention_mask": [[...]]} or {"text": [...]}')
                self._check_keys(t, x)
                out[t] = {k: _to_tensor(v, k, k in _ID_KEYS) for k, v in x.items()}
        if texts:
            self._tokenise(texts, out)
        self._check_shapes(out)
        return {t: out[t] for t in batch}

    def _check_keys(self, task: str, x: dict) -> None:
        if self.var_kw and not self.keys:
            return
        unknown = [k for k in x if k not in self.keys]
        if unknown:
            raise _BadRequest(400, f"task '{task}': unknown input '{unknown[0]}'; this model takes "
                              f"{', '.join(self.keys) or 'positional tensors'}")
        if self.hf and "input_ids" in self.keys and not ({"input_ids", "inputs_embeds"} & set(x)):
            raise _BadRequest(400, f"task '{task}': give input_ids (or text)")

    def _tokenise(self, texts: dict, out: dict) -> None:
        seq_cap = min([self.limits.max_tokens] + [self.max_seq[t] for t in texts if self.max_seq[t]])
        encoded, longest = {}, 0
        for t, lines in texts.items():
            tok, lock = self.tokenizers(t)
            with lock:
                enc = tok(lines, truncation=True, max_length=seq_cap)
            encoded[t] = (tok, lock, enc)
            longest = max([longest] + [len(ids) for ids in enc["input_ids"]])
        if longest == 0:
            raise _BadRequest(400, "the texts give no tokens")
        for t, (tok, lock, enc) in encoded.items():
            with lock:
                padded = tok.pad(enc, padding="max_length", max_length=longest, return_tensors="pt")
            out[t] = {k: v.to(torch.int64) if not v.is_floating_point() else v for k, v in padded.items()
                      if k in self.keys or not self.keys}

    def _check_shapes(self, out: dict) -> None:
        lim = self.limits
        rows_total = tokens_total = 0
        for t, x in out.items():
            items = list(x.items()) if isinstance(x, dict) else \
                [(f"args[{i}]", v) for i, v in enumerate(x)] if isinstance(x, tuple) else [("input", x)]
            rows = items[0][1].shape[0]
            for k, v in items:
                if v.shape[0] != rows:
                    raise _BadRequest(400, f"task '{t}': input '{k}' has {v.shape[0]} rows but "
                                      f"'{items[0][0]}' has {rows}; give every input the same rows")
            rows_total += rows
            if not self.hf:
                continue
            ids = [(k, v) for k, v in items if k in _ID_KEYS]
            if ids:
                k0, v0 = ids[0]
                for k, v in ids:
                    if v.dim() != 2:
                        raise _BadRequest(400, f"task '{t}': input '{k}' has shape {list(v.shape)}; give "
                                          "[rows, tokens]")
                    if v.shape != v0.shape:
                        raise _BadRequest(400, f"task '{t}': input '{k}' has shape {list(v.shape)} but "
                                          f"'{k0}' has {list(v0.shape)}; give them the same shape")
                seq = v0.shape[1]
                tokens_total += rows * seq
                cap = self.max_seq[t]
                if cap is not None and seq > cap:
                    raise _BadRequest(400, f"task '{t}': sequences of {seq} tokens are longer than the model's "
                                      f"{cap} positions; send at most {cap} tokens per row")
                for k, v in ids:
                    if k in ("attention_mask", "decoder_attention_mask"):
                        if bool(((v != 0) & (v != 1)).any()):
                            raise _BadRequest(400, f"task '{t}': input '{k}' must hold only 0 and 1")
                        continue
                    lo, hi = int(v.min()), int(v.max())
                    n = self.vocab[t].get(k)
                    if lo < 0 or (n is not None and hi >= n):
                        bad = lo if lo < 0 else hi
                        raise _BadRequest(400, f"task '{t}': input '{k}' holds {bad}, outside [0, {n}) for this "
                                          f"model" if n is not None else
                                          f"task '{t}': input '{k}' holds {bad}; ids are >= 0")
        if rows_total > lim.max_rows:
            raise _BadRequest(400, f"the request has {rows_total} rows, more than {lim.max_rows}; send fewer "
                              "(server option --max-rows)")
        if tokens_total > lim.max_tokens:
            raise _BadRequest(400, f"the request has {tokens_total} tokens (rows x length), more than "
                              f"{lim.max_tokens}; send fewer (server option --max-tokens)")

    # ---- the model ----------------------------------------------------------------------
    def run(self, inputs: dict) -> dict:
        """The forward, on the model worker; errors raised by the model on checked inputs are the
        inputs' (400), an exhausted memory is 503."""
        try:
            return self.mt(inputs)
        except FlexMergeError as exc:
            raise _BadRequest(400, str(exc)) from None
        except MemoryError:
            raise _BadRequest(503, "the server ran out of memory for this request; send fewer rows") from None
        except (IndexError, ValueError, TypeError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else ""
            if isinstance(exc, RuntimeError) and ("out of memory" in msg or "allocate" in msg):
                raise _BadRequest(503, "the server ran out of memory for this request; send fewer rows") from None
            raise _BadRequest(400, f"the model cannot take these inputs ({type(exc).__name__}: {msg[:300]})") from None


class _DeadlineIO(io.RawIOBase):
    """The socket's reading side with one deadline for a whole request (headers and body), so a
    client trickling bytes is cut off however slowly it sends."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = time.monotonic() + 30.0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


_CL = re.compile(r"[0-9]{1,4000}")  # any length of digits is a number; huge ones answer 413


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections``; the next one gets 503 at once."""

    daemon_threads = True
    app: _App | None = None

    def __init__(self, addr, handler, limits: Limits):
        self.limits = limits.check()
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": f"the server is busy ({self.limits.max_connections} open connections); "
                                        "retry shortly"}).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True).start()

    def _serve_one(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # the client went away or was too slow: nothing to answer
        print(f"flexmerge serve: error on a connection from {client_address[0]}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def server_close(self):
        super().server_close()
        if self.app is not None:
            self.app.worker.shutdown(wait=False, cancel_futures=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "flexmerge"
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, fmt, *args):  # quiet by default
        pass

    def setup(self):
        super().setup()
        self._io = _DeadlineIO(self.connection)
        self._io.deadline = time.monotonic() + self.server.limits.timeout
        self.rfile = io.BufferedReader(self._io, 65536)

    def handle_one_request(self):
        # an idle keep-alive connection waits at most `keepalive` for its next request line
        if getattr(self, "_answered", False):
            self._io.deadline = time.monotonic() + self.server.limits.keepalive
        super().handle_one_request()  # a request line not received in time: closed silently

    def parse_request(self):
        self._io.deadline = time.monotonic() + self.server.limits.timeout  # headers and body
        try:
            return super().parse_request()
        except TimeoutError:
            self._send_safely(408, "the request did not arrive in time; send it at once")
            self.close_connection = True
            return False

    def __getattr__(self, name):
        if name.startswith("do_"):  # any other method: 405, not http.server's 501
            return self._method_not_allowed
        raise AttributeError(name)

    # ---- replies ------------------------------------------------------------------------
    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, headers too long...) as JSON, then close."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # a status line, whatever the request line was
        self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _reply(self, code: int, body: dict, headers: dict | None = None) -> None:
        try:
            data = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            code, data = 500, json.dumps({"error": f"the outputs cannot be written as JSON ({exc})"}).encode()
        self.connection.settimeout(self.server.limits.timeout)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._answered = True

    def _send_safely(self, code: int, message: str) -> None:
        try:
            if getattr(self, "request_version", None) is None:
                self.request_version = "HTTP/1.1"
            if not hasattr(self, "command"):
                self.command = None
            self._reply(code, {"error": message})
        except OSError:
            pass

    def _linger(self, limit: int) -> None:
        """After an early answer, read and drop what the client still sends (up to ``limit``
        bytes, 2 s), so it can read the answer instead of a connection reset."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            end = time.monotonic() + 2.0
            left = limit
            while left > 0 and time.monotonic() < end:
                self.connection.settimeout(max(0.01, end - time.monotonic()))
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _method_not_allowed(self):
        path = urlsplit(self.path).path.rstrip("/")
        allow = "GET" if path == "/tasks" else "POST" if path == "/batch" or path.startswith("/tasks/") else None
        if allow is None:
            self.close_connection = True
            self._reply(404, {"error": f"no route {path or '/'}; use GET /tasks, POST /tasks/<task>, POST /batch"})
            return
        self.close_connection = True
        self._reply(405, {"error": f"{self.command} is not allowed on {path}; use {allow}"}, {"Allow": allow})

    # ---- routes -------------------------------------------------------------------------
    def do_GET(self):
        path = urlsplit(self.path).path.rstrip("/")
        app = self.server.app
        if path == "/tasks":
            self._reply(200, {"tasks": app.mt.tasks, "size_units": app.mt.bundle.size_units,
                              "method": app.mt.bundle.method})
        else:
            self._method_not_allowed()

    do_HEAD = do_GET

    def _length(self) -> int:
        """The body's length from the headers, or a 400/411/413 (checked before reading)."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _BadRequest(411, "chunked (Transfer-Encoding) bodies are not supported; send Content-Length",
                              close=True)
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _BadRequest(411, "the request has no Content-Length; send the body with its length", close=True)
        if len(set(v.strip() for v in values)) != 1 or not _CL.fullmatch(values[0].strip()):
            raise _BadRequest(400, f"Content-Length {', '.join(values)!r} is not one non-negative integer",
                              close=True)
        n = int(values[0].strip())
        if n > self.server.limits.max_body_bytes:
            raise _BadRequest(413, f"the body of {n} bytes is over the server's limit of "
                              f"{self.server.limits.max_body_bytes}; send less (server option --max-body-bytes)",
                              close=True)
        return n

    def handle_expect_100(self):
        if self.command == "POST":
            try:
                self._length()
            except _BadRequest as exc:
                self.close_connection = True
                self._reply(exc.code, {"error": exc.message})
                return False
        return super().handle_expect_100()

    def do_POST(self):
        app = self.server.app
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/batch":
            single = None
        elif path.startswith("/tasks/"):
            single = unquote(path[len("/tasks/"):])
        else:
            self._method_not_allowed()
            return
        try:
            n = self._length()
        except _BadRequest as exc:
            self.close_connection = True
            self._reply(exc.code, {"error": exc.message})
            if exc.code == 413:
                self._linger(min(int(self.headers.get("Content-Length", "0").strip() or 0)
                                 if _CL.fullmatch(self.headers.get("Content-Length", "").strip()) else 0, 64 << 20))
            return
        try:
            raw = self.rfile.read(n) if n else b""
        except TimeoutError:
            self._send_safely(408, "the body did not arrive in time; send it at once")
            self.close_connection = True
            return
        if len(raw) < n:  # the client closed before sending its body: nobody to answer
            self.close_connection = True
            return
        self.connection.settimeout(self.server.limits.timeout)
        try:
            with app.parsing:
                inputs = self._parse(raw, single)
                del raw
                prepared = app.prepare(inputs)
                del inputs
            outputs = app.worker.submit(app.run, prepared).result()
            del prepared
            with app.parsing:
                result = _outputs(outputs[single]) if single is not None else \
                    {t: _outputs(v) for t, v in outputs.items()}
            self._reply(200, {"outputs": result})
        except _BadRequest as exc:
            if exc.close:
                self.close_connection = True
            self._reply(exc.code, {"error": exc.message})
        except MemoryError:
            self._reply(503, {"error": "the server ran out of memory for this request; send fewer rows"})
        except Exception as exc:  # a fault of the server: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            msg = str(exc).splitlines()[0] if str(exc) else ""
            self._reply(500, {"error": f"internal error: {type(exc).__name__}: {msg[:300]}"})

    @staticmethod
    def _parse(raw: bytes, single: str | None) -> dict:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadRequest(400, f"the body is not UTF-8 (byte {exc.start})") from None
        try:
            body = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise _BadRequest(400, f"the body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        except RecursionError:
            raise _BadRequest(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, f'the body is a JSON {type(body).__name__}; give an object {{"inputs": ...}}')
        if "inputs" not in body or set(body) != {"inputs"}:
            extra = sorted(set(body) - {"inputs"})
            raise _BadRequest(400, 'the body must be {"inputs": ...}' +
                              (f"; unknown key '{extra[0]}'" if extra else ""))
        return {single: body["inputs"]} if single is not None else body["inputs"]


def _bind(host: str, port: int, limits: Limits) -> _Server:
    """The listening server, or one line naming the address and the option to change."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise FlexMergeError(f"port {port} is not a TCP port; choose one in 0-65535 with --port")
    try:
        return _Server((host, port), _Handler, limits)
    except socket.gaierror as exc:
        raise FlexMergeError(f"cannot resolve host '{host}' ({exc.strerror}); choose another with --host") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise FlexMergeError(f"port {port} is in use on {host}; choose another with --port") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise FlexMergeError(f"no permission to listen on port {port} of {host} (ports below 1024 need "
                                 "privileges); choose another with --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise FlexMergeError(f"address {host} is not one of this machine's; choose another with --host") from None
        raise FlexMergeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another "
                             "--host or --port") from None


def make_server(mt: MultiTaskModel, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits | None = None, threads: int | None = None) -> ThreadingHTTPServer:
    """An HTTP server (not started) answering the routes of the module doc for ``mt``;
    ``threads``: torch intra-op threads of the model worker (None: torch's default)."""
    limits = limits or Limits()
    server = _bind(host, port, limits)
    try:
        server.app = _App(mt, limits, threads)
    except BaseException:
        server.server_close()
        raise
    return server


def serve(bundle: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
          rebuild_policy: str = "on_the_fly", cache_budget_bytes: int | None = None,
          verify: bool = True, model_factory=None, limits: Limits | None = None,
          threads: int | None = None) -> None:
    """Load ``bundle`` and serve it until interrupted (``flexmerge serve``). The port is taken
    before the bundle is loaded, so a busy port fails at once."""
    limits = (limits or Limits()).check()
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise FlexMergeError(f"--threads must be a positive integer; got {threads!r}")
    server = _bind(host, port, limits)
    try:
        mt = MultiTaskModel.from_bundle(Path(bundle), model_factory=model_factory, rebuild_policy=rebuild_policy,
                                        cache_budget_bytes=cache_budget_bytes, verify=verify)
        server.app = _App(mt, limits, threads)
        print(f"serving {len(mt.tasks)} tasks ({', '.join(mt.tasks)}) on http://{host}:{server.server_port}",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C is how a running server is stopped: exit 0
            pass
    finally:
        server.server_close()
