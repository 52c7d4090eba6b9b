"""The model side of ``flexmerge serve``: each task's tokenizer, the model's input limits per task,
every check of a request's inputs, and the single model worker (the package doc says why one)."""

from __future__ import annotations

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..errors import FlexMergeError
from ..runtime import MultiTaskModel, _hf_config_dir, _Routed
from .payload import _DENY, _ID_KEYS, _POSITION_NAMES, Limits, _BadRequest, _to_tensor

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

