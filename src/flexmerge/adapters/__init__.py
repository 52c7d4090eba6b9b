"""PEFT adapters (LoRA, (IA)3) in and out: flexible merging of adapters of one base model.

* :mod:`.source`: adapter directories read and checked; task vectors one module at a time;
  Gram entries from LoRA factors.
* :mod:`.engine`: :class:`AdapterMerge` (plan, merge, bundle), sizes in units of one adapter.
* :mod:`.export`: a task as a PEFT adapter directory; every task as a set of named adapters for
  PEFT's mixed batches.

A config is an adapter config when its tasks are adapter directories (they hold
``adapter_config.json``): no extra key, as a PEFT user would write it. :func:`open_job` picks
:class:`AdapterMerge` or :class:`flexmerge.engine.FlexMerge` accordingly.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..config import MergeConfig, resolve_config
from .source import is_adapter_dir


def uses_adapters(cfg: MergeConfig) -> bool:
    """True when the config's tasks are PEFT adapter directories."""
    return any(is_adapter_dir(p) for p in cfg.tasks.values())


def open_job(config: str | os.PathLike | Mapping[str, Any] | MergeConfig, *, method=None,
             method_params: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
             progress: bool = False):
    """An :class:`~.engine.AdapterMerge` for adapter configs, else a :class:`flexmerge.engine.FlexMerge`."""
    cfg = resolve_config(config, overrides)
    if uses_adapters(cfg):
        from .engine import AdapterMerge

        return AdapterMerge(cfg, method=method, method_params=method_params, progress=progress)
    from ..engine import FlexMerge

    return FlexMerge(cfg, method=method, method_params=method_params, progress=progress)
