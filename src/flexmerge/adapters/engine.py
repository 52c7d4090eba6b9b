"""Flexible merging of PEFT adapters: :class:`AdapterMerge`, the adapter counterpart of
:class:`flexmerge.engine.FlexMerge` (same plan, merge and bundle; same CLI commands).

Blocks and sizes. Each adapted module is one "parameter" named after the base
weight it changes (``encoder.layer.0.attention.self.query.weight``), so the core's block presets
and rules (:mod:`flexmerge.blocks`) group modules per layer and component exactly as for full
models, and a module's bytes are one adapter's stored bytes for it (both LoRA factors, or the
(IA)3 vector). :class:`flexmerge.sizes.CostModel` then counts sizes in **units of one adapter**:
N = every task keeps its own adapter, 1.0 = one shared adapter.

Storage, per block group (what makes those sizes honest):

* a group of one stores its member's own factors (or vector), LoRA factors zero-padded to the
  module's stored rank ``R`` (:mod:`.source`): size N rebuilds every adapter bit for bit;
* a merged LoRA group stores low-rank factors of the method's merged ``dW`` at the **stored rank**
  ``R``, the largest rank any adapter has for the module (:data:`~.source.RANK_RULE`; when all
  adapters have one rank, that rank): the truncated SVD
  ``dW ~ U_R S_R V_R^T``, stored as ``B = U_R S_R^(1/2)``, ``A = S_R^(1/2) V_R^T`` (split evenly, so
  half-precision factors keep their range) with the scale folded in (``B A`` is the merged ``dW``;
  an export sets that module's ``alpha`` so that PEFT's scaling is exactly 1). It costs one
  adapter's bytes for the block, as a merged block of a full model costs one model's. By
  Eckart-Young it is the closest rank-R matrix to the merged ``dW``; it is exact (to float32
  rounding) when the merged ``dW`` has rank <= R, e.g. members that share ``A``. It agrees with
  PEFT's ``add_weighted_adapter(combination_type="svd", svd_rank=r)`` for task arithmetic and with
  ``ties_svd`` for TIES (tests/test_adapters.py); PEFT's ``cat`` keeps rank ``sum r_i`` (exact,
  but no smaller than the originals), and its ``linear``/``ties``/``dare_*`` without ``_svd``
  merge ``A`` and ``B`` separately, which is not a merge of the ``dW``.
* a merged (IA)3 group stores ``1 + merged tau`` as one vector.

Methods see dense ``dW`` stacks (``GroupInput.task_vectors``), one block of one group at a time;
mask methods (``consensus``, ``emr``) are refused: their per-task masks over the dense ``dW`` alone
would outweigh the adapters they replace. Similarity needs no ``dW``: Gram entries come from the
factors (:meth:`~.source.AdapterSet.factor_gram`), except for methods that transform task vectors
(TIES's trim, DARE), which see the dense ``dW`` one module at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .. import bundle_format as fmt
from ..blocks import BlockMap, build_block_map
from ..bundle import Bundle, BundleWriter, block_entry
from ..engine import PlannedJob, resolve_job
from ..config import MergeConfig
from ..errors import FlexMergeError
from ..materialize import StoredBlock, StoredGroupRecord
from ..methods import MergeMethod
from ..methods.base import GroupInput, method_text
from ..plan import Grouping, Plan
from ..progress import Progress
from ..similarity import single_thread
from ..sizes import CostModel
from .source import RANK_RULE, AdapterSet, open_adapters


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` ``[out, in]``
    (Eckart-Young), the singular values split evenly between the factors."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root.unsqueeze(1) * vh[:rank]
    if a.shape[0] < rank:  # a matrix with fewer rows or columns than the rank: pad with zeros
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a, b


class AdapterMerge(PlannedJob):
    """One merge job over PEFT adapters of one base (module docstring)."""

    def __init__(self, config: str | os.PathLike | Mapping[str, Any] | MergeConfig, *,
                 method: str | dict | MergeMethod | None = None,
                 method_params: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None, progress: bool = False):
        self.config, self.method = resolve_job(config, method, method_params, overrides)
        if self.method.needs_base:
            raise FlexMergeError(f"method '{self.method.name}' stores per-task masks or rescalers over the dense "
                                 "task vectors, which for adapters outweigh the adapters themselves; choose a "
                                 "plain method (task_arithmetic, ties, tsv, ...)")
        self.progress = Progress(enabled=progress)
        self.models: AdapterSet = open_adapters(self.config)
        self.blockmap: BlockMap = build_block_map(self.models.mergeable, self.config.blocks,
                                                  excluded=self.models.excluded)
        self.cost = CostModel.for_method(self.blockmap, self.method, self.models.mergeable)
        self._plan: Plan | None = None
        self._global_done = False

    @property
    def tasks(self) -> list[str]:
        return self.models.task_names

    @property
    def kind(self) -> str:
        return self.models.kind

    def close(self) -> None:
        self.models.close()

    def __enter__(self) -> "AdapterMerge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def blocks_table(self) -> list[dict]:
        total = self.blockmap.mergeable_bytes
        return [{"block": b.name, "tensors": sum(len(self.models.modules[p].keys) for p in b.params),
                 "parameters": b.numel, "bytes": b.nbytes, "share": b.nbytes / total}
                for b in self.blockmap.blocks]

    # ---- planning ------------------------------------------------------------------------
    def _stream(self):
        """The methods' TaskVectorStream: every module's ``[N, *shape]`` task vectors, one at a time."""
        n = self.models.num_tasks

        def start():
            for b in self.blockmap.blocks:
                for w in b.params:
                    yield w, self.models.deltas(w, range(n))
        start.base = self.models.base_tensor
        return start

    def _run_global_pass(self) -> None:
        if self.method.has_global_pass and not self._global_done:
            self.models.check_finite()
            self.method.global_pass(self._stream(), self.models.num_tasks)
        self._global_done = True

    def grams(self) -> dict[str, np.ndarray]:
        """Per-block N x N Gram matrices: from the LoRA factors (no ``dW`` formed) unless the method
        transforms task vectors, then from the dense transformed ``dW`` one module at a time."""
        self._run_global_pass()
        n = self.models.num_tasks
        dense = self.method.has_transform or self.kind == "IA3"
        grams = {b.name: np.zeros((n, n)) for b in self.blockmap.blocks}
        with single_thread():  # small products: one BLAS thread (flexmerge.similarity.single_thread)
            self._gram_pass(grams, dense)
        return grams

    def _gram_pass(self, grams: dict, dense: bool) -> None:
        n = self.models.num_tasks
        for b in self.blockmap.blocks:
            for w in b.params:
                if dense:
                    taus = self.models.deltas(w, range(n))
                    if self.method.has_transform:
                        taus = self.method.transform(w, taus)
                    flat = taus.reshape(n, -1).to(torch.float64)
                    g = (flat @ flat.T).numpy()
                else:
                    g = self.models.factor_gram(w)
                if not np.isfinite(np.diag(g)).all():
                    self.models.check_finite()
                    raise FlexMergeError(f"task vectors of module '{w}' overflow; the adapters hold values too "
                                         "large to merge")
                grams[b.name] += g

    def use_plan(self, plan: Plan) -> None:
        if plan.tasks != self.tasks or plan.blocks != self.blockmap.names or plan.block_bytes != self.cost.block_bytes:
            raise FlexMergeError("plan tasks or blocks differ from these adapters'; re-run 'flexmerge plan'")
        if plan.method != self.method.describe():
            raise FlexMergeError(f"plan was made for method {method_text(plan.method)}, not "
                                 f"{method_text(self.method.describe())}; re-run 'flexmerge plan' with this method")
        self._plan = plan

    # ---- merging -------------------------------------------------------------------------
    def stored_blocks(self, grouping: Grouping):
        """Yield what the bundle stores per block (module docstring, "Storage")."""
        ms = self.models
        n = ms.num_tasks
        for bi, block in enumerate(self.blockmap.blocks):
            groups = grouping.groups[block.name]
            tensors: dict[str, torch.Tensor] = {}
            records = []
            taus = None
            if any(len(g) > 1 for g in groups):
                taus = {}
                for w in block.params:
                    t = ms.deltas(w, range(n))
                    taus[w] = self.method.transform(w, t) if self.method.has_transform else t
            for gi, members in enumerate(groups):
                if len(members) == 1:
                    records.append(StoredGroupRecord(list(members), "original"))
                    for w in block.params:
                        for key, x in zip(ms.modules[w].keys, ms.stored_factors(members[0], w)):
                            tensors[fmt.original_key(gi, 0, key)] = x.contiguous()
                    continue
                records.append(StoredGroupRecord(list(members), "merged"))
                idx = torch.tensor(list(members))
                group = GroupInput(task_vectors={w: taus[w].index_select(0, idx) for w in block.params},
                                   base={w: ms.base_tensor(w) for w in block.params},
                                   task_ids=list(members), block=block.name, seed=self.method.seed)
                merged = self.method.merge(group).merged
                for w in block.params:
                    info = ms.modules[w]
                    dtype = info.infos[0].dtype
                    m = merged[w]
                    if not bool(torch.isfinite(m).all()):
                        raise FlexMergeError(f"method {method_text(self.method.describe())} produced non-finite "
                                             f"values in block '{block.name}'; use smaller scaling parameters")
                    if ms.kind == "IA3":
                        tensors[fmt.merged_key(gi, info.keys[0])] = (1.0 + m).to(dtype).contiguous()
                        continue
                    if ms.adapters[ms.task_names[members[0]]].config.get("fan_in_fan_out"):
                        m = m.T
                    a, b = low_rank(m, info.rank)
                    tensors[fmt.merged_key(gi, info.keys[0])] = a.to(dtype).contiguous()
                    tensors[fmt.merged_key(gi, info.keys[1])] = b.to(dtype).contiguous()
            nbytes = sum(int(t.numel()) * t.element_size() for t in tensors.values())
            planned = self.cost.block_cost(bi, [len(g) for g in groups])
            if nbytes != planned:  # the size rule and the storage rule must agree
                raise RuntimeError(f"block '{block.name}': {nbytes} bytes stored, {planned} planned")
            yield StoredBlock(block.name, bi, False, records, tensors, nbytes)

    def merge(self, size: float | str | None = None, out: str | os.PathLike | None = None, *,
              plan: Plan | None = None, grouping: Grouping | None = None, force: bool = False,
              recalibrate: Any = None) -> Bundle:
        """Merge to ``size`` (adapter units, or bytes such as ``"40KB"``); write ``out`` or keep in memory."""
        if recalibrate is not None:
            raise FlexMergeError("adapters have no BatchNorm statistics to recalibrate; drop --recalibrate-bn")
        if grouping is None:
            plan = plan or self._plan or self.plan()
            grouping = plan.at(size if size is not None else plan.min_units)
        self._run_global_pass()
        stored = self.stored_blocks(grouping)
        if out is None:
            mem, entries = {}, []
            for sb in stored:
                rel = fmt.block_file(sb.index)
                mem[rel] = sb.tensors
                entries.append(self._block_entry(sb, rel))
            ts = {}
            for t, names in self.models.task_specific.items():
                mem[fmt.task_file(t)] = {k: self.models.adapters[t].source.get(k) for k in names}
                ts[t] = self._task_specific_entry(t, names)
            return Bundle(self._manifest(entries, grouping, plan, ts, hashes=False), tensors=mem)
        writer = BundleWriter(Path(out), force=force)
        try:
            entries = []
            with self.progress.task("merge", total=len(self.blockmap.blocks)) as bar:
                for sb in stored:
                    rel = fmt.block_file(sb.index)
                    writer.write(rel, sb.tensors)
                    entries.append(self._block_entry(sb, rel))
                    bar(sb.index + 1, len(self.blockmap.blocks))
            ts = {}
            for t, names in self.models.task_specific.items():
                writer.write(fmt.task_file(t), {k: self.models.adapters[t].source.get(k).contiguous() for k in names})
                ts[t] = self._task_specific_entry(t, names)
            root = writer.commit(self._manifest(entries, grouping, plan, ts, hashes=True))
        except BaseException as exc:
            writer.abort(exc)
            raise
        return Bundle.load(root)

    def _block_entry(self, sb: StoredBlock, rel: str) -> dict:
        weights = self.blockmap.blocks[sb.index].params
        keys = [k for w in weights for k in self.models.modules[w].keys]
        shapes = {k: list(i.shape) for w in weights
                  for k, i in zip(self.models.modules[w].keys, self.models.modules[w].infos)}
        return block_entry(sb, rel, self.tasks, keys, shapes)

    def _task_specific_entry(self, task: str, names: list[str]) -> dict:
        src = self.models.adapters[task].source
        return {"file": fmt.task_file(task), "names": names, "shapes": {n: list(src.info(n).shape) for n in names}}

    def _manifest(self, blocks: list[dict], grouping: Grouping, plan: Plan | None, task_specific: dict,
                  hashes: bool) -> dict:
        ms = self.models
        spec = ms.task_specific_bytes()

        def source(src):
            return {"path": str(src.path) if src.path is not None else None, "kind": src.kind,
                    "sha256": src.sha256() if hashes else None}
        return {
            "format": fmt.BUNDLE_FORMAT, "version": fmt.BUNDLE_VERSION, "tasks": self.tasks,
            "method": self.method.describe(),
            "plan": {"planner": plan.planner if plan else None, "candidate": grouping.planner,
                     "linkage": plan.linkage if plan else None, "order": plan.order if plan else None,
                     "seed": plan.seed if plan else None, "steps": grouping.steps, "statistics": "pooled",
                     "recalibration": None},
            "size": {"bytes": grouping.size_bytes, "units": grouping.size_units,
                     "unit_bytes": self.cost.unit_bytes, "max_units": len(self.tasks),
                     "task_specific_bytes": spec, "task_specific_total": sum(spec.values())},
            "blocks": blocks, "task_specific": task_specific, "aliases": {},
            "task_keys": {t: list(a.source.names()) for t, a in ms.adapters.items()},
            "sources": {"base": source(ms.base), "tasks": {t: source(a.source) for t, a in ms.adapters.items()}},
            "config": self.config.public_dict(), "assets": {},
            "adapter": {"peft_type": ms.kind, "rank_rule": RANK_RULE,
                        "configs": {t: a.config for t, a in ms.adapters.items()}},
        }
