"""Importing user callables (evaluators, model factories) named as ``module:function`` or
``path/to/file.py:function``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import FlexMergeError


def callable_name(fn: Any) -> str:
    """``module:qualname`` of a callable (for messages and the table's metadata)."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}:{qual}" if mod else repr(fn)


def load_callable(spec: str, what: str = "evaluator") -> Callable:
    """Import ``module:function`` (module on ``sys.path`` or the current directory) or
    ``path/to/file.py:function``; ``function`` may be dotted (``module:obj.method``)."""
    text = str(spec).strip()
    hint = (f"give {what} as module:function (module importable or in the current directory) or "
            "path/to/file.py:function")
    left, sep, attr = text.rpartition(":")
    if not sep or not left or not attr:
        raise FlexMergeError(f"{what} '{text}' is not of the form module:function; {hint}")
    is_file = left.endswith(".py") or "/" in left or os.sep in left
    try:
        if is_file:
            path = Path(left).expanduser()
            if not path.is_file():
                raise FlexMergeError(f"{what} '{text}': file {path} not found; {hint}")
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            name = f"_flexmerge_user_{path.stem}_{digest}"
            module = sys.modules.get(name)
            if module is None:
                ispec = importlib.util.spec_from_file_location(name, path)
                if ispec is None or ispec.loader is None:
                    raise FlexMergeError(f"{what} '{text}': cannot load {path} as Python; {hint}")
                module = importlib.util.module_from_spec(ispec)
                parent = str(path.resolve().parent)
                if parent not in sys.path:
                    sys.path.insert(0, parent)
                sys.modules[name] = module
                try:
                    ispec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
        else:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(left)
    except FlexMergeError:
        raise
    except SystemExit as exc:
        raise FlexMergeError(f"{what} '{text}': importing '{left}' called sys.exit({exc.code!r}); "
                             "keep module-level code free of exits (use if __name__ == '__main__')") from None
    except ModuleNotFoundError as exc:
        raise FlexMergeError(f"{what} '{text}': cannot import module '{left}' ({exc}); {hint}") from None
    except Exception as exc:
        raise FlexMergeError(f"{what} '{text}': importing '{left}' failed with "
                             f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FlexMergeError(f"{what} '{text}': '{left}' has no attribute '{attr}'; check the "
                                 "function name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FlexMergeError(f"{what} '{text}' is a {type(obj).__name__}, not a callable")
    return obj
