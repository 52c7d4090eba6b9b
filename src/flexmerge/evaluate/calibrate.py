"""Optional calibration with validation data: per size, the planner and the method's scale.

The data-free path (a fixed planner, the method's default scale) stays the default. Given a
*validation* evaluator (same signature as the sweep's evaluator, scoring held-out examples that
are not the test examples) and a budget of evaluator calls, :func:`calibrate` picks for every
requested size

1. the **planner** whose grouping at that size scores best on validation (candidates:
   :data:`CALIBRATION_PLANNERS`; planners that reach the same grouping are evaluated once), then
2. the method's **scale** (``lambda`` for task arithmetic, TIES, PCB...; ``alpha`` for TSV-M and
   Iso-C/CTS; see :func:`scale_parameter`) by a pattern search on a geometric grid: from the
   start scale ``s``, try ``s / step`` and ``s * step`` and keep walking in the better direction
   while the validation score improves (``step`` = 1.25 by default).

Why both: the paper tunes its scaling coefficients on validation data (FlexMerge Sec. 5,
"Hyperparameters"); a group of two similar tasks wants a scale near 1 while the one-model merge of
all tasks wants a larger one, so a single scale for all sizes is wrong somewhere. And which
data-free planner wins can change with the size (:mod:`flexmerge.planners`).

The score of a candidate is the *normalized* validation score (merged / fine-tuned per task,
averaged), so the fine-tuned checkpoints are evaluated once on validation first (``N`` calls).
Each candidate costs ``N`` calls (one per task) unless it reaches a grouping already evaluated
with the same parameters. The budget is spread over the sizes: sizes are calibrated smallest
first, each may spend ``remaining budget // remaining sizes`` calls (what one size leaves unused
goes to the next), every size evaluates at least its start candidate, and the search at a size
starts from the scale chosen at the previous size. Sizes at which every task keeps its own
checkpoint need no calibration. The smallest useful budget is ``N * (1 + sizes)``.

A choice is only as good as the validation data: a few hundred examples per task resolve
differences of about a point. The choices and every candidate's validation score are returned
(:class:`Calibration`) and written into the sweep's table (``meta["calibration"]``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import FlexMergeError

CALIBRATION_PLANNERS = ("similarity", "distortion", "hybrid")
"""Planners a calibration chooses among (``auto`` picks among these groupings data-free)."""

SCALE_PARAMETERS = ("lambda", "alpha")
"""Names of a method's overall scale, in order of preference (see :func:`scale_parameter`)."""


def scale_parameter(method) -> tuple[str, float] | None:
    """``(name, default)`` of the method's overall scale, or ``None`` when it has none.

    The scale is the first parameter among :data:`SCALE_PARAMETERS` (by its YAML name) whose
    value is a number: task arithmetic, TIES, PCB, MagMax, Breadcrumbs (``lambda``), TSV-M,
    Iso-C/CTS (``alpha``). A method without one (EMR, consensus/TALL, whose ``lambda_c`` is a mask
    threshold) is calibrated in its planner only."""
    described = method.describe()
    for name in SCALE_PARAMETERS:
        value = described.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return name, float(value)
    return None


@dataclass
class Choice:
    """What calibration chose at one size, and the validation score behind it."""

    size: float | str
    planner: str
    params: dict
    validation: float | None
    units: float
    candidates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"size": self.size, "planner": self.planner, "params": self.params,
                "validation": self.validation, "units": self.units, "candidates": self.candidates}


@dataclass
class Calibration:
    """The choices per size of one method, and how many evaluator calls they took."""

    method: str
    scale: str | None
    choices: list[Choice]
    evaluations: int
    budget: int
    finetuned_validation: dict[str, float]
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "scale": self.scale, "evaluations": self.evaluations,
                "budget": self.budget, "finetuned_validation": self.finetuned_validation, "skipped": self.skipped,
                "choices": [c.to_dict() for c in self.choices]}


DEFAULT_CANDIDATES_PER_SIZE = 6
"""Without a budget: ``N * (1 + 6 * sizes)`` calls, enough for the three planners and a scale
search of three steps at every size."""


def check_budget(budget: Any, num_tasks: int, num_sizes: int) -> int:
    """The budget as an int (``None``: the default, :data:`DEFAULT_CANDIDATES_PER_SIZE`), or a
    one-line error naming the smallest useful budget."""
    need = num_tasks * (1 + num_sizes)
    if budget is None:
        return num_tasks * (1 + DEFAULT_CANDIDATES_PER_SIZE * num_sizes)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise FlexMergeError(f"calibration budget {budget!r} must be a whole number of evaluator calls, "
                             f"e.g. {need * 4}")
    if budget < need:
        raise FlexMergeError(f"calibration budget {budget} is below the smallest useful budget {need} "
                             f"({num_tasks} fine-tuned validation calls + {num_tasks} per size for "
                             f"{num_sizes} sizes); raise it")
    return budget


class _Calibrator:
    def __init__(self, config, spec, sizes, validation_evaluator, budget, *, planners, step, model_factory,
                 log, progress):
        from ..engine import FlexMerge
        from .session import Session

        if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 1):
            raise FlexMergeError(f"calibration step {step!r} must be a number above 1, e.g. 1.25")
        self.vst = Session(config, validation_evaluator, model_factory, None, False, None, None, progress)
        self.cfg = self.vst.cfg
        self.spec = spec
        self.step = float(step)
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.fm = FlexMerge(self.cfg, method=spec, progress=progress)
        self.name = self.fm.method.name
        self.n = len(self.vst.tasks)
        self.scale = scale_parameter(self.fm.method)
        self.planners = list(dict.fromkeys(planners))
        for p in self.planners:
            if p not in CALIBRATION_PLANNERS:
                raise FlexMergeError(f"unknown calibration planner '{p}'; use {', '.join(CALIBRATION_PLANNERS)}")
        plan, reachable = self.fm.plan(), []
        self.skipped: list[str] = []  # sizes outside the method's range, skipped as the sweep skips them
        for size in sizes:
            try:
                reachable.append((plan.target_bytes(size), size))
            except FlexMergeError as exc:
                self.skipped.append(f"{self.name}: calibration at size {size} skipped ({exc})")
        self.sizes = [size for _, size in sorted(reachable, key=lambda x: x[0])]
        self.budget = check_budget(budget, self.n, len(self.sizes))
        self.fms: dict[float | None, Any] = {None if self.scale is None else self.scale[1]: self.fm}
        self.plans: dict[str, Any] = {}

    # ---- candidates ------------------------------------------------------------------------
    def plan(self, planner: str):
        if planner not in self.plans:
            self.plans[planner] = self.fm.plan(grams=self.fm.plan().grams, planner=planner)
        return self.plans[planner]

    def close(self) -> None:
        for fm in self.fms.values():
            fm.close()

    def job(self, scale: float | None):
        """The merge job of the method at ``scale`` (the same plan; only the merge differs)."""
        from ..engine import FlexMerge
        from ..methods.base import MAX_SCALE

        if scale not in self.fms:
            if not 0 < scale <= MAX_SCALE:
                return None
            spec = dict(self.spec) if isinstance(self.spec, Mapping) else {"name": self.name}
            spec[self.scale[0]] = scale
            self.fms[scale] = FlexMerge(self.cfg, method=spec, progress=self.progress)
        return self.fms[scale]

    def cost(self, fm, grouping) -> int:
        """Evaluator calls a candidate would take (0 when evaluated before or unmerged)."""
        key = self.vst.grouping_key(self._method_key(fm), fm.blockmap, grouping)
        return 0 if key == "original" or key in self.vst.cache else self.n

    @staticmethod
    def _method_key(fm) -> str:
        return json.dumps([fm.method.describe(), fm.method.seed if fm.method.randomized else None],
                          sort_keys=True, default=str)

    def evaluate(self, planner: str, scale: float | None, size) -> float | None:
        fm = self.job(scale)
        if fm is None:
            return None
        plan = self.plan(planner)
        grouping = plan.at(size)
        params = {k: v for k, v in fm.method.describe().items() if k != "name"}
        row = self.vst.run(fm=fm, grouping=grouping, plan=plan, method_name=self.name, params=params,
                           run="calibration", order=self.cfg.order, linkage=self.cfg.linkage, seed=None,
                           requested=size, note=f"planner {planner}")
        self.log(f"calibration {self.name} at {size}: planner {planner}"
                 + (f", {self.scale[0]} {scale:g}" if self.scale else "")
                 + f": validation {row['normalized']:.4f}")
        return row["normalized"]

    # ---- the search ------------------------------------------------------------------------
    def run(self) -> Calibration:
        self.vst.references(False)
        ft = dict(self.vst.result.finetuned)
        if any(v is None or not v > 0 for v in ft.values()):
            raise FlexMergeError("calibration needs a positive fine-tuned validation score for every task "
                                 f"(got {ft}); check the validation evaluator")
        choices = []
        scale = self.scale[1] if self.scale else None
        for k, size in enumerate(self.sizes):
            left = len(self.sizes) - k
            allowance = (self.budget - self.vst.evaluations) // left
            spent0 = self.vst.evaluations
            choice = self._calibrate_size(size, scale, lambda: allowance - (self.vst.evaluations - spent0))
            scale = choice.params.get(self.scale[0], scale) if self.scale else None
            choices.append(choice)
        return Calibration(self.name, self.scale[0] if self.scale else None, choices, self.vst.evaluations,
                           self.budget, ft, list(self.skipped))

    def _calibrate_size(self, size, scale, allowance: Callable[[], int]) -> Choice:
        tried: dict[tuple[str, float | None], float] = {}
        first = self.cfg.planner if self.cfg.planner in self.planners else self.planners[0]
        order = [first] + [p for p in self.planners if p != first]

        def attempt(planner: str, s: float | None, forced: bool = False) -> float | None:
            if (planner, s) in tried:
                return tried[(planner, s)]
            fm = self.job(s)
            if fm is None:
                return None
            grouping = self.plan(planner).at(size)
            if not forced and self.cost(fm, grouping) > allowance():
                return None
            value = self.evaluate(planner, s, size)
            tried[(planner, s)] = value
            return value

        for i, p in enumerate(order):
            attempt(p, scale, forced=i == 0)
        best_p = max(order, key=lambda p: (tried.get((p, scale), -math.inf), -order.index(p)))
        best_s = scale
        if self.scale is not None:
            best_v = tried[(best_p, scale)]
            direction = 0
            for d in (-1, 1):
                s = _round(scale * self.step ** d)
                v = attempt(best_p, s)
                if v is not None and v > best_v:
                    best_v, best_s, direction = v, s, d
            while direction:
                s = _round(best_s * self.step ** direction)
                v = attempt(best_p, s)
                if v is None or v <= best_v:
                    break
                best_v, best_s = v, s
        fm = self.job(best_s)
        grouping = self.plan(best_p).at(size)
        params = {k: v for k, v in fm.method.describe().items() if k != "name"}
        return Choice(size=size, planner=best_p, params=params, validation=tried[(best_p, best_s)],
                      units=grouping.size_units,
                      candidates=[{"planner": p, **({self.scale[0]: s} if self.scale else {}), "validation": v}
                                  for (p, s), v in tried.items()])


def _round(x: float) -> float:
    """Scales on the grid are kept to 6 significant digits (readable, and equal when re-reached)."""
    return float(f"{x:.6g}")


def calibrate(config: Any, method: Any, sizes: Sequence[float | str] | str, validation_evaluator: Callable,
              budget: int | None = None, *, planners: Sequence[str] = CALIBRATION_PLANNERS, step: float = 1.25,
              model_factory: Callable[[str], Any] | None = None, log: Callable[[str], None] | None = None,
              progress: bool = False) -> Calibration:
    """Choose, per size, the planner and the method's scale by validation score (module docstring).

    ``config``: merge config (YAML path, dict or MergeConfig); ``method``: a name or
    ``{name, **params}`` (its scale parameter is the search's start); ``sizes``: as for
    :func:`~flexmerge.evaluate.sweep`; ``validation_evaluator(task, state_dict) -> float`` must
    score *validation* examples, never the test examples; ``budget``: evaluator calls in all
    (``None``: :data:`DEFAULT_CANDIDATES_PER_SIZE` candidates per size)."""
    from .arguments import parse_sizes

    size_list = parse_sizes(sizes)
    cal = _Calibrator(config, method, size_list, validation_evaluator, budget, planners=planners, step=step,
                      model_factory=model_factory, log=log, progress=progress)
    try:
        return cal.run()
    finally:
        cal.close()


def calibrated_runs(st, spec, sizes: list, validation_evaluator: Callable, budget: int | None, *,
                    model_factory=None, progress: bool = False, evaluator_name: str | None = None) -> Calibration:
    """Calibrate ``spec`` on validation, then evaluate each size's choice with the sweep's
    (test) evaluator as ``run = "calibrated"`` rows of the sweep ``st``."""
    cal = _Calibrator(st.cfg, spec, sizes, validation_evaluator, budget, planners=CALIBRATION_PLANNERS,
                      step=1.25, model_factory=model_factory, log=st.log, progress=progress)
    if evaluator_name:
        cal.vst.ev_name = evaluator_name
    try:
        result = cal.run()
        st.result.meta.setdefault("calibration", {})[result.method] = result.to_dict()
        for text in result.skipped:
            st.note(text)
        for choice in sorted(result.choices, key=lambda c: sizes.index(c.size)):
            scale = choice.params.get(result.scale) if result.scale else None
            fm, plan = cal.job(scale), cal.plan(choice.planner)
            shown = f", {result.scale} {scale:g}" if result.scale else ""
            st.run(fm=fm, grouping=plan.at(choice.size), plan=plan, method_name=result.method,
                   params=choice.params, run="calibrated", order=st.cfg.order, linkage=st.cfg.linkage,
                   seed=None, requested=choice.size,
                   note=f"planner {choice.planner}{shown} (validation {choice.validation:.4f})")
        return result
    finally:
        cal.close()
