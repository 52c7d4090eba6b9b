"""Imports every optional method module so that it registers itself."""

import importlib

for _module in (
    "ties", "dare", "pcb", "tsv", "consensus", "emr", "breadcrumbs", "magmax", "iso",
):
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except ModuleNotFoundError as exc:  # a method module not written yet
        if exc.name != f"{__package__}.{_module}":
            raise
