"""What a request may hold and how JSON becomes tensors and outputs become JSON: the request limits,
the 400 error type and the value conversions of ``flexmerge serve`` (the package doc lists every
check and the defaults' reasons)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FlexMergeError

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

