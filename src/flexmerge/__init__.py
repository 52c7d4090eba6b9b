"""flexmerge: data-free model merging at any size (FlexMerge, Dhasade et al., ICLR 2026).

The public names are imported on first use (PEP 562), so that ``import flexmerge`` and the
command's start-up do not load torch before they need it (and a Ctrl-C during start-up is
handled like any other, see :mod:`flexmerge._entry`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": ".bundle", "MergeConfig": ".config", "load_config": ".config", "FlexMerge": ".engine",
    "FlexMergeError": ".errors", "Plan": ".plan", "available_methods": ".methods",
    "make_method": ".methods", "MultiTaskModel": ".runtime",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flexmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
