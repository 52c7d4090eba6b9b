"""Peak memory of a merge, predicted from tensor headers alone (printed by ``flexmerge merge --dry-run``).

Every pass streams the checkpoints (:meth:`flexmerge.validate.ModelSet.stream`); what it holds,
with N tasks, ``E(t)`` the elements of tensor ``t``, ``s(t)`` its stored bytes per element:

* **Gram pass** (planning) and **global passes** of entry-by-entry methods (TIES' top-k): chunks
  of all N task vectors in float32, ``(prefetch + 1) = 3`` buffers of
  :data:`~flexmerge.similarity.GRAM_PASS_BYTES`, plus the method's temporaries of one chunk (about
  3 more). Other methods' global passes: ``3 x 4 N`` times 2M elements. Whole tensors instead of
  chunks when a method's transform needs them: ``2 x 4 N max_t E(t)``.
* **Merging, entry-by-entry methods** (:attr:`~flexmerge.methods.MergeMethod.elementwise_merge`:
  task arithmetic, averaging, MagMax, TIES): 6 chunks of
  :data:`~flexmerge.materialize.MERGE_CHUNK_BYTES` (3 stream buffers and the method's temporaries)
  plus, for the largest block ``b``, one float32 merged vector per merged group,
  ``4 E(b) x g_b``, the pretrained tensor as stored and in float32 and the stored output of the
  block: ``peak = 6 C + max_b (4 E(b) g_b + (4 + s) max_{t in b} E(t) + out(b))``. It does not
  grow with N.
* **Merging, other methods** (TSV, Iso-C, WUDI, DOGE, EMR, ...): the whole block of N task
  vectors in float32 and its transform, ``peak = max_b (2 x 4 N E(b) + 4 E(b) (1 + g_b) + out(b))``
  plus the method's own temporaries (an SVD's factors), which this does not model.
* ``out(b)`` is the block's stored bytes (:meth:`flexmerge.sizes.CostModel.layout`) and ``g_b`` its
  number of merged groups: exact when the grouping is known (the minimum size, or a plan given),
  otherwise bounded by ``floor(N / 2)`` merged groups and N originals.

Add the interpreter with torch and flexmerge imported (:data:`PROCESS_BYTES`). The figures are
checked against measured peak RSS by ``bench/bench_llm.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

PROCESS_BYTES = 300 << 20
"""Resident memory of ``flexmerge`` after importing torch, before any tensor (measured: 0.22-0.29
GiB on the bench machine)."""


@dataclass
class MemoryEstimate:
    plan_pass: int
    merge: int
    largest_block: str
    chunked: bool
    exact: bool

    @property
    def peak(self) -> int:
        return PROCESS_BYTES + max(self.plan_pass, self.merge)

    def lines(self) -> list[str]:
        gib = lambda n: f"{n / (1 << 30):.2f} GiB"  # noqa: E731
        how = "in chunks (entry-by-entry method)" if self.chunked else "whole blocks of all tasks"
        bound = "" if self.exact else " (bound: groups not known before planning)"
        return [f"peak memory (predicted): {gib(self.peak)} = process {gib(PROCESS_BYTES)} + "
                f"max(streaming passes {gib(self.plan_pass)}, merging {gib(self.merge)}{bound})",
                f"merging {how}; largest block '{self.largest_block}'; formula: docs/architecture.md, 'Memory'"]


def estimate(fm, grouping=None, will_plan: bool = True) -> MemoryEstimate:
    """Predicted peak of planning (if ``will_plan``) and merging ``grouping`` (None: a bound over
    every grouping) for the :class:`~flexmerge.engine.FlexMerge` ``fm``. Reads no tensor."""
    from .materialize import MERGE_CHUNK_BYTES, chunkable
    from .similarity import GRAM_PASS_BYTES
    from .validate import STREAM_CHUNK

    models, method, cost = fm.models, fm.method, fm.cost
    n = len(fm.tasks)
    numel = {name: info.numel for name, info in models.mergeable.items()}
    largest_tensor = max(numel.values(), default=0)
    whole_stream = method.has_transform and not method.elementwise_transform
    passes = 2 * 4 * n * largest_tensor if whole_stream else 6 * GRAM_PASS_BYTES
    if method.has_global_pass and not method.elementwise_merge and not whole_stream:
        # other methods' global passes take 2M-element chunks in fresh buffers (engine._chunk_elems)
        passes = max(passes, 3 * 4 * n * min(STREAM_CHUNK, largest_tensor))
    plan_pass = passes if (will_plan or method.has_global_pass) else 0
    chunked = chunkable(method)
    merge, largest = 0, ""
    for bi, block in enumerate(models.blockmap.blocks):
        e = block.numel
        if grouping is not None:
            sizes = [len(g) for g in grouping.groups[block.name]]
            layout = cost.layout(bi, sizes)
            merged = sum(1 for k in layout.kinds if k != "original")
            out = layout.nbytes
        else:
            merged = n // 2
            out = max(cost.block_cost(bi, [1] * n), cost.block_cost(bi, [n]))
        if merged == 0:
            need = out
        elif chunked:
            biggest = max(block.params, key=lambda p: numel[p])
            need = 4 * e * merged + (4 + models.mergeable[biggest].dtype.itemsize) * numel[biggest] + out
        else:
            need = 2 * 4 * n * e + 4 * e * (1 + merged) + out
        if need > merge:
            merge, largest = need, block.name
    if chunked:
        merge += 6 * MERGE_CHUNK_BYTES
    return MemoryEstimate(plan_pass, merge, largest, chunked, grouping is not None)
