"""The generic sweep (flexmerge.evaluate), its plots and the 'flexmerge curve' command, on tiny models."""

import csv
import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import flexmerge.engine as engine
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError
from flexmerge.evaluate import SweepResult, load_callable, parse_sizes, sweep
from flexmerge.plots import plot_all
from helpers import module_like

PNG = b"\x89PNG\r\n\x1a\n"


def toy_evaluator(cfg):
    """score(t) = (1 + index of t) / (1 + ||theta - theta_t||): fine-tuned scores 1, 2, 3."""
    ft = {t: load_file(p) for t, p in cfg["tasks"].items()}
    order = list(cfg["tasks"])
    calls = []

    def evaluate(task, sd):
        calls.append(task)
        d = torch.sqrt(sum(((sd[k].double() - ft[task][k].double()) ** 2).sum() for k in ft[task]))
        return float((1 + order.index(task)) / (1 + d))

    evaluate.calls = calls
    return evaluate


def expected(cfg, task, merged: dict):
    """The toy score of a state dict given as {mergeable name: tensor} (heads are the task's own)."""
    ft = load_file(cfg["tasks"][task])
    d = torch.sqrt(sum(((merged[k].double() - ft[k].double()) ** 2).sum() for k in merged))
    return (1 + list(cfg["tasks"]).index(task)) / (1 + float(d))


def test_sweep_end_to_end(bert_set, tmp_path):
    cfg = bert_set()
    ev = toy_evaluator(cfg)
    out = tmp_path / "out"
    res = sweep(cfg, ["task_arithmetic", "average"], [1, 1.5, 2, 3, 5], ev, out=out, zero_shot=True)
    n = 3
    assert res.complete and res.tasks == ["t0", "t1", "t2"]
    assert res.finetuned == {"t0": 1.0, "t1": 2.0, "t2": 3.0}
    main = res.select(run="main")
    assert [(r["method"], r["requested_size"]) for r in main] == \
        [(m, s) for m in ("task_arithmetic", "average") for s in (1.0, 1.5, 2.0, 3.0)]
    assert any("size 5.0 skipped" in note and "outside the possible range" in note for note in res.notes)

    # exact sizes: the same bytes as an independent merge at that size
    unit = res.meta["unit_bytes"]
    for r in main:
        fm_bytes = FlexMerge(cfg, method=r["method"]).merge(r["requested_size"]).size_bytes
        assert r["size_bytes"] == fm_bytes
        assert r["size_units"] == r["size_bytes"] / unit
        assert r["size_units"] <= r["requested_size"] + 1e-12

    # size N: every task keeps its checkpoint -> the fine-tuned scores, normalized exactly 1
    top = [r for r in main if r["requested_size"] == 3.0]
    for r in top:
        assert r["scores"] == res.finetuned and r["normalized"] == 1.0 and r["size_units"] == n

    # task arithmetic at 1.0: theta_0 + 1.5 * mean tau, written from the paper's formula
    base = load_file(cfg["base"])
    fts = {t: load_file(p) for t, p in cfg["tasks"].items()}
    names = [k for k in base if not k.startswith("classifier")]
    ta = {k: base[k] + 1.5 * sum(fts[t][k] - base[k] for t in fts) / n for k in names}
    row = next(r for r in main if r["method"] == "task_arithmetic" and r["requested_size"] == 1.0)
    for t in fts:
        assert row["scores"][t] == pytest.approx(expected(cfg, t, ta), abs=1e-6)
    assert row["average"] == pytest.approx(sum(row["scores"].values()) / n, abs=1e-12)
    assert row["normalized"] == pytest.approx(sum(row["scores"][t] / res.finetuned[t] for t in fts) / n, abs=1e-12)

    # zero-shot: the pretrained weights with each task's own head
    zs = res.select(run="reference", method="zero-shot")[0]
    for t in fts:
        assert zs["scores"][t] == pytest.approx(expected(cfg, t, {k: base[k] for k in names}), abs=1e-6)

    # each distinct merged model once: N fine-tuned + N zero-shot + N per distinct grouping below N
    distinct = {(r["method"], r["size_bytes"]) for r in main if r["size_units"] < n}
    assert len(ev.calls) == res.meta["evaluations"] == n * (2 + len(distinct))

    # files: CSV and JSON agree with the result; plots are small PNGs
    data = json.loads((out / "curve.json").read_text())
    assert data["complete"] is True and len(data["rows"]) == len(res.rows)
    with open(out / "curve.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == len(res.rows)
    assert float(lines[2]["score:t1"]) == res.rows[2]["scores"]["t1"]
    assert int(lines[2]["size_bytes"]) == res.rows[2]["size_bytes"]
    for name in ("accuracy_vs_size.png", "normalized_vs_size.png", "per_task.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG) and len(blob) < 200_000
    assert not (out / "ablation_order.png").exists()


def test_ablations_reuse_grams_plans_and_evaluations(bert_set, tmp_path, monkeypatch):
    cfg = bert_set()
    passes = []
    real = engine.block_grams
    monkeypatch.setattr(engine, "block_grams", lambda *a, **k: passes.append(1) or real(*a, **k))
    ev = toy_evaluator(cfg)
    res = sweep(cfg, ["task_arithmetic", "average"], [1, 3], ev, orders="greedy,left-right,right-left,random",
                linkages="min,max,avg", seeds=[0, 1], out=tmp_path / "o")
    assert len(passes) == 1  # one similarity pass shared by both (non-transforming) methods
    order_rows = res.select(run="order")
    assert [(r["order"], r["seed"]) for r in order_rows[::2]] == \
        [("greedy", None), ("left-right", None), ("right-left", None), ("random", 0), ("random", 1)]
    assert {r["linkage"] for r in res.select(run="linkage")} == {"min", "max", "avg"}
    assert all(r["method"] == "task_arithmetic" for r in order_rows)
    # at 1 unit every order/linkage merges everything, at 3 nothing: 2 methods x 1 merged model each
    assert res.meta["evaluations"] == 3 * (1 + 2)
    assert (tmp_path / "o" / "ablation_order.png").read_bytes().startswith(PNG)
    assert (tmp_path / "o" / "ablation_linkage.png").read_bytes().startswith(PNG)


def test_intermediate_sizes_differ_by_order(bert_set):
    cfg = bert_set()
    res = sweep(cfg, ["task_arithmetic"], [2], toy_evaluator(cfg), orders="greedy,right-left")
    greedy, rl = res.select(run="order")
    plan = FlexMerge(cfg).plan(order="right-left")
    assert rl["size_bytes"] == plan.at(2).size_bytes and rl["steps"] == plan.at(2).steps
    # the order ablation is the paper's (the similarity planner), whatever the config's planner
    assert greedy["size_bytes"] == FlexMerge(cfg).plan(planner="similarity").at(2).size_bytes
    main = res.select(run="main")[0]
    assert main["size_bytes"] == FlexMerge(cfg).plan().at(2).size_bytes  # distortion, the default


def test_mask_method_also_at_its_minimum(bert_set):
    cfg = bert_set()
    res = sweep(cfg, ["emr"], [1, 3], toy_evaluator(cfg))
    plan = FlexMerge(cfg, method="emr").plan()
    assert plan.min_units > 1
    rows = res.select(run="main")
    assert [r["requested_size"] for r in rows] == [3.0, "min"]
    assert rows[1]["size_bytes"] == plan.min_bytes and rows[1]["size_units"] == plan.min_units
    assert any("emr: size 1.0 skipped" in n for n in res.notes)


def test_channel_merging_in_sweep_integer_sizes_only(bert_set):
    cfg = bert_set()
    res = sweep(cfg, ["channel_merging"], [1, 1.5, 2], toy_evaluator(cfg))
    rows = res.select(run="main")
    assert [(r["requested_size"], r["size_units"]) for r in rows] == [(1.0, 1.0), (2.0, 2.0)]
    assert any("size 1.5 skipped" in n and "integer sizes only" in n for n in res.notes)


def test_failing_evaluator_names_it_and_keeps_partial_table(bert_set, tmp_path):
    cfg = bert_set()
    calls = []

    def flaky_eval(task, sd):
        calls.append(task)
        if len(calls) > 7:  # 3 fine-tuned + 3 for the first merged model + 1
            raise RuntimeError("GPU on fire")
        return 1.0

    out = tmp_path / "out"
    with pytest.raises(FlexMergeError) as info:
        sweep(cfg, ["task_arithmetic"], [1, 2], flaky_eval, out=out)
    msg = str(info.value)
    assert "flaky_eval" in msg and "GPU on fire" in msg and "task 't1'" in msg and "curve.csv" in msg
    data = json.loads((out / "curve.json").read_text())
    assert data["complete"] is False
    assert [(r["run"], r["requested_size"]) for r in data["rows"]] == [("reference", None), ("main", 1.0)]
    with open(out / "curve.csv") as fh:
        assert len(list(csv.reader(fh))) == 3
    assert len(info.value.partial.rows) == 2

    with pytest.raises(FlexMergeError, match="returned a str \\('high'\\) for task 't0' .*, not a number"):
        sweep(cfg, ["task_arithmetic"], [1], lambda t, sd: "high")


def test_model_factory_gets_a_loaded_module(bert_set):
    cfg = bert_set()
    ev = toy_evaluator(cfg)
    ref = sweep(cfg, ["task_arithmetic"], [1, 2], ev)
    built = []

    def factory(task):
        built.append(task)
        return module_like(load_file(cfg["tasks"][task]))

    def module_eval(task, model):
        assert isinstance(model, torch.nn.Module)
        return ev(task, model.state_dict())

    res = sweep(cfg, ["task_arithmetic"], [1, 2], module_eval, model_factory=factory)
    assert built == ["t0", "t1", "t2"]  # once per task, then reused
    assert [r["scores"] for r in res.rows] == [r["scores"] for r in ref.rows]



def test_load_callable_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlexMergeError, match="no_such_module_xyz.*cannot import"):
        load_callable("no_such_module_xyz:evaluate")
    with pytest.raises(FlexMergeError, match="not of the form module:function"):
        load_callable("just_a_name")
    with pytest.raises(FlexMergeError, match="missing.py not found"):
        load_callable("missing.py:evaluate")
    (tmp_path / "ev_ok.py").write_text("X = 3\ndef evaluate(task, sd):\n    return 0.5\n")
    assert load_callable(f"{tmp_path / 'ev_ok.py'}:evaluate")("t", {}) == 0.5
    assert load_callable("ev_ok:evaluate")("t", {}) == 0.5  # a module in the current directory
    with pytest.raises(FlexMergeError, match="has no attribute 'nope'"):
        load_callable("ev_ok.py:nope")
    with pytest.raises(FlexMergeError, match="is a int, not a callable"):
        load_callable("ev_ok.py:X")
    (tmp_path / "ev_bad.py").write_text("raise ImportError('needs sklearn')\n")
    with pytest.raises(FlexMergeError, match="ev_bad.py.*ImportError: needs sklearn"):
        load_callable("ev_bad.py:evaluate")


def test_arguments_are_checked_before_work(bert_set):
    cfg = bert_set()
    assert parse_sizes("1, 1.5,2,1") == [1.0, 1.5, 2.0]
    with pytest.raises(FlexMergeError, match="unknown order 'sideways'"):
        sweep(cfg, ["task_arithmetic"], [1], lambda t, sd: 1.0, orders="sideways")
    with pytest.raises(FlexMergeError, match="unknown linkage 'median'"):
        sweep(cfg, ["task_arithmetic"], [1], lambda t, sd: 1.0, linkages=["median"])
    with pytest.raises(FlexMergeError, match="no sizes"):
        sweep(cfg, ["task_arithmetic"], "", lambda t, sd: 1.0)
    with pytest.raises(FlexMergeError, match="unknown merge method 'nope'"):
        sweep(cfg, ["nope"], [1], lambda t, sd: 1.0)


def test_result_reloads_and_replots(bert_set, tmp_path):
    cfg = bert_set()
    res = sweep(cfg, ["task_arithmetic"], [1, 2], toy_evaluator(cfg), out=tmp_path / "a", plots=False)
    loaded = SweepResult.load(tmp_path / "a")
    assert loaded.rows == json.loads(json.dumps(res.rows)) and loaded.finetuned == res.finetuned
    paths = plot_all(loaded, tmp_path / "b", ylabel="accuracy")
    assert sorted(p.name for p in paths) == ["accuracy_vs_size.png", "normalized_vs_size.png", "per_task.png"]


def test_table_drops_task_columns_rather_than_cut_cells(bert_set):
    from rich.console import Console

    cfg = bert_set()
    res = sweep(cfg, ["task_arithmetic"], [1, 2], toy_evaluator(cfg))

    def render(width):
        console = Console(width=200, record=True, file=open(os.devnull, "w"))
        console.print(res.rich_table(width=width))
        return console.export_text()

    wide, narrow = render(None), render(60)
    assert all(t in wide for t in res.tasks) and "per-task scores" not in wide
    assert not any(f" {t} " in narrow for t in res.tasks) and "per-task scores: see curve.csv" in narrow
    assert "…" not in wide + narrow  # no cell is cut short


# ---- the CLI command ----------------------------------------------------------------------------


@pytest.fixture
def curve_registered():
    """Register 'curve' on flexmerge.cli.app for this test only (unless cli.py already does)."""
    from flexmerge import cli
    from flexmerge.curve_cli import curve

    present = any(c.callback is curve or c.name == "curve" for c in cli.app.registered_commands)
    if not present:
        cli.app.command()(curve)
    yield cli.main
    if not present:
        cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.callback is not curve]


def test_cli_curve(bert_set, tmp_path, curve_registered, capsys):
    cfg = bert_set()
    (tmp_path / "merge.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    (tmp_path / "my_eval.py").write_text(textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        TASKS = {json.dumps(cfg["tasks"])}
        FT = {{t: load_file(p) for t, p in TASKS.items()}}

        def evaluate(task, sd):
            d = torch.sqrt(sum(((sd[k].double() - FT[task][k].double()) ** 2).sum() for k in FT[task]))
            return float(1 / (1 + d))
        """))
    out = tmp_path / "curve"
    code = curve_registered(["curve", str(tmp_path / "merge.yaml"), "--sizes", "1,2,3", "--methods",
                             "task_arithmetic,ties", "--set", "lambda=1.0", "--evaluator",
                             f"{tmp_path / 'my_eval.py'}:evaluate", "-o", str(out), "--no-progress",
                             "--orders", "greedy,left-right"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "task_arithmetic" in captured.out and "ties" in captured.out and "curve.csv" in captured.out
    res = SweepResult.load(out)
    assert res.complete and {r["params"].get("lambda") for r in res.select(run="main")} == {1.0}
    assert len(res.select(run="order")) == 6
    assert (out / "accuracy_vs_size.png").is_file()

    code = curve_registered(["curve", str(tmp_path / "merge.yaml"), "--evaluator", "nowhere_mod:fn",
                             "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "error: evaluator 'nowhere_mod:fn'" in err and "Traceback" not in err


def test_known_reference_scores_and_non_positive_fine_tuned(bert_set):
    cfg = bert_set()
    calls = []

    def const(task, sd):
        calls.append(task)
        return 0.5

    res = sweep(cfg, ["average"], [1], const, finetuned={"t0": 2.0, "t1": 1.0, "t2": 0.5},
                zero_shot={"t0": 0.1, "t1": 0.1, "t2": 0.1})
    assert len(calls) == 3  # only the merged model: references were given
    row = res.select(run="main")[0]
    assert row["normalized_scores"] == {"t0": 0.25, "t1": 0.5, "t2": 1.0}
    assert row["normalized"] == pytest.approx(1.75 / 3, abs=1e-12)
    assert res.select(run="reference", method="zero-shot")[0]["evaluated"] is False

    neg = sweep(cfg, ["average"], [1], lambda t, sd: -1.0)  # e.g. a negative loss
    assert neg.select(run="main")[0]["normalized"] is None
    assert any("positive fine-tuned scores" in n for n in neg.notes)
    with pytest.raises(FlexMergeError, match="lack tasks"):
        sweep(cfg, ["average"], [1], const, finetuned={"t0": 1.0})


def test_cli_method_parameters():
    from flexmerge.curve_cli import _method_specs

    assert _method_specs("task_arithmetic,ties", None) == ["task_arithmetic", "ties"]
    assert _method_specs("task_arithmetic,ties,average", ["lambda=1.0", "ties.k=0.2"]) == \
        [{"name": "task_arithmetic", "lambda": 1.0}, {"name": "ties", "lambda": 1.0, "k": 0.2}, "average"]
    with pytest.raises(FlexMergeError, match="none of the methods average has a parameter 'k'"):
        _method_specs("average", ["k=0.2"])
    with pytest.raises(FlexMergeError, match="method 'dare' is not in --methods"):
        _method_specs("ties", ["dare.p=0.5"])


def test_sweep_closes_its_merge_jobs_also_on_failure(bert_set, monkeypatch):
    cfg = bert_set()
    closed = []
    original = engine.FlexMerge.close
    monkeypatch.setattr(engine.FlexMerge, "close", lambda self: (closed.append(self), original(self)))
    sweep(cfg, ["task_arithmetic", "ties"], [1, 2], toy_evaluator(cfg))
    assert len(closed) == 2 and all(fm.models.closed for fm in closed)
    closed.clear()

    def failing(task, sd):
        raise RuntimeError("boom")

    with pytest.raises(FlexMergeError, match="boom"):
        sweep(cfg, ["task_arithmetic"], [1], failing, finetuned={"t0": 1.0, "t1": 1.0, "t2": 1.0})
    assert len(closed) == 1 and closed[0].models.closed
