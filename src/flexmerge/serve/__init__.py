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

from .payload import Limits
from .server import make_server, serve

__all__ = ["Limits", "make_server", "serve"]
