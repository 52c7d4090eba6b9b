"""Routed modules: a model's module plus one parameter set per variant; each contiguous run of
rows is computed with its own variant's weights (functional op, or ``functional_call``)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FlexMergeError
from .routing import _Router, _serial
from .sources import _Masked, _Stored


def _rows(x: torch.Tensor, total: int) -> torch.Tensor:
    """A batch-broadcast input (first dimension 1, e.g. HF position ids) expanded to every row, so
    that each run's rows get their own variant's output."""
    if x.dim() and x.shape[0] == 1 and total > 1:
        return x.expand(total, *x.shape[1:])
    return x


def _row_dim(x: torch.Tensor, total: int, name: str, last_is_feature: bool = True) -> tuple[int, int]:
    """(dimension holding the batch rows, rows per batch row) of a routed module's input."""
    if x.dim() and x.shape[0] == total:
        return 0, 1
    if x.dim() and total and x.shape[0] % total == 0:
        return 0, x.shape[0] // total
    for d in range(1, x.dim() - (1 if last_is_feature else 0)):
        if x.shape[d] == total:
            return d, 1
    raise FlexMergeError(f"module '{name}' got an input of shape {tuple(x.shape)} without a batch "
                         f"dimension of the {total} rows of this request; the runtime needs batch-first "
                         "inputs (or a flattened batch x tokens first dimension)")


class _Routed(nn.Module):
    """Base of the routed modules: the original module (``inner``) plus one source per parameter
    per variant; ``inner``'s parameters are set to the first variant's tensors (for code that reads
    ``.weight``, ``.dtype`` or ``.device``), the forward uses each run's own."""

    def __init__(self, name: str, inner: nn.Module, router: _Router, pnames: list[str],
                 variants: list[list], mapping: tuple[int, ...], widths: list[int] | None):
        super().__init__()
        self.inner = inner
        self._name = name
        self._router = router
        self._pnames = pnames
        self._variants = variants
        self._mid = router.mapping_id(mapping)
        self._mapping = mapping
        self._widths = widths  # per variant output width where they differ (task-specific heads)
        self._slot_owner = "std"
        for pname, src in zip(pnames, variants[0]):
            t = src.tensor if isinstance(src, _Stored) else src.base
            if pname in inner._parameters:
                inner._parameters[pname] = nn.Parameter(t, requires_grad=False)
            else:
                inner._buffers[pname] = t

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self._modules["inner"], item)

    def _weights(self, g: int) -> list[torch.Tensor | None]:
        r = self._router
        return [r.weight(src, (self._slot_owner, i)) for i, src in enumerate(self._variants[g])]

    def extra_repr(self) -> str:
        return f"variants={len(self._variants)}"

    # helpers for the per-run ops
    def _by_runs(self, x: torch.Tensor, op: Callable[[torch.Tensor, int], torch.Tensor],
                 last_is_feature: bool = True) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return op(x, runs[0][0])
        x = _rows(x, r.total)
        d, k = _row_dim(x, r.total, self._name, last_is_feature)
        outs = [op(x.narrow(d, s * k, (e - s) * k), g) for g, s, e in runs]
        if self._widths is None:
            with _serial():
                return torch.cat(outs, dim=d)
        width = max(o.shape[-1] for o in outs)
        out = outs[0].new_zeros(*outs[0].shape[:d], x.shape[d], *outs[0].shape[d + 1:-1], width)
        for (g, s, e), o in zip(runs, outs):
            out.narrow(d, s * k, (e - s) * k)[..., : o.shape[-1]] = o
        self._note_padded(out)
        return out

    def _note_padded(self, out: torch.Tensor) -> None:
        r = self._router
        per_task = [self._widths[self._mapping[t]] for t in range(r.num_tasks)]
        r.padded.append((out, per_task))


class _RoutedLinear(_Routed):
    """``nn.Linear`` (``y = x W^T + b``) or HF ``Conv1D`` (``y = x W + b``, W: [in, out])."""

    def __init__(self, *args, transposed: bool = False, **kw):
        super().__init__(*args, **kw)
        self._t = transposed

    def _wb(self, g):
        ws = self._weights(g)
        w = ws[self._pnames.index("weight")]
        b = ws[self._pnames.index("bias")] if "bias" in self._pnames else None
        return (w.t() if self._t else w), b  # as [out, in]

    def _one(self, x, g):
        w, b = self._wb(g)
        if x.shape[-1] > w.shape[1] and self._widths is not None:
            x = x[..., : w.shape[1]]  # a padded input from a wider task-specific layer before
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return self._one(x, runs[0][0])
        total = r.total
        if (self._widths is not None or not x.is_contiguous() or x.dim() < 2 or not total
                or x.shape[0] % total):
            return self._by_runs(x, self._one)
        x2 = x.view(-1, x.shape[-1])
        per = x2.shape[0] // total  # rows of the flattened input per batch row
        src0 = self._variants[runs[0][0]][self._pnames.index("weight")]
        out_f = src0.shape[1] if self._t else src0.shape[0]
        out = x.new_empty(*x.shape[:-1], out_f)
        o2 = out.view(-1, out_f)

        def job(run):
            g, s, e = run
            w, b = self._wb(g)
            xs, os_ = x2[s * per: e * per], o2[s * per: e * per]
            if b is None:
                torch.mm(xs, w.t(), out=os_)
            else:
                torch.addmm(b, xs, w.t(), out=os_)

        shares = self._router.split_runs(runs)
        if shares is None:
            for run in runs:
                job(run)
        else:
            self._router.run_concurrently(shares, job)
        return out


class _RoutedEmbedding(_Routed):
    def _one(self, idx, g):
        m = self.inner
        srcs = self._variants[g]
        src = srcs[0]
        if isinstance(src, _Masked) and self._router.policy == "on_the_fly" and m.max_norm is None:
            with _serial():
                rows = src.rebuild_rows(idx)
            if rows is not None:
                self._router.rebuilds += 1
                return rows
        (w,) = self._weights(g)
        return F.embedding(idx, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return self._one(idx, runs[0][0])
        idx = _rows(idx, r.total)
        d, k = _row_dim(idx, r.total, self._name, last_is_feature=False)
        outs = [self._one(idx.narrow(d, s * k, (e - s) * k), g) for g, s, e in runs]
        if self._widths is None:
            with _serial():
                return torch.cat(outs, dim=d)
        width = max(o.shape[-1] for o in outs)
        out = outs[0].new_zeros(*idx.shape, width)
        for (g, s, e), o in zip(runs, outs):
            out.narrow(d, s * k, (e - s) * k)[..., : o.shape[-1]] = o
        self._note_padded(out)
        return out


class _RoutedNorm(_Routed):
    def _one(self, x, g):
        m = self.inner
        ws = dict(zip(self._pnames, self._weights(g)))
        w, b = ws.get("weight"), ws.get("bias")
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, w, b, m.eps)
        return F.rms_norm(x, m.normalized_shape, w, m.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._router
        runs = r.runs(self._mid)
        m = self.inner
        if len(runs) == 1 or isinstance(m, nn.GroupNorm) or not x.dim() or x.shape[0] != r.total \
                or x.dtype in (torch.bfloat16, torch.float16):
            return self._by_runs(x, self._one)
        # LayerNorm / RMSNorm normalise each row on its own: normalise all rows in one op, then
        # apply each run's affine part in place (no per-run outputs to concatenate). Not in 16-bit
        # dtypes: rounding the normalised rows before the affine part would round twice, so a
        # task's outputs would depend on the other tasks in the batch.
        if isinstance(m, nn.LayerNorm):
            y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        else:
            y = F.rms_norm(x, m.normalized_shape, None, m.eps)
        with _serial():
            for g, s, e in runs:  # (weights fetched one run at a time: on-the-fly rebuilds share buffers)
                ws = dict(zip(self._pnames, self._weights(g)))
                w, b = ws.get("weight"), ws.get("bias")
                ys = y[s:e]
                if w is not None and b is not None:
                    torch.addcmul(b, ys, w, out=ys)
                elif w is not None:
                    ys.mul_(w)
                elif b is not None:
                    ys.add_(b)
        return y


class _RoutedConv(_Routed):
    def _one(self, x, g):
        ws = dict(zip(self._pnames, self._weights(g)))
        return self.inner._conv_forward(x, ws["weight"], ws.get("bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._by_runs(x, self._one, last_is_feature=False)


class _RoutedGeneric(_Routed):
    """Any other module with parameters: ``functional_call`` per run of rows; its children see
    only that run's rows (a sub-layout is pushed while they run)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._slot_owner = id(self)

    def _call(self, g, args, kwargs):
        params = dict(zip(self._pnames, self._weights(g)))
        return torch.func.functional_call(self.inner, params, args, kwargs, strict=False)

    def forward(self, *args, **kwargs):
        r = self._router
        runs = r.runs(self._mid)
        if len(runs) == 1:
            return self._call(runs[0][0], args, kwargs)
        total = r.total
        outs, sizes = [], []
        for g, s, e in runs:
            sl = lambda v: v.narrow(0, s, e - s) if (isinstance(v, torch.Tensor) and v.dim()  # noqa: E731
                                                      and v.shape[0] == total) else v
            r.stack.append(r.sub_layout(s, e))
            try:
                outs.append(self._call(g, tuple(sl(a) for a in args),
                                       {k: sl(v) for k, v in kwargs.items()}))
            finally:
                r.stack.pop()
            sizes.append(e - s)
        return _cat_like(outs, sizes)


def _cat_like(outs: list, sizes: list[int]):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() and all(o.shape[0] == n for o, n in zip(outs, sizes)):
            return torch.cat(outs, 0)
        return first
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        return type(first)(_cat_like([o[i] for o in outs], sizes) for i in range(len(first)))
    if isinstance(first, Mapping):
        return type(first)(**{k: _cat_like([o[k] for o in outs], sizes) for k in first})
    return first


_NORMS = tuple(c for c in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if c is not None)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WHOLE = (nn.MultiheadAttention,)  # modules whose forward reads their children's weights


def _hf_conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # pragma: no cover - transformers missing
        return None


def _standard_kind(m: nn.Module) -> str | None:
    def plain(cls):
        return isinstance(m, cls) and type(m).forward is cls.forward

    if plain(nn.Linear):
        return "linear"
    conv1d = _hf_conv1d()
    if conv1d is not None and plain(conv1d):
        return "conv1d_t"
    if plain(nn.Embedding):
        return "embedding"
    if any(plain(c) for c in _NORMS):
        return "norm"
    if any(plain(c) for c in _CONVS):
        return "conv"
    return None
