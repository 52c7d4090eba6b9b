"""flexmerge serve: every request gets an answer; 4xx for what the client sent, 5xx only for server
faults; slow clients block nobody; the server keeps serving after each bad request."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest
import torch
from helpers import one_thread, save_hf_bert_tasks  # noqa: F401  (one_thread: an autouse fixture)
import torch.nn as nn

from conftest import write_checkpoint
from flexmerge import FlexMergeError, MultiTaskModel
from flexmerge.engine import FlexMerge
from flexmerge.serve import Limits, make_server, serve

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(25)]  # 30 ids
LABELS = {"sst2": 2, "trec": 6}
POSITIONS = 16
LIMITS = Limits(max_body_bytes=64 * 1024, max_rows=8, max_tokens=64, timeout=2.0, keepalive=1.0,
                max_connections=16)




def bert_config(labels):
    return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=POSITIONS, num_labels=labels)


@pytest.fixture(scope="module")
def hf_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-hf")
    cfg = save_hf_bert_tasks(tmp, LABELS, bert_config, vocab=VOCAB)
    out = tmp / "bundle"
    FlexMerge(dict(cfg, method="task_arithmetic")).merge(1.0, out=out)
    return out


class Client:
    def __init__(self, server):
        self.server = server
        self.port = server.server_port

    def request(self, method, path, body=None, headers=None, raw=False):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, data, headers or {})
            r = conn.getresponse()
            text = r.read()
            return r.status, (text if raw else json.loads(text) if text else None)
        finally:
            conn.close()

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def raw(self, data: bytes, read=True) -> bytes:
        """Send ``data`` on a fresh socket; the server's whole answer (until it closes)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        try:
            s.sendall(data)
            if not read:
                return b""
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk
        finally:
            s.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def ids_body(ids, mask=None):
    return {"inputs": {"input_ids": ids, "attention_mask": mask or [[1] * len(r) for r in ids]}}


@pytest.fixture(scope="module")
def hf(hf_bundle):
    mt = MultiTaskModel.from_bundle(hf_bundle)
    server = make_server(mt, "127.0.0.1", 0, LIMITS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = Client(server)
    client.mt = mt
    yield client
    server.shutdown()
    server.server_close()


def assert_alive(client):
    """A valid request still gets the model's exact answer."""
    ids = [[2, 7, 8, 9, 3], [2, 10, 11, 3, 0]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    code, body = client.post("/tasks/trec", ids_body(ids, mask))
    assert code == 200, body
    expect = client.mt({"trec": {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}})
    assert torch.equal(torch.tensor(body["outputs"]["logits"]), expect["trec"].logits)


# --------------------------------------------------------------------------- valid requests
def test_valid_requests(hf):
    assert hf.request("GET", "/tasks")[1]["tasks"] == ["sst2", "trec"]
    assert_alive(hf)
    ids = [[2, 5, 6, 3]]
    code, body = hf.post("/batch", {"inputs": {t: {"input_ids": ids} for t in LABELS}})
    assert code == 200
    for t, n in LABELS.items():
        assert len(body["outputs"][t]["logits"][0]) == n
    code, body = hf.post("/tasks/sst2", {"inputs": {"text": ["w1 w2 w3", "w4"]}})
    assert code == 200 and len(body["outputs"]["logits"]) == 2
    # 8 rows x 8 tokens: exactly at the row and token caps
    code, _ = hf.post("/tasks/sst2", ids_body([[1] * 8] * 8))
    assert code == 200


# --------------------------------------------------------------------------- body size and length
def test_body_over_the_cap_is_413_before_reading(hf):
    for n in (LIMITS.max_body_bytes + 1, 2**40):  # 1 TiB: answered from the header alone
        ans = hf.raw(b"POST /batch HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n)
        assert status_of(ans) == 413 and b"--max-body-bytes" in ans
    big = json.dumps({"inputs": {"input_ids": [[1] * 40000]}}).encode()
    assert len(big) > LIMITS.max_body_bytes
    assert hf.post("/tasks/sst2", big)[0] == 413
    # Expect: 100-continue: 413 instead of "100 Continue"
    ans = hf.raw(b"POST /batch HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                 % (LIMITS.max_body_bytes + 1))
    assert status_of(ans) == 413 and b"100 Continue" not in ans
    assert_alive(hf)


@pytest.mark.parametrize("header,code", [
    (b"", 411),                                          # no Content-Length
    (b"Content-Length: -5\r\n", 400),
    (b"Content-Length: abc\r\n", 400),
    (b"Content-Length: +5\r\n", 400),
    (b"Content-Length: 1e3\r\n", 400),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    (b"Content-Length: " + b"9" * 31 + b"\r\n", 413),              # a huge number is too large, not malformed
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 411),
])
def test_bad_content_length(hf, header, code):
    ans = hf.raw(b"POST /tasks/sst2 HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
    assert status_of(ans) == code
    assert "error" in json.loads(ans.split(b"\r\n\r\n", 1)[1])
    assert_alive(hf)


# --------------------------------------------------------------------------- 400: what the model cannot take
ok_mask = [[1, 1, 1]]
BAD = {
    "id = vocabulary size": ("/tasks/sst2", ids_body([[2, 30, 3]])),
    "negative id": ("/tasks/sst2", ids_body([[2, -1, 3]])),
    "huge id": ("/tasks/sst2", ids_body([[2, 2**62, 3]])),
    "id over int64": ("/tasks/sst2", ids_body([[2, 2**70, 3]])),
    "token type 2": ("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]], "token_type_ids": [[0, 2, 0]]}}),
    "position id 16": ("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]], "position_ids": [[0, 1, 16]]}}),
    "float ids": ("/tasks/sst2", ids_body([[2.0, 5.5, 3.0]], ok_mask)),
    "float ids that look whole": ("/tasks/sst2", {"inputs": {"input_ids": [[2.0, 5.0, 3.0]]}}),
    "bool ids": ("/tasks/sst2", {"inputs": {"input_ids": [[True, False]]}}),
    "string ids": ("/tasks/sst2", ids_body([["a", "b", "c"]], ok_mask)),
    "null ids": ("/tasks/sst2", {"inputs": {"input_ids": [[None, 1]]}}),
    "dict in ids": ("/tasks/sst2", {"inputs": {"input_ids": [[{"a": 1}]]}}),
    "ragged": ("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3], [2, 3]]}}),
    "scalar ids": ("/tasks/sst2", {"inputs": {"input_ids": 5}}),
    "rank 1": ("/tasks/sst2", {"inputs": {"input_ids": [2, 5, 3]}}),
    "rank 3": ("/tasks/sst2", {"inputs": {"input_ids": [[[2, 5, 3]]]}}),
    "deep list": ("/tasks/sst2", {"inputs": {"input_ids": json.loads("[" * 50 + "1" + "]" * 50)}}),
    "empty batch": ("/tasks/sst2", {"inputs": {"input_ids": []}}),
    "empty rows": ("/tasks/sst2", {"inputs": {"input_ids": [[]]}}),
    "mask shape differs": ("/tasks/sst2", ids_body([[2, 5, 3]], [[1, 1]])),
    "mask rows differ": ("/tasks/sst2", ids_body([[2, 5, 3]], [[1, 1, 1], [1, 1, 1]])),
    "mask value 2": ("/tasks/sst2", ids_body([[2, 5, 3]], [[1, 2, 1]])),
    "too many rows": ("/tasks/sst2", ids_body([[2, 3]] * 9)),
    "too long for the positions": ("/tasks/sst2", ids_body([[1] * (POSITIONS + 1)])),
    "too many tokens": ("/tasks/sst2", ids_body([[1] * 9] * 8)),
    "too many text rows": ("/tasks/sst2", {"inputs": {"text": ["w1"] * 9}}),
    "text not strings": ("/tasks/sst2", {"inputs": {"text": [1, 2]}}),
    "empty text list": ("/tasks/sst2", {"inputs": {"text": []}}),
    "text with other keys": ("/tasks/sst2", {"inputs": {"text": ["w1"], "input_ids": [[1]]}}),
    "unknown task": ("/tasks/nope", ids_body([[2, 5, 3]])),
    "unknown task in batch": ("/batch", {"inputs": {"nope": {"input_ids": [[2, 5, 3]]}}}),
    "empty batch of tasks": ("/batch", {"inputs": {}}),
    "batch not an object": ("/batch", {"inputs": [[1, 2]]}),
    "unknown input key": ("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]], "foo": [[1, 2, 3]]}}),
    "labels": ("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]], "labels": [1]}}),
    "return_dict": ("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]], "return_dict": False}}),
    "mask without ids": ("/tasks/sst2", {"inputs": {"attention_mask": [[1, 1]]}}),
    "inputs a list": ("/tasks/sst2", {"inputs": [[2, 5, 3]]}),
    "no inputs key": ("/tasks/sst2", {"input_ids": [[2, 5, 3]]}),
    "extra top-level key": ("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]]}, "x": 1}),
    "tasks disagree on length": ("/batch", {"inputs": {"sst2": {"input_ids": [[2, 5, 3]]},
                                                        "trec": {"input_ids": [[2, 5]]}}}),
    "body a list": ("/batch", [1, 2]),
    "body a string": ("/batch", "hello"),
    "body null": ("/batch", None),
}
RAW_BAD = {
    "not JSON": b"{inputs: ",
    "empty body": b"",
    "invalid UTF-8": b'{"inputs": {"input_ids": [[1]]}, "\xff\xfe": 1}',
    "UTF-16": json.dumps({"inputs": {"input_ids": [[1]]}}).encode("utf-16"),
    "deeply nested JSON": b'{"inputs": ' + b"[" * 30000 + b"]" * 30000 + b"}",
    "NaN": b'{"inputs": {"inputs_embeds": [[[NaN]]]}}',
    "1e400": b'{"inputs": {"inputs_embeds": [[[1e400]]]}}',
    "float32 overflow": b'{"inputs": {"inputs_embeds": [[[1e39]]]}}',
    "trailing garbage": b'{"inputs": {"input_ids": [[1]]}} x',
}


@pytest.mark.parametrize("case", list(BAD))
def test_400_for_what_the_model_cannot_take(hf, case):
    path, body = BAD[case]
    code, answer = hf.post(path, json.dumps(body).encode())
    assert code == 400, (case, answer)
    assert answer["error"]


@pytest.mark.parametrize("case", list(RAW_BAD))
def test_400_for_bodies_that_are_not_usable_json(hf, case):
    code, answer = hf.post("/tasks/sst2", RAW_BAD[case])
    assert code == 400, (case, answer)


def test_400_messages_name_the_limit(hf):
    code, body = hf.post("/tasks/sst2", ids_body([[2, 30, 3]]))
    assert "input_ids" in body["error"] and "outside [0, 30)" in body["error"]
    code, body = hf.post("/tasks/sst2", ids_body([[1] * 9] * 8))
    assert "--max-tokens" in body["error"]
    code, body = hf.post("/tasks/sst2", ids_body([[1] * (POSITIONS + 1)]))
    assert f"longer than the model's {POSITIONS} positions" in body["error"]
    code, body = hf.post("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]], "token_type_ids": [[0, 2, 0]]}})
    assert "token_type_ids" in body["error"] and "outside [0, 2)" in body["error"]
    code, body = hf.post("/tasks/sst2", {"inputs": {"input_ids": [[2, 5, 3]], "foo": [[1]]}})
    assert "unknown input 'foo'" in body["error"] and "input_ids" in body["error"]
    assert_alive(hf)


def test_every_bad_request_leaves_the_server_serving(hf):
    for path, body in BAD.values():
        hf.post(path, json.dumps(body).encode())
    for raw in RAW_BAD.values():
        hf.post("/tasks/sst2", raw)
    assert_alive(hf)


# --------------------------------------------------------------------------- routes and methods
@pytest.mark.parametrize("method,path,code", [
    ("GET", "/", 404), ("GET", "/nope", 404), ("POST", "/nope", 404), ("GET", "/tasks/sst2", 405),
    ("GET", "/batch", 405), ("POST", "/tasks", 405), ("PUT", "/tasks/sst2", 405),
    ("DELETE", "/batch", 405), ("PATCH", "/tasks", 405), ("OPTIONS", "/batch", 405), ("FOO", "/batch", 405),
])
def test_unknown_routes_and_methods(hf, method, path, code):
    status, body = hf.request(method, path, b"{}" if method != "GET" else None)
    assert status == code and body["error"]
    assert_alive(hf)


def test_malformed_request_line_is_4xx(hf):
    assert status_of(hf.raw(b"GARBAGE\r\n\r\n")) == 400
    assert status_of(hf.raw(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")) == 414
    assert_alive(hf)


# --------------------------------------------------------------------------- server faults
def test_a_server_fault_is_500_with_json_and_the_server_keeps_serving(hf, monkeypatch, capsys):
    def broken(inputs):
        raise KeyError("a bug")

    monkeypatch.setattr(hf.server.app, "run", broken)
    code, body = hf.post("/tasks/sst2", ids_body([[2, 5, 3]]))
    assert code == 500 and "KeyError" in body["error"]
    monkeypatch.undo()
    assert_alive(hf)


# --------------------------------------------------------------------------- slow clients
def test_slow_clients_block_nobody_and_are_cut_off(hf):
    silent = socket.create_connection(("127.0.0.1", hf.port), timeout=20)  # sends nothing
    headers = socket.create_connection(("127.0.0.1", hf.port), timeout=20)
    headers.sendall(b"POST /tasks/sst2 HTTP/1.1\r\nHost: x\r\n")            # headers never end
    body = socket.create_connection(("127.0.0.1", hf.port), timeout=20)
    body.sendall(b"POST /tasks/sst2 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")  # body never ends
    try:
        for _ in range(3):
            assert_alive(hf)       # answered while the three are stuck
        # each stuck client is answered 408 (or closed, for the one that sent nothing) once its
        # request time (LIMITS.timeout) is over
        assert silent.recv(100) == b""
        assert status_of(headers.recv(1000)) == 408
        assert status_of(body.recv(1000)) == 408
    finally:
        for s in (silent, headers, body):
            s.close()


def test_trickling_body_is_cut_off_at_the_request_deadline(hf):
    s = socket.create_connection(("127.0.0.1", hf.port), timeout=20)
    try:
        s.sendall(b"POST /tasks/sst2 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        start = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - start < 15:  # a byte every 50 ms never ends the request
            try:
                s.sendall(b" ")
            except OSError:
                break
            s.settimeout(0.05)
            try:
                answer = s.recv(1000)
            except TimeoutError:
                pass
        assert status_of(answer) == 408
        assert_alive(hf)
    finally:
        s.close()


def test_concurrent_requests_each_get_their_own_answer(hf):
    rows = {t: [[2, 5 + i, 6 + i, 3] for i in range(n + 1)] for n, t in enumerate(LABELS)}
    expect = hf.mt({t: {"input_ids": torch.tensor(r)} for t, r in rows.items()})
    results, errors = [], []

    def client(k):
        try:
            t = list(LABELS)[k % 2]
            code, body = hf.post(f"/tasks/{t}", {"inputs": {"input_ids": rows[t]}})
            results.append((t, code, body))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 12
    for t, code, body in results:
        assert code == 200
        torch.testing.assert_close(torch.tensor(body["outputs"]["logits"]), expect[t].logits, atol=1e-5, rtol=0)


def test_connections_over_the_limit_get_503_and_the_server_recovers(hf_bundle):
    mt = MultiTaskModel.from_bundle(hf_bundle)
    server = make_server(mt, "127.0.0.1", 0, Limits(max_connections=2, timeout=5.0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(server)
    client.mt = mt
    held = [socket.create_connection(("127.0.0.1", server.server_port), timeout=20) for _ in range(2)]
    try:
        time.sleep(0.2)  # let the server accept both
        ans = client.raw(b"GET /tasks HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(ans) == 503 and b"Retry-After" in ans
    finally:
        for s in held:
            s.close()
    for _ in range(50):  # the two slots come back once the server sees the sockets close
        if client.raw(b"GET /tasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200"):
            break
        time.sleep(0.1)
    assert_alive(client)
    server.shutdown()
    server.server_close()


def test_keep_alive_serves_several_requests_on_one_connection(hf):
    conn = http.client.HTTPConnection("127.0.0.1", hf.port, timeout=20)
    try:
        for _ in range(3):
            conn.request("POST", "/tasks/sst2", json.dumps(ids_body([[2, 5, 3]])).encode())
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["outputs"]["logits"]
        conn.request("GET", "/tasks")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


# --------------------------------------------------------------------------- port in use / permission
def test_port_in_use_is_one_line_naming_the_port(hf_bundle, capsys):
    from flexmerge.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(FlexMergeError) as err:
            serve(hf_bundle, port=port)
        assert str(err.value) == f"port {port} is in use on 127.0.0.1; choose another with --port"
        assert main(["serve", str(hf_bundle), "--port", str(port)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"error: port {port} is in use on 127.0.0.1; choose another with --port"]
    finally:
        taken.close()


@pytest.mark.parametrize("port", [-1, 65536, 10**9])
def test_port_out_of_range(hf_bundle, port):
    with pytest.raises(FlexMergeError, match="--port"):
        serve(hf_bundle, port=port)


def test_unknown_host_is_one_line(hf_bundle):
    with pytest.raises(FlexMergeError, match="--host"):
        serve(hf_bundle, host="no-such-host.invalid", port=0)
    with pytest.raises(FlexMergeError, match="--host"):
        serve(hf_bundle, host="192.0.2.1", port=0)  # TEST-NET: not this machine's


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may listen on any port")
def test_privileged_port_is_one_line(hf_bundle):
    with pytest.raises(FlexMergeError, match="no permission to listen on port 80 .*--port"):
        serve(hf_bundle, port=80)


@pytest.mark.parametrize("bad", [dict(max_body_bytes=0), dict(max_rows=-1), dict(timeout=0),
                                 dict(max_connections=0), dict(max_tokens=1.5)])
def test_bad_limits(hf_bundle, bad):
    with pytest.raises(FlexMergeError, match="--" + next(iter(bad)).replace("_", "-")):
        serve(hf_bundle, port=0, limits=Limits(**bad))


# --------------------------------------------------------------------------- plain (non-HF) bundles
class Tiny(nn.Module):
    def __init__(self, labels=3):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.classifier = nn.Linear(8, labels)

    def forward(self, x):
        return self.classifier(self.embed(x).mean(1))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-plain")
    torch.manual_seed(0)
    base = Tiny().state_dict()
    tasks = {}
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        tasks[f"t{i}"] = str(write_checkpoint({k: v + 0.1 * torch.randn(v.shape, generator=g)
                                               for k, v in base.items()}, tmp / f"t{i}", "safetensors"))
    out = tmp / "b"
    FlexMerge({"base": str(write_checkpoint(base, tmp / "base", "safetensors")), "tasks": tasks,
               "method": "task_arithmetic"}).merge(1.0, out=out)
    mt = MultiTaskModel.from_bundle(out, model_factory=lambda: Tiny())
    server = make_server(mt, "127.0.0.1", 0, LIMITS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(server)
    client.mt = mt
    yield client
    server.shutdown()
    server.server_close()


def test_plain_bundle(plain):
    x = [[1, 2, 3], [4, 5, 6]]
    code, body = plain.post("/tasks/t1", {"inputs": x})
    assert code == 200
    assert torch.equal(torch.tensor(body["outputs"]), plain.mt({"t1": torch.tensor(x)})["t1"])
    assert plain.post("/tasks/t1", {"inputs": {"x": x}})[0] == 200
    for bad in ({"text": ["hello"]}, {"y": x}, [[1, 16]], [[-1, 2]], [[1.5, 2]], {"args": [[[1.0, 2.0]]]},
                [1, 2, 3], [[1, 2], [3]], []):
        code, answer = plain.post("/tasks/t1", {"inputs": bad})
        assert code == 400, (bad, answer)
    assert plain.post("/tasks/t1", {"inputs": {"text": ["a"]}})[1]["error"].startswith("this bundle serves a plain")
    code, body = plain.post("/tasks/t1", {"inputs": x})
    assert code == 200


def test_non_finite_outputs_are_json_null():
    from flexmerge.serve.payload import _outputs
    out = _outputs({"logits": torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]]), "n": float("-inf")})
    assert out == {"logits": [[1.0, None], [None, -2.0]], "n": None}
    assert json.loads(json.dumps(out, allow_nan=False)) == out
