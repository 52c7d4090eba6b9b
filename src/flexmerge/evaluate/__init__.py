"""Accuracy-size curves: sweep merge methods x sizes through a user evaluator.

The FlexMerge paper's results are curves of accuracy against deployed size, one per merge method
(Dhasade et al., ICLR 2026, Figs. 1 and 3-5), with the fine-tuned and zero-shot levels as
references and the *normalized* accuracy (merged / fine-tuned, per task, averaged over tasks;
Sec. 5 "Metrics", after Wang et al. 2024) on a second axis. :func:`sweep` produces that table for
any merge config and any evaluator; :mod:`flexmerge.plots` draws it.

The evaluator
-------------
``evaluator(task_name, state_dict) -> float``: ``state_dict`` is the task's complete rebuilt state
dict (the same keys as the task's checkpoint, task-specific heads included), ``float`` any score
where higher is better (accuracy, for example). With ``model_factory`` (``model_factory(task_name)
-> torch.nn.Module``, called once per task, the module is then reused), the sweep loads each state
dict into that task's module (``load_state_dict(strict=False)``; an unexpected key is an error, a
missing one a note) and calls ``evaluator(task_name, module)`` instead.

What one sweep does (and does not do again)
-------------------------------------------
* Fine-tuned reference: each task's own checkpoint is evaluated once (or taken from
  ``finetuned=``); zero-shot (optional): the pretrained weights with the task's own task-specific
  (excluded) tensors, once per task.
* One :class:`~flexmerge.engine.FlexMerge` per method: its global pass (TIES trim, DARE, ...) runs
  once; its plan is made once; ablation plans (orders, linkages, random seeds) are re-planned from
  the cached Gram matrices without reading tensors. Methods that do not transform task vectors
  share one similarity pass.
* Every distinct merged model is evaluated once: results are cached in memory by (method and
  parameters, per-tensor grouping), so a size requested twice, the same grouping reached by two
  orders, or the largest size (every task keeps its checkpoint, so its scores *are* the
  fine-tuned ones) cost no evaluation. A rerun into the same ``out`` reuses the finished rows of
  the table there that the same setting produced (``resume=True``, the default;
  :mod:`~flexmerge.evaluate.resume`), so an interrupted sweep evaluates only the missing rows.
* ``ray=True`` / ``ray_address=``: the evaluator calls run as Ray tasks, each merged model built
  once by the driver and shared through Ray's object store; the table equals the serial one
  (:mod:`~flexmerge.evaluate.distributed`).
* ``channel_merging`` (the baseline in :mod:`flexmerge.baselines.channel_merging`) is accepted as
  a method name; it takes integer sizes only (others are skipped with a note).
* A size outside a method's range is skipped with a note; a mask method (TALL/consensus, EMR) is
  also evaluated at its own minimum size (``requested_size = "min"``).

Output: rows (see :data:`~flexmerge.evaluate.table.CSV_FIELDS`) written after every row, atomically, to ``curve.csv`` and
``curve.json`` in ``out``; a failing evaluator raises :class:`~flexmerge.errors.FlexMergeError`
naming it, and the table so far stays written (``"complete": false`` in the JSON).

Modules: :mod:`~flexmerge.evaluate.sweep` (the sweep), :mod:`~flexmerge.evaluate.session` (calling
the evaluator, caching, recording rows), :mod:`~flexmerge.evaluate.calibrate` (optional
calibration on validation data), :mod:`~flexmerge.evaluate.table` (the
table, ``curve.csv`` / ``curve.json``), :mod:`~flexmerge.evaluate.render` (the printed table),
:mod:`~flexmerge.evaluate.user_code` (importing ``module:function``),
:mod:`~flexmerge.evaluate.arguments` (checking a sweep's arguments), :mod:`~flexmerge.evaluate.resume`
(reusing an earlier table's rows), :mod:`~flexmerge.evaluate.distributed` (Ray); the plots are drawn by
:mod:`flexmerge.plots`.
"""

from .arguments import CHANNEL_MERGING, LINKAGES, ORDERS, parse_list, parse_sizes
from .calibrate import Calibration, calibrate
from .session import Evaluator, score_value
from .sweep import sweep
from .table import CSV_FIELDS, CSV_NAME, CURVE_FORMAT, CURVE_VERSION, JSON_NAME, SweepResult
from .user_code import callable_name, load_callable

__all__ = ["sweep", "calibrate", "Calibration", "SweepResult", "parse_sizes", "load_callable", "callable_name", "score_value",
           "parse_list", "Evaluator", "CHANNEL_MERGING", "ORDERS", "LINKAGES", "CSV_FIELDS", "CSV_NAME",
           "JSON_NAME", "CURVE_FORMAT", "CURVE_VERSION"]
