"""Calibration with validation data (flexmerge.evaluate.calibrate): choices against brute force,
the budget, and the calibrated rows of a sweep and of 'flexmerge curve'."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError
from flexmerge.evaluate import SweepResult, sweep
from flexmerge.evaluate.calibrate import calibrate, scale_parameter
from helpers import one_thread  # noqa: F401


def distance_evaluator(cfg, power=1.0):
    """score(t) = 1 / (1 + ||theta - theta_t||^power) over the merged tensors: the fine-tuned
    checkpoint scores 1, so normalized = score. Records every call."""
    ft = {t: load_file(p) for t, p in cfg["tasks"].items()}

    def evaluate(task, sd):
        evaluate.calls.append(task)
        d = torch.sqrt(sum(((sd[k].double() - ft[task][k].double()) ** 2).sum() for k in ft[task]))
        return float(1 / (1 + d ** power))

    evaluate.calls = []
    return evaluate


def brute_force_score(cfg, method: dict, size, planner: str, evaluator) -> float:
    """The normalized validation score of one candidate, merged and scored independently."""
    fm = FlexMerge(cfg, method=method)
    bundle = fm.merge(grouping=fm.plan(planner=planner).at(size))
    scores = [evaluator(t, bundle.state_dict(t)) for t in fm.tasks]
    fm.close()
    return sum(scores) / len(scores)


def test_scale_parameter_of_methods():
    from flexmerge.methods import make_method

    assert scale_parameter(make_method({"name": "task_arithmetic"})) == ("lambda", 1.5)
    assert scale_parameter(make_method({"name": "ties", "lambda": 0.7})) == ("lambda", 0.7)
    assert scale_parameter(make_method({"name": "tsv"})) == ("alpha", 1.0)
    assert scale_parameter(make_method({"name": "emr"})) is None


@pytest.mark.slow  # ~5-10 s: runs in CI's full run (.ci/run), not the default fast run
def test_scale_is_the_grid_argmax_found_by_brute_force(bert_set):
    cfg = bert_set(n=4)
    val = distance_evaluator(cfg)
    sizes = [1.0, 2.0, 3.0]
    cal = calibrate(cfg, "task_arithmetic", sizes, val, budget=10_000, planners=("similarity",))
    assert cal.evaluations == len(val.calls) <= 10_000
    grid = [round(1.5 * 1.25 ** k, 6) for k in range(-8, 5)]
    for choice in cal.choices:
        brute = {lam: brute_force_score(cfg, {"name": "task_arithmetic", "lambda": lam}, choice.size,
                                        "similarity", val) for lam in grid}
        best = max(brute, key=brute.get)
        assert choice.planner == "similarity"
        assert choice.params["lambda"] == pytest.approx(best, rel=1e-9)
        assert choice.validation == pytest.approx(brute[best], rel=1e-9)
        # the search moved away from the default: the merged mean's best scale is near 1, not 1.5
        assert choice.params["lambda"] < 1.5


@pytest.mark.slow  # ~5-10 s: runs in CI's full run (.ci/run), not the default fast run
def test_planner_is_the_best_candidate_grouping(bert_set):
    cfg = bert_set(n=4)
    val = distance_evaluator(cfg, power=2.0)
    sizes = [1.5, 2.5]
    cal = calibrate(cfg, {"name": "ties", "lambda": 1.0}, sizes, val, budget=10_000)
    start = 1.0  # the method's scale, then the scale chosen at the previous size
    for choice in cal.choices:
        scores = {p: brute_force_score(cfg, {"name": "ties", "lambda": start}, choice.size, p, val)
                  for p in ("similarity", "distortion", "hybrid")}
        tried = {c["planner"]: c["validation"] for c in choice.candidates if c["lambda"] == start}
        assert tried == pytest.approx(scores, rel=1e-9)
        best = max(scores.values())
        assert scores[choice.planner] == pytest.approx(best, rel=1e-9)
        first_best = next(p for p in ("distortion", "similarity", "hybrid") if scores[p] == best)
        assert choice.planner == first_best  # ties go to the config's planner, then in order
        start = choice.params["lambda"]


@pytest.mark.slow  # a few seconds: runs in CI's full run (.ci/run), not the default fast run
def test_budget_is_respected_and_spread(bert_set):
    cfg = bert_set(n=3)
    sizes = [1.0, 1.5, 2.0]
    n = 3
    with pytest.raises(FlexMergeError, match="smallest useful budget 12"):
        calibrate(cfg, "task_arithmetic", sizes, distance_evaluator(cfg), budget=11)
    with pytest.raises(FlexMergeError, match="whole number"):
        calibrate(cfg, "task_arithmetic", sizes, distance_evaluator(cfg), budget=20.5)
    # the smallest budget: the fine-tuned references and the start candidate at every size
    val = distance_evaluator(cfg)
    cal = calibrate(cfg, "task_arithmetic", sizes, val, budget=n * (1 + len(sizes)))
    assert len(val.calls) == n * (1 + len(sizes))
    # (the start candidate: the config's planner, distortion by default, at the method's scale)
    assert [(c.planner, c.params["lambda"]) for c in cal.choices] == [("distortion", 1.5)] * 3
    for budget in (15, 21, 33, 60):
        val = distance_evaluator(cfg)
        cal = calibrate(cfg, "task_arithmetic", sizes, val, budget=budget)
        assert len(val.calls) == cal.evaluations <= budget
        assert len(val.calls) % n == 0


def test_sweep_calibrated_rows_use_validation_only_for_choosing(bert_set, tmp_path):
    cfg = bert_set(n=3)
    val, test = distance_evaluator(cfg), distance_evaluator(cfg, power=2.0)
    sizes = [1.0, 2.0]
    with pytest.raises(FlexMergeError, match="is the test evaluator"):
        sweep(cfg, ["task_arithmetic"], sizes, test, validation_evaluator=test)
    with pytest.raises(FlexMergeError, match="smallest useful budget"):
        sweep(cfg, ["task_arithmetic"], sizes, test, validation_evaluator=val, calibration_budget=3)
    assert test.calls == [] and val.calls == []

    res = sweep(cfg, ["task_arithmetic"], sizes, test, validation_evaluator=val, calibration_budget=60,
                out=tmp_path / "curve")
    cal = res.meta["calibration"]["task_arithmetic"]
    assert len(val.calls) == cal["evaluations"] <= 60
    # the test evaluator saw the references, the main rows and each new calibrated model, nothing else
    fresh = sum(1 for r in res.rows if r["evaluated"] and r["run"] != "reference")
    assert len(test.calls) == 3 * (1 + fresh)
    rows = res.select(run="calibrated")
    assert [r["requested_size"] for r in rows] == sizes
    for r, choice in zip(rows, cal["choices"]):
        assert r["params"] == choice["params"] and f"planner {choice['planner']}" in r["note"]
        fm = FlexMerge(cfg, method={"name": "task_arithmetic", **choice["params"]})
        bundle = fm.merge(grouping=fm.plan(planner=choice["planner"]).at(r["requested_size"]))
        assert r["scores"] == {t: test(t, bundle.state_dict(t)) for t in fm.tasks}  # test scores, exactly
        fm.close()
    reloaded = SweepResult.load(tmp_path / "curve")
    assert reloaded.meta["calibration"]["task_arithmetic"]["choices"] == cal["choices"]
    assert (tmp_path / "curve" / "normalized_vs_size.png").is_file()


def test_cli_curve_calibrate(bert_set, tmp_path, capsys):
    from flexmerge import cli

    cfg = bert_set(n=3)
    (tmp_path / "merge.yaml").write_text(json.dumps(cfg))
    (tmp_path / "evals.py").write_text(textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        FT = {{t: load_file(p) for t, p in {json.dumps(cfg["tasks"])}.items()}}

        def dist(task, sd):
            return torch.sqrt(sum(((sd[k].double() - FT[task][k].double()) ** 2).sum() for k in FT[task]))

        def test(task, sd):
            return float(1 / (1 + dist(task, sd) ** 2))

        def validation(task, sd):
            return float(1 / (1 + dist(task, sd)))
        """))
    base = ["curve", str(tmp_path / "merge.yaml"), "--sizes", "1,2", "--methods", "task_arithmetic",
            "--evaluator", f"{tmp_path / 'evals.py'}:test", "--no-progress", "--no-plots"]
    code = cli.main(base + ["-o", str(tmp_path / "c"), "--calibrate", f"{tmp_path / 'evals.py'}:validation",
                            "--budget", "40"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "task_arithmetic (calibrated: planner" in out.out
    assert len(SweepResult.load(tmp_path / "c").select(run="calibrated")) == 2
    for extra, message in ((["--budget", "5", "--calibrate", f"{tmp_path / 'evals.py'}:validation"],
                            "smallest useful budget 9"),
                           (["--budget", "40"], "give --calibrate too")):
        code = cli.main(base + ["-o", str(tmp_path / "d")] + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sizes_outside_a_methods_range_are_skipped_not_fatal(bert_set):
    cfg = bert_set(n=3)
    val, test = distance_evaluator(cfg), distance_evaluator(cfg, power=2.0)
    res = sweep(cfg, ["emr"], [1.0, 2.5], test, validation_evaluator=val, calibration_budget=60)
    assert [r["requested_size"] for r in res.select(run="calibrated")] == [2.5]
    assert any(n.startswith("emr: calibration at size 1.0 skipped") for n in res.notes)
    assert res.meta["calibration"]["emr"]["skipped"] and res.complete
