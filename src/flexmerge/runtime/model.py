"""The public :class:`MultiTaskModel`: loading a bundle, serving mixed batches, facts."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..bundle import Bundle
from ..errors import FlexMergeError
from .batching import _concat_inputs, _left_pad_prompts, _split, _strip_left
from .build import _factory_takes_task, _load, _ModuleSpec
from .hf import _generation_config, _hf_builder
from .modules import _Routed
from .routing import _Router
from .sources import _Stored
from .storage import _Store


class MultiTaskModel:
    """All tasks of a bundle served from one copy of its stored tensors (see :mod:`flexmerge.runtime`)."""

    def __init__(self, bundle: Bundle, model: nn.Module, router: _Router, store: _Store,
                 order: list[int], specs: list[_ModuleSpec], routed: dict[str, _Routed],
                 input_kind: str):
        self.bundle = bundle
        self.model = model
        self.tasks: list[str] = list(bundle.tasks)
        self.task_order: list[str] = [self.tasks[i] for i in order]
        self._rank = {t: i for i, t in enumerate(self.task_order)}
        self._router = router
        self._store = store
        self._routed = routed
        self._input_kind = input_kind  # "hf" | "plain"
        self._lock = threading.Lock()

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path_or_bundle: str | os.PathLike | Bundle, model_factory: Callable | None = None,
                    rebuild_policy: str = "on_the_fly", cache_budget_bytes: int | None = None,
                    verify: bool = True, base: str | os.PathLike | None = None) -> "MultiTaskModel":
        """Load a bundle for serving.

        ``model_factory``: builds the (untrained) torch module. Called as ``model_factory(task)``
        if it accepts one positional argument (then once per task, on the ``meta`` device, to
        check each task's parameter names and shapes; the first task's module serves), else as
        ``model_factory()`` (once; task-specific parameters may then differ in shape from the
        module's). It must return a new module: its submodules are replaced by routed ones. Without
        it, an HF bundle builds the class named in ``architectures`` of each task's
        ``config.json`` with ``from_config`` (no download). ``rebuild_policy`` and
        ``cache_budget_bytes``: for mask methods (see :mod:`flexmerge.runtime`). ``verify``: check every
        bundle file against its sha256 first.

        Adapter bundles (PEFT LoRA / (IA)3, :mod:`flexmerge.runtime.adapters`): the base model the
        bundle records, or ``base`` (a path); ``model_factory()`` (no task argument) builds its
        architecture, else the HF class of the base directory's ``config.json``.
        """
        if rebuild_policy not in ("on_the_fly", "cache"):
            raise FlexMergeError(f"rebuild_policy {rebuild_policy!r} is unknown; use 'on_the_fly' or 'cache'")
        if cache_budget_bytes is not None and cache_budget_bytes < 0:
            raise FlexMergeError("cache_budget_bytes must be >= 0 (or None for no limit)")
        if isinstance(path_or_bundle, Bundle):
            bundle = path_or_bundle
            if verify:
                bundle.verify()
        else:
            bundle = Bundle.load(path_or_bundle, verify=verify)
        if bundle.manifest.get("adapter"):  # PEFT adapters: side paths on the base model
            from .adapters import load_adapter_bundle

            return load_adapter_bundle(cls, bundle, base, model_factory, verify)
        if base is not None:
            raise FlexMergeError("base= is for adapter bundles; a bundle of full checkpoints holds its own weights")
        if model_factory is None:
            build, per_task, kind = _hf_builder(bundle), True, "hf"
        else:
            if not callable(model_factory):
                raise FlexMergeError("model_factory must be a callable returning a torch module")
            per_task = _factory_takes_task(model_factory)
            build = (lambda t: model_factory(t)) if per_task else (lambda t: model_factory())
            kind = "plain"
        return _load(cls, bundle, build, per_task, kind, rebuild_policy, cache_budget_bytes)

    # ---- serving ------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.forward(batch)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``{task: inputs}`` -> ``{task: outputs}``; inputs: a dict of tensors (HF models: the
        keyword arguments) or a tensor / tuple of tensors (positional arguments); first dim = rows."""
        if not isinstance(batch, Mapping) or not batch:
            raise FlexMergeError("give a non-empty dict {task: inputs}")
        for t in batch:
            if t not in self._rank:
                raise FlexMergeError(f"unknown task '{t}'; this bundle has: {', '.join(self.tasks)}")
        tasks = sorted(batch, key=self._rank.__getitem__)
        args, kwargs, rows = _concat_inputs(tasks, batch)
        if self._input_kind == "hf" and "labels" in kwargs:
            raise FlexMergeError("inputs contain 'labels': losses are not routed per task; pass inputs "
                                 "without labels and compute losses from the returned logits")
        tidx = {t: i for i, t in enumerate(self.tasks)}
        layout = tuple((tidx[t], n) for t, n in zip(tasks, rows))
        r = self._router
        with self._lock, torch.inference_mode():
            r.stack = [layout]
            r._runs.clear()
            r.padded = []
            try:
                out = self.model(*args, **kwargs)
                padded = r.padded
            finally:
                r.stack, r.padded = [], []
        result, start = {}, 0
        for t, n in zip(tasks, rows):
            result[t] = _split(out, start, start + n, sum(rows), padded, tidx[t])
            start += n
        return {t: result[t] for t in batch}

    def generate(self, inputs: Any, task: str | None = None, **kwargs) -> Any:
        """Generate with a causal LM's tasks (HF ``generate``), each task on its own weights.

        ``generate(input_ids, task="t0", max_new_tokens=20)``: one task (``inputs``: the
        ``input_ids`` tensor, or a dict of ``generate``'s tensor arguments such as ``input_ids`` and
        ``attention_mask``); returns what ``generate`` returns. ``generate({"t0": ids0, "t1": ids1},
        max_new_tokens=20)``: several tasks in one batch (rows concatenated as in :meth:`forward`);
        prompts of different lengths across tasks are left-padded to the longest with the model's
        ``pad_token_id`` (else its ``eos_token_id``) and masked, as HF batches prompts, and each
        task's returned sequences start with its own prompt (the padding columns removed; rows may
        carry trailing padding up to the batch's longest generation, as in any HF batch); returns
        ``{task: output}``. Each task uses its stored ``generation_config.json`` unless ``generation_config``
        is given (tasks of one batch must then have the same one). Beam search and several
        sequences per prompt: one task per call."""
        if not hasattr(self.model, "generate"):
            raise FlexMergeError(f"the served model ({type(self.model).__name__}) has no generate(); it needs an "
                                 "HF model with a language-model head (e.g. *ForCausalLM)")
        batch = {task: inputs} if task is not None else inputs
        if not isinstance(batch, Mapping) or not batch:
            raise FlexMergeError("give generate(input_ids, task=NAME) or generate({task: input_ids, ...})")
        for t in batch:
            if t not in self._rank:
                raise FlexMergeError(f"unknown task '{t}'; this bundle has: {', '.join(self.tasks)}")
        tasks = sorted(batch, key=self._rank.__getitem__)
        if "generation_config" not in kwargs:
            configs = {t: _generation_config(self.bundle, t) for t in tasks}
            distinct = {json.dumps(c.to_dict(), sort_keys=True, default=str) if c is not None else None
                        for c in configs.values()}
            if len(distinct) > 1:
                raise FlexMergeError(f"tasks {', '.join(tasks)} store different generation configs; generate them in "
                                     "separate calls or pass generation_config=")
            if configs[tasks[0]] is not None:
                kwargs["generation_config"] = configs[tasks[0]]
        if len(tasks) > 1:
            gc = kwargs.get("generation_config")
            if max(int(kwargs.get(k) or getattr(gc, k, 1) or 1) for k in ("num_beams", "num_return_sequences")) > 1:
                raise FlexMergeError("beam search and several sequences per prompt need one task per call; "
                                     "call generate(input_ids, task=NAME) for each task")
            if any(m._widths is not None for m in self._routed.values()):
                raise FlexMergeError("these tasks' heads differ in width (task-specific tensors); generate one task "
                                     "per call: generate(input_ids, task=NAME)")
        pads, order = {t: 0 for t in tasks}, list(batch)
        if len(tasks) > 1:
            batch, pads = _left_pad_prompts(tasks, batch, lambda: self._pad_token_id(kwargs, check=True))
        args, inner, rows = _concat_inputs(tasks, batch)
        inner.update(kwargs)
        if any(pads.values()) and "pad_token_id" not in inner and getattr(inner.get("generation_config"),
                                                                          "pad_token_id", None) is None:
            inner["pad_token_id"] = self._pad_token_id(kwargs)
        tidx = {t: i for i, t in enumerate(self.tasks)}
        r = self._router
        with self._lock, torch.inference_mode():
            r.stack = [tuple((tidx[t], n) for t, n in zip(tasks, rows))]
            r._runs.clear()
            r.padded = []
            try:
                out = self.model.generate(*args, **inner)
            finally:
                r.stack, r.padded = [], []
        if task is not None:
            return out
        result, start = {}, 0
        for t, n in zip(tasks, rows):
            result[t] = _strip_left(_split(out, start, start + n, sum(rows), [], tidx[t]), pads[t])
            start += n
        return {t: result[t] for t in order}

    def _pad_token_id(self, kwargs: dict, check: bool = False) -> int | None:
        """The id that left-pads shorter prompts: ``pad_token_id`` given, or of the generation
        config given or stored, or of the model's config; else its first ``eos_token_id``.
        ``check``: an id outside the input embedding's rows is a one-line error."""
        sources = [kwargs, kwargs.get("generation_config"), getattr(self.model, "generation_config", None),
                   getattr(self.model, "config", None)]
        for name in ("pad_token_id", "eos_token_id"):
            for src in sources:
                v = src.get(name) if isinstance(src, dict) else getattr(src, name, None)
                if isinstance(v, (list, tuple)):
                    v = v[0] if v else None
                if isinstance(v, int):
                    emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
                    rows = getattr(getattr(emb, "weight", None), "shape", (None,))[0]
                    if check and rows is not None and not 0 <= v < rows:
                        raise FlexMergeError(f"the {name} {v} that would pad the shorter prompts is outside the "
                                             f"model's {rows} token ids; pass pad_token_id= (an id below {rows})")
                    return v
        return None

    def ensemble(self, inputs: Any, head: Callable[[str, Any], torch.Tensor],
                 tasks: list[str] | None = None, combine: str = "probs") -> torch.Tensor:
        """Predict for a task the bundle does not hold by ensembling its task branches (FlexMerge,
        Dhasade et al., ICLR 2026, Appendix C.6: out-of-distribution tasks).

        ``inputs`` run through the branch of every task in ``tasks`` (default: all) in one mixed
        batch; ``head(task, outputs)`` maps one branch's outputs to logits ``[rows, classes]``
        (e.g. a linear head on pooled hidden states: pass ``output_hidden_states=True`` among the
        inputs of an HF model). ``combine="probs"`` returns the mean over branches of the softmax
        probabilities, ``"logits"`` the mean of the logits; ``[rows, classes]`` either way.
        """
        if combine not in ("probs", "logits"):
            raise FlexMergeError(f"combine={combine!r} is unknown; use 'probs' or 'logits'")
        if not callable(head):
            raise FlexMergeError("head must be a callable (task, outputs) -> logits [rows, classes]")
        tasks = list(dict.fromkeys(self.tasks if tasks is None else tasks))
        if not tasks:
            raise FlexMergeError("give at least one task to ensemble over")
        outputs = self.forward({t: inputs for t in tasks})
        total = None
        for t in tasks:
            logits = head(t, outputs[t])
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise FlexMergeError(f"head returned {type(logits).__name__} for task '{t}'; it must "
                                     "return logits [rows, classes]")
            part = logits.float().softmax(-1) if combine == "probs" else logits.float()
            if total is not None and part.shape != total.shape:
                raise FlexMergeError(f"head gave task '{t}' logits of shape {tuple(part.shape)} but "
                                     f"{tuple(total.shape)} for another task; one head, one class count")
            total = part if total is None else total + part
        return total / len(tasks)

    # ---- facts --------------------------------------------------------------------------
    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """The tensors ``task`` runs with, by parameter name: stored tensors themselves (shared
        with every task of the group, no copy); masked ones rebuilt (fresh tensors)."""
        if task not in self._rank:
            raise FlexMergeError(f"unknown task '{task}'; this bundle has: {', '.join(self.tasks)}")
        ti = self.tasks.index(task)
        out = {}
        for m in self._routed.values():
            g = m._mapping[ti]
            for fname, src in zip(m._fnames, m._variants[g]):
                out[fname] = src.tensor if isinstance(src, _Stored) else src.rebuild()
        return out

    def variants(self, name: str) -> int:
        """How many distinct weight sets the module ``name`` holds."""
        return len(self._routed[name]._variants)

    def stats(self) -> dict:
        r = self._router
        return {"tasks": len(self.tasks), "policy": r.policy,
                "stored_bytes": self._store.file_bytes(), "loaded_bytes": self._store.loaded_bytes(),
                "cache_bytes": r.cache_bytes, "cache_entries": len(r.cache),
                "scratch_bytes": sum(t.numel() * t.element_size() for t in r.scratch.values()),
                "rebuilds": r.rebuilds}

    def clear_cache(self) -> None:
        self._router.clear_cache()

    def __repr__(self) -> str:
        return (f"MultiTaskModel({len(self.tasks)} tasks, {self.bundle.size_units:.3g} units, "
                f"policy={self._router.policy})")
