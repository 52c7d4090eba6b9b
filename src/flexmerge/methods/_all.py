"""Imports every method module so that it registers itself.

Every module under ``methods/`` that registers a method must be listed here
(``tests/test_layout.py`` checks it); a listed module that cannot be imported is an error, never
a silently missing method."""

import importlib

METHOD_MODULES = (
    "average", "ties", "dare", "pcb", "tsv", "consensus", "emr", "breadcrumbs", "magmax", "iso",
    "wudi", "doge", "larv",
)

for _module in METHOD_MODULES:
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except Exception as exc:
        raise ImportError(f"flexmerge method module '{__package__}.{_module}' cannot be imported "
                          f"({type(exc).__name__}: {exc}); fix it or remove it from "
                          "flexmerge/methods/_all.py") from exc
