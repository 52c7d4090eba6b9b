"""A sweep's table for people: the :mod:`rich` table the CLI prints, and how values are written
as text (cells of ``curve.csv`` too)."""

from __future__ import annotations

import math


def rich_table(result, max_tasks: int = 8, title: str | None = None, width: int | None = None):
    """A :class:`rich.table.Table` of the rows; ablation rows carry their order and linkage
    (and seed) after the method name, calibrated rows their planner and scale. Per-task columns are added when there are at most
    ``max_tasks`` tasks and the table still fits in ``width`` characters (a console's width;
    ``None``: no limit), so that no cell is ever cut short."""
    from rich.markup import escape
    from rich.table import Table

    names = []
    for r in result.rows:
        name = r["method"]
        if r["run"] in ("order", "linkage"):
            name += f" ({r['order']}, {r['linkage']}" + (f", seed {r['seed']}" if r["seed"] is not None else "") + ")"
        elif r["run"] == "calibrated":
            name += " (calibrated: " + r.get("note", "").split(" (validation")[0] + ")"
        names.append(name)
    rows = [[escape(name), _cell(r["requested_size"]) or "-", f"{r['size_units']:.4g}",
             _human_bytes(r["size_bytes"]), _fmt(r["average"]), _fmt(r["normalized"])]
            for name, r in zip(names, result.rows)]
    columns = ["method", "size", "units", "bytes", "average", "normalized"]

    def table_width(cols: list[str], cells: list[list[str]]) -> int:
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        return sum(widths) + 3 * len(cols) + 1  # rich's default padding and borders

    with_tasks = [row + [_fmt(r["scores"].get(t)) for t in result.tasks] for row, r in zip(rows, result.rows)]
    show_tasks = len(result.tasks) <= max_tasks and (
        width is None or table_width(columns + list(result.tasks), with_tasks) <= width)
    table = Table(title=title, caption=None if show_tasks or not result.tasks else
                  "per-task scores: see curve.csv (or widen the terminal)")
    for c in columns + (list(result.tasks) if show_tasks else []):
        table.add_column(escape(c), justify="left" if c == "method" else "right", no_wrap=True)
    for row in (with_tasks if show_tasks else rows):
        table.add_row(*row)
    return table


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
