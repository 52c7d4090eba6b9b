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

from .validate import STREAM_CHUNK, ModelSet

CHUNK = 1 << 20


@contextlib.contextmanager
def single_thread():
    """Run small-output products on one thread: an ``[N, K] @ [K, N]`` product has too little
    work per call to pay for waking a second thread (measured: ~15 ms per call on a busy 2-core
    machine against ~1 ns per element on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gram(taus: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``[N, *shape]`` -> ``[N, N]`` float64 Gram matrix of the flattened rows."""
    flat = taus.reshape(taus.shape[0], -1)
    out = torch.zeros((flat.shape[0], flat.shape[0]), dtype=torch.float64)
    # Small products run on one thread (see single_thread); large ones use all threads.
    few = flat.shape[0] * flat.shape[0] * flat.shape[1] < (1 << 28)
    with single_thread() if few else contextlib.nullcontext():
        for start in range(0, flat.shape[1], chunk):
            x = flat[:, start:start + chunk]
            out += (x @ x.T).to(torch.float64)
    return out


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


def block_grams(models: ModelSet, transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                progress: Callable[[int, int], None] | None = None,
                chunk_elems: int | None = STREAM_CHUNK) -> dict[str, np.ndarray]:
    """One streaming pass over all mergeable tensors: ``{block: N x N Gram (float64)}``.

    ``transform`` (a method's :meth:`~flexmerge.methods.MergeMethod.transform`) is applied to the
    task vectors first, so that e.g. TIES similarity sees trimmed vectors (Appendix B.1).
    Large tensors are streamed in chunks of ``chunk_elems`` (pass ``None`` when ``transform``
    needs whole tensors).
    """
    n = models.num_tasks
    grams = {b.name: np.zeros((n, n)) for b in models.blockmap.blocks}
    total = len(models.mergeable)
    done = 0
    for name, _base, taus in models.stream(chunk_elems=chunk_elems):
        if transform is not None:
            taus = transform(name, taus)
        grams[models.blockmap.block_of[name]] += gram(taus).numpy()
        if progress is not None and taus.shape[1:] == models.mergeable[name].shape:
            done += 1
            progress(done, total)
    return grams
