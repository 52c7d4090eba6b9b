"""What a routed parameter reads: a stored tensor as is, or a member of a masked group rebuilt
(``theta_0 + (gamma_t m_t) ⊙ tau``; TALL masks, Wang et al. 2024; EMR, Huang et al. 2024)."""

from __future__ import annotations

import torch

class _Stored:
    """A stored tensor used as is (original, merged, task-specific)."""

    __slots__ = ("tensor", "uid")

    def __init__(self, tensor: torch.Tensor, uid):
        self.tensor, self.uid = tensor, uid

    @property
    def shape(self):
        return tuple(self.tensor.shape)

    @property
    def dtype(self):
        return self.tensor.dtype


class _Masked:
    """``theta_0 + gamma * m ⊙ tau`` of one member of a masked group (TALL / EMR storage)."""

    __slots__ = ("base", "delta", "packed", "scalar", "uid", "_lut")

    def __init__(self, base, delta, packed, scalar, uid):
        self.base, self.delta, self.packed, self.scalar, self.uid = base, delta, packed, scalar, uid
        self._lut = None

    @property
    def shape(self):
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def nbytes(self) -> int:
        return self.base.numel() * self.base.element_size()

    def _factor(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        """``gamma * m`` as float32 for ``n`` elements, by one table look-up per mask byte (a byte
        -> its 8 bits as 0/1 floats, times gamma: exact, since gamma * 1 = gamma)."""
        if self._lut is None:
            self._lut = _BIT_TABLE if self.scalar is None else _BIT_TABLE * self.scalar.to(torch.float32)
        return self._lut.index_select(0, packed.reshape(-1).to(torch.int64)).view(-1)[:n]

    def rebuild(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta_0 + (gamma * m) ⊙ tau``: equal to :meth:`Bundle.rebuild_masked`, which computes
        ``theta_0 + gamma * (m ⊙ tau)`` (the same products, since m is 0 or 1)."""
        f32 = self.base.dtype == torch.float32 and out is not None
        buf = out if f32 else torch.empty(self.base.shape, dtype=torch.float32)
        delta = self.delta if self.delta.dtype == torch.float32 else self.delta.to(torch.float32)
        if self.packed is not None:
            torch.mul(delta, self._factor(self.packed, self.base.numel()).view(self.base.shape), out=buf)
        elif self.scalar is not None:
            torch.mul(delta, self.scalar, out=buf)
        else:
            buf.copy_(delta)
        buf.add_(self.base if self.base.dtype == torch.float32 else self.base.to(torch.float32))
        if f32:
            return buf
        if out is not None:
            out.copy_(buf)
            return out
        return buf.to(self.base.dtype)

    def rebuild_rows(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Rows ``idx`` of the rebuilt 2-d weight (an Embedding lookup), or None if not row-aligned."""
        rows, dim = self.base.shape
        if dim % 8:
            return None
        flat = idx.reshape(-1)
        delta = self.delta.index_select(0, flat)
        if delta.dtype != torch.float32:
            delta = delta.to(torch.float32)
        if self.packed is not None:
            packed = self.packed.view(rows, dim // 8).index_select(0, flat)
            delta.mul_(self._factor(packed, flat.numel() * dim).view(-1, dim))
        elif self.scalar is not None:
            delta.mul_(self.scalar)
        base = self.base.index_select(0, flat)
        out = delta.add_(base) if base.dtype == torch.float32 else (base.to(torch.float32) + delta)
        return out.to(self.base.dtype).view(*idx.shape, dim)


_BIT_TABLE = torch.tensor([[(b >> (7 - i)) & 1 for i in range(8)] for b in range(256)], dtype=torch.float32)
"""Byte -> its 8 bits (numpy ``packbits`` order, most significant first) as floats."""

