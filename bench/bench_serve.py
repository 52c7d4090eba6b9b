"""Benchmark: ``flexmerge serve`` under a bounded load of mixed valid and malformed requests.

The target: serve answers every request. Builds a small HF bundle in a temporary
directory (3 tasks of a 4-layer BERT, hidden 64, vocabulary 1000, 128 positions, each task with its
own head and WordPiece tokenizer; task arithmetic at size 2), starts the installed ``flexmerge
serve`` as a subprocess on a free localhost port, and runs ``--clients`` concurrent clients for
``--requests`` requests (a new connection each), drawn with a fixed seed from these classes:

* ``small``   valid, 1 row x 16 token ids, ``POST /tasks/<task>``      -> 200
* ``batch``   valid, 3 tasks x 4 rows x 32 ids, ``POST /batch``        -> 200
* ``text``    valid, 2 texts to tokenise                              -> 200
* ``large``   valid, 64 rows x 128 ids (the default ``--max-tokens`` of 8192) -> 200
* ``bad_id``  a token id equal to the vocabulary size                 -> 400
* ``bad_json`` a truncated JSON body                                  -> 400
* ``ragged``  rows of different lengths                               -> 400
* ``huge``    a body one byte over ``--max-body-bytes`` (4 MiB), sent in full -> 413
* ``no_route`` ``POST /nope``                                         -> 404

Meanwhile ``--slow`` more clients keep sending requests whose body trickles (a byte every 0.2 s)
and never ends: each is cut off with 408 after the server's ``--timeout`` (2 s here), and must not
slow the others down. The run stops by itself after the fixed count; the server is stopped with
SIGINT.

Prints requests/s (all classes but ``slow``), latency p50/p90/p99 per class, the count of 5xx
answers (must be 0), of lost answers (no HTTP answer at all; must be 0) and of unexpected status
codes (must be 0), and the server's resident memory (VmRSS) after warm-up, at half of the requests
and at the end (memory flat).

    python bench/bench_serve.py [--requests 2000] [--clients 8] [--slow 4] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from flexmerge.engine import FlexMerge  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]  # 1000 ids
LABELS = {"sst2": 2, "trec": 6, "agnews": 4}
MAX_BODY = 4 * 2**20
TIMEOUT = 2.0
CLASSES = {  # name: (weight, expected status)
    "small": (40, 200), "batch": (10, 200), "text": (10, 200), "large": (2, 200),
    "bad_id": (10, 400), "bad_json": (10, 400), "ragged": (8, 400), "huge": (2, 413), "no_route": (8, 404),
}


def build_bundle(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import save_hf_bert_tasks

    def config(labels):
        return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, intermediate_size=128,
                                       max_position_embeddings=128, num_labels=labels)

    cfg = save_hf_bert_tasks(root, LABELS, config, vocab=VOCAB)
    out = root / "bundle"
    FlexMerge(dict(cfg, method="task_arithmetic")).merge(2.0, out=out)
    return out


def request_for(kind: str, rng: random.Random) -> tuple[str, bytes]:
    task = rng.choice(list(LABELS))

    def ids(rows, seq):
        return [[2] + [rng.randrange(5, len(VOCAB)) for _ in range(seq - 2)] + [3] for _ in range(rows)]

    if kind == "small":
        return f"/tasks/{task}", json.dumps({"inputs": {"input_ids": ids(1, 16)}}).encode()
    if kind == "batch":
        return "/batch", json.dumps({"inputs": {t: {"input_ids": ids(4, 32)} for t in LABELS}}).encode()
    if kind == "text":
        words = lambda: " ".join(f"w{rng.randrange(995)}" for _ in range(rng.randrange(3, 30)))  # noqa: E731
        return f"/tasks/{task}", json.dumps({"inputs": {"text": [words(), words()]}}).encode()
    if kind == "large":
        return f"/tasks/{task}", json.dumps({"inputs": {"input_ids": ids(64, 128)}}).encode()
    if kind == "bad_id":
        x = ids(2, 16)
        x[1][5] = len(VOCAB)
        return f"/tasks/{task}", json.dumps({"inputs": {"input_ids": x}}).encode()
    if kind == "bad_json":
        return f"/tasks/{task}", json.dumps({"inputs": {"input_ids": ids(2, 16)}}).encode()[:-7]
    if kind == "ragged":
        return f"/tasks/{task}", json.dumps({"inputs": {"input_ids": ids(1, 16) + ids(1, 9)}}).encode()
    if kind == "huge":
        return f"/tasks/{task}", b" " * (MAX_BODY + 1)
    if kind == "no_route":
        return "/nope", b"{}"
    raise ValueError(kind)


def send(port: int, path: str, body: bytes) -> int | None:
    """The answer's status, or None when no HTTP answer came back (a lost answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def slow_request(port: int, stop: threading.Event) -> int | None:
    """A body that trickles a byte every 0.2 s and never ends; the server should answer 408."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        s.sendall(b"POST /tasks/sst2 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                answer = s.recv(4096)
                if not answer:
                    return None
                return int(answer.split(b" ", 2)[1])
            except TimeoutError:
                try:
                    s.sendall(b" ")
                except OSError:  # the server answered and closed meanwhile: read its answer
                    s.settimeout(5)
                    answer = s.recv(4096)
                    return int(answer.split(b" ", 2)[1]) if answer else None
        return 0  # stopped before the server's answer: not counted
    except OSError:
        return None
    finally:
        s.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--slow", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="the server's --threads (default: torch's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    exe = shutil.which("flexmerge") or str(Path(sys.executable).parent / "flexmerge")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    proc = None
    try:
        t0 = time.perf_counter()
        bundle = build_bundle(tmp)
        print(f"bundle: 3 tasks of a 4-layer BERT (hidden 64, vocabulary {len(VOCAB)}), size 2, built in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([exe, "serve", str(bundle), "--port", str(port), "--timeout", str(TIMEOUT),
                                 "--max-body-bytes", str(MAX_BODY)] +
                                (["--threads", str(args.threads)] if args.threads else []),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if "serving" not in line:
            print(f"the server did not start: {line}{proc.stderr.read()}", file=sys.stderr)
            return 1
        print(line.strip(), flush=True)

        rng = random.Random(args.seed)
        names = list(CLASSES)
        kinds = rng.choices(names, weights=[CLASSES[n][0] for n in names], k=args.requests)
        for n in names:  # every class appears
            if n not in kinds:
                kinds[rng.randrange(len(kinds))] = n
        jobs = [(k, *request_for(k, rng)) for k in kinds]
        for k in names:  # warm-up: tokenizers loaded, buffers allocated
            send(port, *request_for(k, rng)[0:2])
        rss = {"start": rss_mib(proc.pid)}

        lock = threading.Lock()
        results: dict[str, list[tuple[int | None, float]]] = {n: [] for n in names + ["slow"]}
        cursor = iter(range(len(jobs)))
        done = [0]
        stop = threading.Event()

        def client():
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                kind, path, body = jobs[i]
                t = time.perf_counter()
                code = send(port, path, body)
                dt = time.perf_counter() - t
                with lock:
                    results[kind].append((code, dt))
                    done[0] += 1
                    if done[0] == len(jobs) // 2:
                        rss["middle"] = rss_mib(proc.pid)

        def slow_client():
            while not stop.is_set():
                t = time.perf_counter()
                code = slow_request(port, stop)
                if code != 0:
                    with lock:
                        results["slow"].append((code, time.perf_counter() - t))

        slow = [threading.Thread(target=slow_client) for _ in range(args.slow)]
        for th in slow:
            th.start()
        t = time.perf_counter()
        fast = [threading.Thread(target=client) for _ in range(args.clients)]
        for th in fast:
            th.start()
        for th in fast:
            th.join()
        wall = time.perf_counter() - t
        stop.set()
        for th in slow:
            th.join()
        time.sleep(0.5)
        rss["end"] = rss_mib(proc.pid)

        expected = {n: CLASSES[n][1] for n in names}
        expected["slow"] = 408
        total = sum(len(results[n]) for n in names)
        five = sum(1 for v in results.values() for c, _ in v if c is not None and c >= 500)
        lost = sum(1 for v in results.values() for c, _ in v if c is None)
        wrong = sum(1 for n, v in results.items() for c, _ in v if c is not None and c != expected[n])
        print(f"\nserver torch threads: {args.threads or 'default'}; load average before: "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{total} requests from {args.clients} clients in {wall:.2f} s: {total / wall:.0f} requests/s "
              f"(+ {len(results['slow'])} slow requests from {args.slow} trickling clients)")
        print(f"{'class':<10}{'n':>6}{'status':>8}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}")
        for n in names + ["slow"]:
            lat = [dt * 1000 for _, dt in results[n]]
            if not lat:
                continue
            codes = sorted({c for c, _ in results[n]}, key=str)
            print(f"{n:<10}{len(lat):>6}{'/'.join(map(str, codes)):>8}{pct(lat, 50):>10.1f}"
                  f"{pct(lat, 90):>10.1f}{pct(lat, 99):>10.1f}")
        print(f"5xx answers: {five}   lost answers: {lost}   unexpected status: {wrong}")
        print(f"server RSS (MiB): start {rss['start']:.1f}, middle {rss.get('middle', float('nan')):.1f}, "
              f"end {rss['end']:.1f}")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        print(f"server stopped with SIGINT: exit code {rc}")
        if args.json:
            args.json.write_text(json.dumps({
                "requests": total, "clients": args.clients, "wall_s": wall, "rps": total / wall,
                "five_xx": five, "lost": lost, "unexpected": wrong, "rss_mib": rss,
                "latency_ms": {n: {"n": len(v), "p50": pct([d * 1000 for _, d in v], 50),
                                   "p90": pct([d * 1000 for _, d in v], 90),
                                   "p99": pct([d * 1000 for _, d in v], 99)} for n, v in results.items() if v},
            }, indent=1))
        return 0 if five == 0 and lost == 0 and wrong == 0 else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
