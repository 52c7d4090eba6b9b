"""Per-block Gram matrices of task vectors in one streaming pass, and cosine similarity from them.

FlexMerge (Dhasade et al., ICLR 2026, Sec. 3.1) compares block task vectors by cosine similarity,
``cos(tau_i^b, tau_j^b) = <tau_i^b, tau_j^b> / (||tau_i^b|| ||tau_j^b||)``. The N x N Gram matrix
``G^b = T^b (T^b)^T`` holds every inner product and norm, so one pass over the tensors gives all
similarities at every later step of the plan. Products are taken in float32 chunks and
accumulated in float64.

Zero vectors (a block left frozen in fine-tuning): two zero vectors are perfectly similar (1.0),
a zero and a non-zero vector are orthogonal (0.0); never NaN.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .validate import STREAM_CHUNK, ModelSet

@contextlib.contextmanager
def single_thread():
    """Run products on one thread (torch's and NumPy's BLAS, via threadpoolctl): an
    ``[N, K] @ [K, N]`` product has too little work per call to pay for waking a second thread,
    and in the streaming pass the other core is reading. Measured at N = 30 on 2 cores: the
    Gram pass takes 1.1 s with one BLAS thread and 1.5-2.3 s with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def gram(taus: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """``[N, *shape]`` -> ``[N, N]`` float64 Gram matrix of the flattened rows.

    Products are float32, ``cols`` columns at a time (default: the whole tensor), accumulated in
    float64. NumPy's ``dot(a, a.T)`` is used because it recognises the symmetric product and calls
    BLAS ``syrk``, which does half the multiply-adds of a general product (measured 80 ms against
    torch's 122 ms for a ``[30, 2M]`` chunk on one core). A slice whose float32 product overflows
    (finite weights above ~1e19) is redone in float64; non-finite inputs give a non-finite
    diagonal.
    """
    flat = taus.reshape(taus.shape[0], -1)
    n, k = flat.shape
    out = np.zeros((n, n), dtype=np.float64)
    cols = cols or max(k, 1)
    for start in range(0, k, cols):
        x = flat[:, start:start + cols]
        x = (x if x.is_contiguous() else x.contiguous()).numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            part = np.dot(x, x.T)
        if not np.isfinite(part).all():
            x64 = x.astype(np.float64)
            part = np.dot(x64, x64.T)
        out += part
    return torch.from_numpy(out)


def cosine_from_gram(g: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """Cosine similarity matrix from a Gram matrix, with the zero-vector rule above."""
    g = np.asarray(g, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    scale = norms.max() if norms.size else 0.0
    zero = norms <= rtol * max(scale, 1e-300)
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    both_zero = np.outer(zero, zero)
    one_zero = np.logical_xor.outer(zero, zero)
    cos[both_zero] = 1.0
    cos[one_zero] = 0.0
    np.fill_diagonal(cos, 1.0)
    return cos


GRAM_PASS_BYTES = 8 << 20
"""Bytes of task vectors (all N rows) per chunk of the Gram pass. Small chunks keep the reader and
the products in step; measured at N = 30: 8 MiB x N per chunk 1.8 s, 1 MiB x N 1.1 s. A method's
transform allocates temporaries of a chunk's size, and temporaries of tens of MiB are fresh pages
at every call (glibc maps them): on 4 x 218M bf16 tasks (bench/bench_llm.py) the TIES Gram pass
took 7.3 s with 32 MiB chunks and 3.9 s with 8 MiB, task arithmetic's 1.7 and 1.6 s."""


def pass_chunk_elems(num_tasks: int, chunk_elems: int | None) -> int | None:
    """Elements per task in one chunk of a streaming pass: about :data:`GRAM_PASS_BYTES` of all
    tasks' float32 task vectors, never more than ``chunk_elems`` (None: whole tensors)."""
    if chunk_elems is None:
        return None
    return min(chunk_elems, max(1 << 16, GRAM_PASS_BYTES // (4 * max(1, num_tasks))))


def block_grams(models: ModelSet, transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                progress: Callable[[int, int], None] | None = None,
                chunk_elems: int | None = STREAM_CHUNK) -> dict[str, np.ndarray]:
    """One streaming pass over all mergeable tensors: ``{block: N x N Gram (float64)}``.

    ``transform`` (a method's :meth:`~flexmerge.methods.MergeMethod.transform`) is applied to the
    task vectors first, so that e.g. TIES similarity sees trimmed vectors (Appendix B.1).
    Large tensors are streamed in chunks of ``chunk_elems`` (pass ``None`` when ``transform``
    needs whole tensors); the chunks are cut to about :data:`GRAM_PASS_BYTES`. The products run
    on this thread while the stream's reader thread fetches the next two chunks, one core each
    (only the next one when whole tensors are streamed, so that memory stays at two tensors of
    N tasks). Finiteness is checked on the Gram diagonal (a NaN/Inf element makes its row's
    squared norm non-finite), which saves the stream its own pass.
    """
    n = models.num_tasks
    grams = {b.name: np.zeros((n, n)) for b in models.blockmap.blocks}
    total = len(models.mergeable)
    done = 0
    chunk_elems = pass_chunk_elems(n, chunk_elems)
    with single_thread():
        for name, _base, taus in models.stream(chunk_elems=chunk_elems, reuse_buffers=True,
                                               check_finite=transform is not None,
                                               prefetch=2 if chunk_elems is not None else 1):
            if transform is not None:
                taus = transform(name, taus)
            g = gram(taus)
            if not bool(torch.isfinite(g.diagonal()).all()):
                models.name_non_finite(name)
            grams[models.blockmap.block_of[name]] += g.numpy()
            if progress is not None and taus.shape[1:] == models.mergeable[name].shape:
                done += 1
                progress(done, total)
    return grams
