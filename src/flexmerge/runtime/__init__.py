"""Serve every task of a bundle at once: shared tensors, mixed batches, rows routed by task.

    from flexmerge import MultiTaskModel
    mt = MultiTaskModel.from_bundle("out/")                          # HF bundles: class from config.json
    mt = MultiTaskModel.from_bundle("out/", model_factory=make_model) # any torch module
    outputs = mt({"sst2": sst2_inputs, "trec": trec_inputs})          # dict task -> outputs

How it works (FlexMerge, Dhasade et al., ICLR 2026, Sec. 5 / Table 3: task models
that share tensors cost no inference speed):

* **Loading.** Every stored tensor of the bundle is loaded once: the safetensors files are
  memory-mapped (private, copy-on-write) and each tensor is a view into the mapping, so resident
  memory is the bundle's stored bytes (plus what the mask policy keeps). A task's weight for a
  parameter is the stored tensor of the group holding the task in that parameter's block, so tasks
  of one group hold *the same* tensor object (same ``data_ptr``): no per-task copies.
* **Routing at module level.** The model skeleton is built with its parameters on the ``meta``
  device (no memory). Every module with parameters is replaced by a routed version holding one
  parameter set per *variant* (the distinct tensor sets its tasks use: one per plain group, one per
  member of an ``original`` or ``masked`` group, one per task for task-specific modules).
  Standard modules (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``,
  ``nn.RMSNorm``, ``nn.Conv1d/2d/3d`` and HF's ``Conv1D`` of GPT-2) apply their functional op per
  contiguous run of rows; any other module with parameters of its own (e.g. an RMSNorm class of a
  model family, a ``cls_token`` holder, ``nn.MultiheadAttention``) is run through
  :func:`torch.func.functional_call` once per run, its children seeing only that run's rows.
  So the design holds for any architecture built from these modules, not one model family.
* **Mixed batches.** The tasks' inputs are concatenated along the batch dimension in a fixed task
  order chosen at load time to keep each module's groups contiguous (greedy ordering over the
  modules' group signatures, weighted by parameter bytes). A module whose tasks in the batch all
  share one variant runs **one** op over the whole batch (size 1.0 costs what one merged model
  costs on the concatenated batch); otherwise one op per contiguous run of rows, written into one
  preallocated output for ``Linear``/``Conv1D`` (size N costs what N models cost on their own rows).
  The runs of a ``Linear``/``Conv1D`` are independent products, so they are shared out over the
  intra-op threads, one thread each, the rows cut evenly (inter-op parallelism, like N models
  served side by side) instead of running N products one after another on all threads: this
  avoids one OpenMP fork/join per run and the smaller-product inefficiency of the BLAS (measured
  on 2 shared cores, 8 runs of ``[2048, 384] x [384, 1536]``: 0.40 s one after another on 2
  threads, 0.35 s shared out, 0.34 s for one merged product of all rows). Memory-bound work (mask
  rebuilds, per-run affine parts of norms, concatenations) runs on one thread (:func:`_serial`).
  A ``LayerNorm``/``RMSNorm`` normalises all rows in one op and applies each run's affine part in
  place (in 16-bit dtypes each run's rows in one op, so that values are rounded once, as in the
  task's own model).
* **Generation** (causal LMs): :meth:`MultiTaskModel.generate` runs HF ``generate`` on the routed
  model with the request's layout held for every step (the KV cache keeps the rows' order), with
  each task's stored ``generation_config.json``.
* **Task-specific modules** (the ``exclude``\\ d heads) may differ in shape per task: each task's
  rows use that task's own (unpadded) weights; their outputs are written into a zero-padded
  tensor of the widest task, and :class:`MultiTaskModel` slices every output tensor that *is*
  such a padded output back to the task's own width. A task-specific ``Linear`` whose input is
  wider than its weight (a second head layer after a padded first one) reads only its own columns.
* **Mask methods** (``consensus``/TALL, ``emr``: groups of kind ``masked``, rebuilt as
  ``theta_0 + (gamma_t m_t) ⊙ tau``, equal to :meth:`flexmerge.bundle.Bundle.rebuild_masked`'s
  ``theta_0 + gamma_t (m_t ⊙ tau)`` bit for bit since ``m_t`` is 0 or 1):
  ``rebuild_policy="on_the_fly"`` rebuilds a task's masked weights at every request into
  preallocated buffers, reused by every module (FlexMerge Appendix C.9); for an ``Embedding`` the
  rebuild is done only for the looked-up rows. ``rebuild_policy="cache"`` keeps rebuilt tensors
  per task in an LRU cache of at most ``cache_budget_bytes`` (``None``: no limit, i.e. up to one
  full model per task for the masked blocks); a tensor larger than the budget is rebuilt into the
  buffers as on the fly. Trade-off: ``on_the_fly`` keeps memory at the stored bytes plus one
  buffer per tensor shape and worker thread, and pays the rebuild (a table look-up per mask byte,
  one multiply and one add per element, on one thread) at every request; ``cache`` pays it once
  per task and tensor, then runs at the speed of plain size-N serving, holding up to N x the
  masked blocks. Measured (``bench/bench_runtime.py``, MiniLM, 8 tasks, size 2.25 where every
  task is rebuilt, 2 shared cores): rebuilding every masked tensor of the 8 tasks takes
  0.23-0.28 s; a request of 8 x 32 rows x 64 tokens (~8 s) runs at the same speed under both
  policies (within noise); a request of 8 x 1 row runs 0.75-0.84 s on the fly vs 0.62-0.66 s
  cached; memory kept beyond the 208 MB stored: 10.6 MB of buffers on the fly vs 722 MB cached.
  So ``on_the_fly`` suits large batches or tight memory, ``cache`` (with a budget) small,
  latency-bound requests.

Limits (documented, checked where possible): inference only (forward runs under
``torch.inference_mode`` in eval mode); the batch dimension of every routed module's input is the
first one (or a flattened batch x tokens first dimension, or, failing both, the first other
dimension of that size); a weight used outside its own module's ``forward`` (e.g. an output layer
computed from ``self.embeddings.weight`` directly) sees the first variant only; HF ``labels``
(losses) are not routed: compute losses from the returned per-task logits. Calls of one instance are
serialised by a lock. Thread settings: ``torch.set_num_threads`` acts on the calling thread's
OpenMP and MKL settings and on torch's process-wide default for threads started later; the
runtime's worker threads set one thread each for themselves, and the caller's setting (and the
default) is restored after every call.

Differences from other projects: mergekit, FusionBench and PEFT export or serve one merged model
per task (PEFT's mixed-adapter batches route LoRA adapters, not full weights); here shared blocks
are stored and run once for all tasks of a group. Adapter bundles are served like PEFT's mixed
batches (the base op shared, a side path per run of rows), with a task's adapter assembled per
block from the groups it belongs to (:mod:`~flexmerge.runtime.adapters`).

Modules: :mod:`~flexmerge.runtime.model` (the public :class:`MultiTaskModel`),
:mod:`~flexmerge.runtime.build` (skeleton on ``meta``, checks against the bundle, routed model,
task order), :mod:`~flexmerge.runtime.hf` (HF skeletons from the stored ``config.json``),
:mod:`~flexmerge.runtime.storage` (stored tensors, memory-mapped once),
:mod:`~flexmerge.runtime.sources` (stored and masked sources), :mod:`~flexmerge.runtime.routing`
(batch layout, runs, worker threads, rebuild buffers and cache),
:mod:`~flexmerge.runtime.modules` (the routed modules), :mod:`~flexmerge.runtime.batching`
(concatenating inputs, splitting outputs), :mod:`~flexmerge.runtime.adapters` (adapter bundles:
the base model with LoRA / (IA)3 side paths routed per run of rows).
"""

from .build import _params_on_meta  # noqa: F401
from .hf import _hf_config_dir  # noqa: F401
from .model import MultiTaskModel
from .modules import _Routed  # noqa: F401
from .routing import _serial  # noqa: F401
from .sources import _Masked, _Stored  # noqa: F401

__all__ = ["MultiTaskModel"]
