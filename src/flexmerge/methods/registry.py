"""Name -> method class; ``make_method`` builds one from a config value."""

from __future__ import annotations

from typing import Any

from ..errors import FlexMergeError
from .base import MergeMethod

_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[MergeMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FlexMergeError(
            f"unknown merge method '{name}'; choose one of: {', '.join(available_methods())}"
        ) from None


def make_method(spec: Any, seed: int = 0, overrides: dict[str, Any] | None = None) -> MergeMethod:
    """Build a method from ``"name"``, ``{"name": ..., **params}`` or an instance."""
    if isinstance(spec, MergeMethod):
        if overrides:
            return make_method(spec.describe(), seed=spec.seed, overrides=overrides)
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise FlexMergeError("method must be a name or a mapping with a 'name' key, e.g. {name: ties, k: 0.2}")
    else:
        raise FlexMergeError(f"method must be a name or a mapping, got {type(spec).__name__}")
    params.update(overrides or {})
    return method_class(name)(seed=seed, **params)
