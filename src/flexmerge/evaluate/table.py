"""The table of one sweep (:class:`SweepResult`): reference levels, one row per (run, method,
size), notes; written as ``curve.csv`` and ``curve.json`` (atomically), read back from either."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import FlexMergeError
from ..outputs import atomic_path, json_format_of, write_json_atomic
from . import render
from .render import _cell

CURVE_FORMAT = "flexmerge-curve"
CURVE_VERSION = 1
CSV_NAME = "curve.csv"
OUT_HINT = "choose another output directory (-o)"
JSON_NAME = "curve.json"
CSV_FIELDS = ["run", "method", "params", "order", "linkage", "seed", "requested_size", "size_units",
              "size_bytes", "steps", "average", "normalized"]
"""Leading CSV columns; then ``score:<task>`` per task, then ``evaluated`` and ``note``."""


def _is_curve_csv(path: Path) -> bool:
    """A ``curve.csv`` written by :meth:`SweepResult.write` (its header starts with ours)."""
    if not path.is_file():
        return False
    try:
        with open(path, newline="") as fh:
            first = fh.readline(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith(",".join(CSV_FIELDS))


def check_out(out: str | os.PathLike) -> None:
    """Refuse, before any evaluation, an output directory whose ``curve.csv`` or ``curve.json``
    flexmerge did not write (the same rule as :meth:`SweepResult.write`)."""
    from ..outputs import check_target

    root = Path(out).expanduser()
    check_target(root / CSV_NAME, what="curve table", replaceable=_is_curve_csv, force=None, hint=OUT_HINT)
    check_target(root / JSON_NAME, what="curve table", replaceable=lambda p: json_format_of(p) == CURVE_FORMAT,
                 force=None, hint=OUT_HINT)


@dataclass
class SweepResult:
    """The table of one sweep: reference levels, one row per (run, method, size), notes."""

    tasks: list[str]
    rows: list[dict] = field(default_factory=list)
    finetuned: dict[str, float] = field(default_factory=dict)
    zero_shot: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    complete: bool = False

    # ---- views -----------------------------------------------------------------------------
    def select(self, run: str | None = None, method: str | None = None) -> list[dict]:
        return [r for r in self.rows if (run is None or r["run"] == run)
                and (method is None or r["method"] == method)]

    @property
    def finetuned_average(self) -> float | None:
        return _mean(self.finetuned.values()) if self.finetuned else None

    @property
    def zero_shot_average(self) -> float | None:
        return _mean(self.zero_shot.values()) if self.zero_shot else None

    # ---- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": CURVE_FORMAT, "version": CURVE_VERSION, "complete": self.complete,
                "tasks": self.tasks, "finetuned": self.finetuned, "zero_shot": self.zero_shot,
                "notes": self.notes, "meta": self.meta, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "curve table") -> "SweepResult":
        if d.get("format") != CURVE_FORMAT:
            raise FlexMergeError(f"{where} is not a flexmerge curve table (no 'format: {CURVE_FORMAT}'); "
                                 "make one with 'flexmerge curve'")
        return cls(tasks=list(d["tasks"]), rows=list(d["rows"]), finetuned=dict(d.get("finetuned") or {}),
                   zero_shot=d.get("zero_shot"), notes=list(d.get("notes", [])), meta=dict(d.get("meta", {})),
                   complete=bool(d.get("complete", False)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SweepResult":
        p = Path(path)
        if p.is_dir():
            p = p / JSON_NAME
        try:
            return cls.from_dict(json.loads(p.read_text()), where=str(p))
        except FileNotFoundError:
            raise FlexMergeError(f"curve table not found: {p}; make one with 'flexmerge curve'") from None
        except json.JSONDecodeError as exc:
            raise FlexMergeError(f"{p} is not valid JSON ({exc.msg}); re-run 'flexmerge curve'") from None

    def csv_header(self) -> list[str]:
        return CSV_FIELDS + [f"score:{t}" for t in self.tasks] + ["evaluated", "note"]

    def csv_rows(self) -> list[list]:
        out = []
        for r in self.rows:
            line = [r["run"], r["method"], json.dumps(r["params"], sort_keys=True), r["order"] or "",
                    r["linkage"] or "", "" if r["seed"] is None else r["seed"], _cell(r["requested_size"]),
                    repr(r["size_units"]), r["size_bytes"], "" if r["steps"] is None else r["steps"],
                    _cell(r["average"]), _cell(r["normalized"])]
            line += [_cell(r["scores"].get(t)) for t in self.tasks]
            line += [int(bool(r.get("evaluated"))), r.get("note", "")]
            out.append(line)
        return out

    def write(self, out: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``curve.csv`` and ``curve.json`` into directory ``out`` (each atomically)."""
        root = Path(out).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = root / CSV_NAME, root / JSON_NAME
        with atomic_path(csv_path, is_dir=False, replaceable=_is_curve_csv, force=None, hint=OUT_HINT) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(self.csv_header())
                w.writerows(self.csv_rows())
        write_json_atomic(json_path, self.to_dict(), replaceable=lambda p: json_format_of(p) == CURVE_FORMAT,
                          force=None, hint=OUT_HINT)
        return csv_path, json_path

    def rich_table(self, max_tasks: int = 8, title: str | None = None, width: int | None = None):
        """A :class:`rich.table.Table` of the rows (see :func:`flexmerge.evaluate.render.rich_table`)."""
        return render.rich_table(self, max_tasks=max_tasks, title=title, width=width)


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else float("nan")
