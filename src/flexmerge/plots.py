"""Plots of a sweep's table (:class:`flexmerge.evaluate.SweepResult`): small PNG files.

As in the FlexMerge paper's figures (Dhasade et al., ICLR 2026, Figs. 1, 3-6): the x axis is the
deployed size in model units (1 = one shared model, N = every task keeps its own), one line per
merge method, the fine-tuned average as a dashed horizontal line and the zero-shot average as a
dotted one. Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so plotting works headless and never disturbs a caller's interactive backend.

* ``accuracy_vs_size.png``: average score vs size.
* ``normalized_vs_size.png``: normalized score (merged / fine-tuned per task, averaged) vs size.
* ``per_task.png``: one panel per task.
* ``ablation_order.png`` / ``ablation_linkage.png``: when the table has those ablation runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .outputs import atomic_path

DPI = 100
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22"]
MARKERS = ["o", "s", "^", "D"]
STYLES = ["-", "--", "-.", ":"]


def _result(result: Any):
    from .evaluate.table import SweepResult

    if isinstance(result, SweepResult):
        return result
    if isinstance(result, Mapping):
        return SweepResult.from_dict(result)
    return SweepResult.load(result)


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
    return fig, axes


PNG_SOFTWARE = "flexmerge"


def _is_our_png(path: Path) -> bool:
    """A plot written by :func:`_save`: its PNG ``Software`` text chunk names flexmerge."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in head


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, is_dir=False, replaceable=_is_our_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": PNG_SOFTWARE})
    return path


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _series(rows: list[dict], key) -> dict[str, list[tuple[float, float]]]:
    """``{label: [(size_units, value), ...]}`` sorted by size, one point per distinct size."""
    labels: dict[str, list[tuple[float, float]]] = {}
    by_params: dict[str, set[str]] = {}
    for r in rows:
        by_params.setdefault(r["method"], set()).add(json.dumps(r["params"], sort_keys=True))
    for r in rows:
        label = r["method"]
        if len(by_params[r["method"]]) > 1:
            label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items())) + ")"
        value = key(r)
        if not _finite(value):
            continue
        pts = labels.setdefault(label, [])
        if all(abs(x - r["size_units"]) > 1e-12 for x, _ in pts):
            pts.append((r["size_units"], float(value)))
    return {k: sorted(v) for k, v in labels.items()}


def _curves(res) -> list[dict]:
    """Main rows, and calibrated rows as their own line ``<method> (calibrated)`` (their scale
    differs per size, so they are one curve whatever their parameters)."""
    rows = res.select(run="main")
    for r in res.select(run="calibrated"):
        rows.append(dict(r, method=f"{r['method']} (calibrated)", params={}))
    return rows


def _lines(ax, series: dict[str, list[tuple[float, float]]]) -> None:
    for i, (label, pts) in enumerate(series.items()):
        xs, ys = zip(*pts)
        # past the 10 colours, change marker and line style so that no two lines look alike
        cycle = i // len(COLORS)
        ax.plot(xs, ys, marker=MARKERS[cycle % len(MARKERS)], markersize=3.5, linewidth=1.4,
                linestyle=STYLES[cycle % len(STYLES)], color=COLORS[i % len(COLORS)], label=label)


def _references(ax, ft: float | None, zs: float | None) -> None:
    if _finite(ft):
        ax.axhline(ft, color="black", linestyle="--", linewidth=1.0, label="fine-tuned")
    if _finite(zs):
        ax.axhline(zs, color="gray", linestyle=":", linewidth=1.2, label="zero-shot")


def _decorate(ax, ylabel: str, title: str, max_units: float | None) -> None:
    ax.set_xlabel("size (model units)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if max_units:
        ax.set_xlim(0.8, max_units + 0.2)
    ax.grid(True, alpha=0.3)


def plot_accuracy(result, path: str | os.PathLike, *, ylabel: str = "score") -> Path:
    """Average score vs size, one line per method, fine-tuned and zero-shot levels."""
    res = _result(result)
    fig, (ax,) = _figure(6.0, 4.0)
    _lines(ax, _series(_curves(res), lambda r: r["average"]))
    _references(ax, res.finetuned_average, res.zero_shot_average)
    _decorate(ax, f"average {ylabel}", f"{ylabel} vs size ({len(res.tasks)} tasks)", res.meta.get("max_units"))
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))


def plot_normalized(result, path: str | os.PathLike, *, ylabel: str = "score") -> Path:
    """Normalized score (merged / fine-tuned per task, averaged) vs size."""
    res = _result(result)
    fig, (ax,) = _figure(6.0, 4.0)
    _lines(ax, _series(_curves(res), lambda r: r["normalized"]))
    zs = [r for r in res.select(run="reference", method="zero-shot")]
    _references(ax, 1.0, zs[0]["normalized"] if zs else None)
    _decorate(ax, f"normalized {ylabel}", f"normalized {ylabel} vs size", res.meta.get("max_units"))
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))


def plot_per_task(result, path: str | os.PathLike, *, ylabel: str = "score") -> Path:
    """One panel per task: that task's score vs size per method, with its reference levels."""
    res = _result(result)
    n = len(res.tasks)
    cols = min(4, n)
    rows_ = math.ceil(n / cols)
    n_labels = len({r["method"] for r in _curves(res)}) + 2
    legend_h = 0.3 * math.ceil(n_labels / 5) + 0.15
    fig, axes = _figure(3.0 * cols, 2.4 * rows_ + legend_h, rows_, cols)
    main = _curves(res)
    for i, task in enumerate(res.tasks):
        ax = axes[i]
        _lines(ax, _series(main, lambda r, t=task: r["scores"].get(t)))
        _references(ax, res.finetuned.get(task), (res.zero_shot or {}).get(task))
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i >= n - cols:
            ax.set_xlabel("size (model units)", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    bottom = legend_h / (2.4 * rows_ + legend_h)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7,
                   bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return _save(fig, Path(path))


def plot_ablation(result, path: str | os.PathLike, run: str, *, ylabel: str = "score") -> Path | None:
    """Average score vs size for the ``order`` or ``linkage`` ablation runs (None if absent)."""
    res = _result(result)
    rows = res.select(run=run)
    if not rows:
        return None
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        label = r["order"] if run == "order" else r["linkage"]
        if r["seed"] is not None and r["order"] == "random":
            label += f" (seed {r['seed']})"
        methods = {x["method"] for x in rows}
        if len(methods) > 1:
            label = f"{r['method']}: {label}"
        if not _finite(r["average"]):
            continue
        pts = series.setdefault(label, [])
        if all(abs(x - r["size_units"]) > 1e-12 for x, _ in pts):
            pts.append((r["size_units"], r["average"]))
    fig, (ax,) = _figure(6.0, 4.0)
    _lines(ax, {k: sorted(v) for k, v in series.items()})
    _references(ax, res.finetuned_average, res.zero_shot_average)
    name = ", ".join(sorted({r["method"] for r in rows}))
    _decorate(ax, f"average {ylabel}", f"{run} ablation ({name})", res.meta.get("max_units"))
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))


def plot_all(result, out: str | os.PathLike, *, ylabel: str = "score") -> list[Path]:
    """Write every plot that the table supports into directory ``out``; return the paths."""
    res = _result(result)
    root = Path(out).expanduser()
    paths = [plot_accuracy(res, root / "accuracy_vs_size.png", ylabel=ylabel),
             plot_normalized(res, root / "normalized_vs_size.png", ylabel=ylabel),
             plot_per_task(res, root / "per_task.png", ylabel=ylabel)]
    for run in ("order", "linkage"):
        p = plot_ablation(res, root / f"ablation_{run}.png", run, ylabel=ylabel)
        if p is not None:
            paths.append(p)
    return paths
