"""Data-free merge methods, one module each, registered by name (see :mod:`.base`)."""

from .base import GroupInput, MergeMethod, MethodParams, StoredGroup
from .registry import available_methods, make_method, method_class, register

# Importing a method module registers it; _all imports every one of them.
from . import _all  # noqa: F401,E402

__all__ = [
    "GroupInput",
    "MergeMethod",
    "MethodParams",
    "StoredGroup",
    "available_methods",
    "make_method",
    "method_class",
    "register",
]
