"""The HTTP side of ``flexmerge serve``: one thread per connection up to a limit, a deadline per
request, the routes, and binding a port with one-line errors (the package doc lists the routes and
status codes)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import FlexMergeError
from ..runtime import MultiTaskModel
from .app import _App
from .payload import Limits, _BadRequest, _outputs, _reject_constant

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
