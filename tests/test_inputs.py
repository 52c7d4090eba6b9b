"""Every bad input is one line ``error: ...`` and exit code 2, and nothing is written.

Each case drives the CLI through :func:`flexmerge.cli.main` and checks: return code 2, exactly one
non-empty stderr line starting with ``error:``, a word naming the culprit, and an unchanged
working directory (no output, no temporary left behind).
"""

from __future__ import annotations

import json
import math
import os
import typing
from pathlib import Path

import pytest
import yaml

from conftest import bert_like, finetune, write_checkpoint
from flexmerge.cli import main
from flexmerge.config import SEED_LIMIT, make_config, parse_assignments
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError
from flexmerge.methods import available_methods, make_method, method_class
from flexmerge.methods.base import MAX_SCALE
from flexmerge.plan import parse_size


# ---- helpers -------------------------------------------------------------------------------


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_line_error(capsys, argv, root: Path, *needles: str) -> str:
    """Run the CLI; assert exit 2, one ``error:`` line containing every needle, nothing written."""
    before = tree(root)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert tree(root) == before, "the failed command wrote files"
    return lines[0]


@pytest.fixture
def job(tmp_path):
    """Three tiny tasks on disk and ``merge.yaml`` naming them (relative paths)."""
    base = bert_like(0)
    base.pop("classifier.weight"), base.pop("classifier.bias")
    d = tmp_path / "models"
    d.mkdir()
    write_checkpoint(base, d / "base", "safetensors")
    for i in range(3):
        write_checkpoint(finetune(base, i), d / f"t{i}", "safetensors")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("base: models/base.safetensors\ntasks:\n" +
                   "".join(f"  t{i}: models/t{i}.safetensors\n" for i in range(3)))
    return tmp_path, cfg


TASKS_YAML = "tasks:\n  t0: models/t0.safetensors\n  t1: models/t1.safetensors\n"


# ---- 1. duplicate task names, unreadable configs -------------------------------------------


def test_duplicate_task_flags(job, capsys):
    root, cfg = job
    d = root / "models"
    tasks = ["--task", f"a={d / 't0.safetensors'}", "--task", f"a={d / 't1.safetensors'}",
             "--task", f"b={d / 't2.safetensors'}"]
    one_line_error(capsys, ["merge", cfg, "--size", "2", "-o", root / "out", *tasks], root, "'a'", "twice")
    one_line_error(capsys, ["merge", "--base", d / "base.safetensors", "--size", "2", "-o", root / "out",
                            *tasks], root, "'a'", "twice")


@pytest.mark.parametrize("text,key,lines", [
    ("base: models/base.safetensors\n" + TASKS_YAML + "  t0: models/t2.safetensors\n", "'t0'", "lines 3 and 5"),
    ("base: models/base.safetensors\nbase: models/t2.safetensors\n" + TASKS_YAML, "'base'", "lines 1 and 2"),
    ("base: models/base.safetensors\ntasks: {a: models/t0.safetensors, a: models/t1.safetensors, "
     "b: models/t2.safetensors}\n", "'a'", "lines 2 and 2"),
    ("base: models/base.safetensors\n" + TASKS_YAML + "method: {name: ties, k: 0.2, k: 0.5}\n", "'k'", "lines 5 and 5"),
    ("base: models/base.safetensors\n" + TASKS_YAML + "seed: 0\nseed: 1\n", "'seed'", "lines 5 and 6"),
])
def test_duplicate_yaml_keys(job, capsys, text, key, lines):
    root, cfg = job
    cfg.write_text(text)
    one_line_error(capsys, ["merge", cfg, "--size", "2", "-o", root / "out"], root, key, lines, "twice")


def test_task_names_equal_after_str(job, capsys):
    root, cfg = job
    cfg.write_text("base: models/base.safetensors\ntasks:\n  1: models/t0.safetensors\n"
                   "  '1': models/t1.safetensors\n  c: models/t2.safetensors\n")
    one_line_error(capsys, ["blocks", cfg], root, "'1'", "twice")


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),
    (b"base: caf\xe9\n", "not UTF-8"),
    (b"base: models/base.safetensors\x00\n", "binary"),
    (b"", "missing key 'base'"),
    (b"   \n\n", "missing key 'base'"),
    (b"- base\n- tasks\n", "top level is a list"),
    (b"hello\n", "top level is a string"),
    (b"42\n", "top level is a number"),
    (b"base: [unclosed\n", "invalid YAML"),
    (b"[" * 5000 + b"]" * 5000, "merge.yaml"),
])
def test_unreadable_configs(job, capsys, content, needle):
    root, cfg = job
    cfg.write_bytes(content)
    one_line_error(capsys, ["merge", cfg, "--size", "2", "-o", root / "out"], root, needle, "merge.yaml")


def test_config_is_a_directory(job, capsys):
    root, _ = job
    (root / "conf.yaml").mkdir()
    one_line_error(capsys, ["plan", root / "conf.yaml", "-o", root / "p.json"], root, "is a directory")


@pytest.mark.parametrize("sets,needle", [
    (["lambda=1", "lambda=2"], "given twice"),
    (["lambda=[1"], "not valid YAML"),
    (["lambda"], "KEY=VALUE"),
])
def test_bad_set_assignments(job, capsys, sets, needle):
    root, cfg = job
    argv = ["merge", cfg, "--size", "2", "-o", root / "out"]
    for s in sets:
        argv += ["--set", s]
    one_line_error(capsys, argv, root, needle)


# ---- 2. seeds --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(SEED_LIMIT), str(2**70)])
def test_seed_out_of_range_flag(job, capsys, seed):
    root, cfg = job
    one_line_error(capsys, ["merge", cfg, "--order", "random", "--seed", seed, "--size", "2", "-o", root / "out"],
                   root, "'seed'", seed)


@pytest.mark.parametrize("value", ["-1", "true", "1.5", "'3'", str(SEED_LIMIT)])
def test_seed_out_of_range_yaml(job, capsys, value):
    root, cfg = job
    cfg.write_text(cfg.read_text() + f"order: random\nseed: {value}\n")
    one_line_error(capsys, ["plan", cfg, "-o", root / "p.json"], root, "'seed'")


def test_seed_range_ends_are_accepted(job):
    root, cfg = job
    for seed in (0, SEED_LIMIT - 1):
        assert make_config({"base": "b", "tasks": {"a": "x", "b": "y"}, "seed": seed}).seed == seed


# ---- 3. method hyper-parameters ---------------------------------------------------------------


def numeric_fields(name: str) -> list[tuple[str, object]]:
    """(name as the user writes it, pydantic field) of every float parameter of a method (lists
    of floats, e.g. ``larv``'s ``levels``, are checked by :func:`test_float_list_parameters_reject_nonsense`)."""
    out = []
    for key, f in method_class(name).Params.model_fields.items():
        args = typing.get_args(f.annotation) or (f.annotation,)
        if float in args and typing.get_origin(f.annotation) is not list:
            out.append((f.alias or key, f))
    return out


NUMERIC = [(m, p) for m in available_methods() for p, _ in numeric_fields(m)]
BAD_NUMBERS = [(".inf", "finite"), ("-.inf", "finite"), (".nan", "finite"), ("nan", "finite"), ("inf", "finite"),
               ("1e39", "1e39"), ("-1e39", "-1e39"), ("abc", "'abc'"), ("true", "boolean"), ("[1]", "[1]"),
               ("{a: 1}", "{'a': 1}")]


def test_registry_has_numeric_parameters():
    assert len(available_methods()) >= 10 and len(NUMERIC) >= 12


@pytest.mark.parametrize("method,param", NUMERIC)
def test_every_numeric_parameter_rejects_nonsense(job, capsys, method, param):
    root, cfg = job
    for value, needle in BAD_NUMBERS:
        one_line_error(capsys, ["merge", cfg, "-m", method, "--set", f"{param}={value}", "--size", "2",
                                "-o", root / "out"], root, f"method '{method}'", f"'{param}'", needle)


FLOAT_LISTS = [(m, f.alias or k) for m in available_methods()
               for k, f in method_class(m).Params.model_fields.items()
               if typing.get_origin(f.annotation) is list and typing.get_args(f.annotation) == (float,)]


@pytest.mark.parametrize("method,param", FLOAT_LISTS)
def test_float_list_parameters_reject_nonsense(job, capsys, method, param):
    root, cfg = job
    for value, needle in [("[.inf, 1]", "inf"), ("[.nan, 1]", "nan"), ("[1e39, 1]", "1e+39"), ("[-1, 1]", "-1"),
                          ("[abc, 1]", "abc"), ("inf", "list"), ("[1]", "got 1")]:
        one_line_error(capsys, ["merge", cfg, "-m", method, "--set", f"{param}={value}", "--size", "2",
                                "-o", root / "out"], root, f"method '{method}'", f"parameter '{param}", needle)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_rejects_unknown_parameter(job, capsys, method):
    root, cfg = job
    one_line_error(capsys, ["plan", cfg, "-m", method, "--set", "no_such_knob=1", "-o", root / "p.json"],
                   root, f"method '{method}'", "unknown parameter 'no_such_knob'")


@pytest.mark.parametrize("method,param", NUMERIC)
def test_every_numeric_parameter_is_bounded(method, param):
    """Every float parameter has a finite upper bound (scales at most MAX_SCALE), so no value
    that overflows float32 can reach the tensors."""
    f = dict(numeric_fields(method))[param]
    uppers = [getattr(m, "le", None) if getattr(m, "le", None) is not None else getattr(m, "lt", None)
              for m in f.metadata]
    uppers = [u for u in uppers if u is not None]
    assert uppers and all(math.isfinite(u) and u <= MAX_SCALE for u in uppers), (method, param, f.metadata)


SCALES = [(m, p) for m, p in NUMERIC if p in ("lambda", "alpha", "lambda_c")]


@pytest.mark.parametrize("method,param", SCALES)
def test_scale_bound(job, capsys, method, param):
    root, cfg = job
    spec = {"name": method, param: MAX_SCALE}
    if method == "dare":
        spec["p"] = 0.5
    assert make_method(spec).describe()[param] == MAX_SCALE  # the bound itself is allowed
    one_line_error(capsys, ["merge", cfg, "-m", method, "--set", f"{param}={MAX_SCALE * 10}", "--size", "2",
                            "-o", root / "out"], root, f"'{param}'", "less than or equal to 1000")


@pytest.mark.parametrize("method,sets,needle", [
    ("ties", ["k=2"], "'k'"), ("ties", ["k=0"], "'k'"), ("ties", ["k=-0.5"], "'k'"),
    ("dare", ["p=1"], "'p'"), ("dare", ["p=-0.1"], "'p'"), ("dare", ["p=0.9999"], "1/(1-p)"),
    ("dare", ["inner=average"], "'inner'"), ("dare", ["k=0.5"], "only with inner: ties"),
    ("pcb", ["r=0"], "'r'"), ("pcb", ["r=1.5"], "'r'"),
    ("breadcrumbs", ["beta=0.5", "gamma=0.5"], "beta + gamma"), ("breadcrumbs", ["gamma=1"], "'gamma'"),
    ("tsv", ["rank_fraction=2"], "'rank_fraction'"), ("tsv", ["rank_fraction=0"], "'rank_fraction'"),
    ("iso_cts", ["common_space_fraction=0"], "'common_space_fraction'"),
    ("consensus", ["lambda_c=-1"], "'lambda_c'"), ("consensus", ["inner=consensus"], "inner"),
    ("consensus", ["inner={name: ties, lambda: .inf}"], "'lambda'"),
    ("consensus", ["inner={name: emr}"], "masks or scalars"),
    ("task_arithmetic", ["lambda=0"], "'lambda'"), ("task_arithmetic", ["lambda="], "'lambda'"),
    ("average", ["lambda=1"], "unknown parameter 'lambda'"),
])
def test_method_ranges(job, capsys, method, sets, needle):
    root, cfg = job
    argv = ["merge", cfg, "-m", method, "--size", "2", "-o", root / "out"]
    for s in sets:
        argv += ["--set", s]
    one_line_error(capsys, argv, root, f"method '{method}'", needle)


def test_method_params_from_yaml(job, capsys):
    root, cfg = job
    cfg.write_text(cfg.read_text() + "method: {name: ties, lambda: .nan}\n")
    one_line_error(capsys, ["merge", cfg, "--size", "2", "-o", root / "out"], root, "'lambda'", "finite")


# ---- 4. the --plan file ------------------------------------------------------------------------


@pytest.fixture
def plan_job(job):
    root, cfg = job
    plan = FlexMerge(str(cfg)).plan()
    d = json.loads(json.dumps(plan.to_dict()))
    assert len(d["steps"]) >= 3
    return root, cfg, d


def bad_plans(d: dict) -> list[tuple[str, object, str]]:
    s0, s1 = d["steps"][0], d["steps"][1]
    blk0 = d["blocks"][0]
    n_blocks, n = len(d["blocks"]), len(d["tasks"])
    other = next(s for s in d["steps"] if s["block"] != s0["block"])
    cases = [
        ("list", [d], "top level is a list"),
        ("string", "plan", "top level is a str"),
        ("no format", {k: v for k, v in d.items() if k != "format"}, "format"),
        ("version 2", {**d, "version": 2}, "version 2"),
        ("tasks not a list", {**d, "tasks": "t0,t1,t2"}, "'tasks'"),
        ("one task", {**d, "tasks": ["t0"]}, "'tasks'"),
        ("task twice", {**d, "tasks": ["t0", "t0", "t1"]}, "'tasks'"),
        ("task not a string", {**d, "tasks": [0, 1, 2]}, "'tasks.0'"),
        ("linkage", {**d, "linkage": "median"}, "'linkage'"),
        ("order", {**d, "order": 3}, "'order'"),
        ("planner", {**d, "planner": "best"}, "'planner'"),
        ("fit", {**d, "fit": "squeeze"}, "'fit'"),
        ("seed negative", {**d, "seed": -1}, "'seed'"),
        ("seed bool", {**d, "seed": True}, "'seed'"),
        ("seed float", {**d, "seed": 1.5}, "'seed'"),
        ("unit_bytes 0", {**d, "unit_bytes": 0}, "'unit_bytes'"),
        ("unit_bytes string", {**d, "unit_bytes": "10"}, "'unit_bytes'"),
        ("start", {**d, "start": 5}, "'start'"),
        ("method no name", {**d, "method": {"lambda": 1}}, "'method'"),
        ("method list", {**d, "method": ["ties"]}, "'method'"),
        ("blocks empty", {**d, "blocks": []}, "'blocks'"),
        ("block bytes negative", {**d, "blocks": [{**blk0, "bytes": -1}] + d["blocks"][1:]}, "'blocks.0.bytes'"),
        ("block twice", {**d, "blocks": [blk0, blk0] + d["blocks"][2:]}, "'blocks'"),
        ("steps not a list", {**d, "steps": {}}, "'steps'"),
        ("step unknown block", {**d, "steps": [{**s0, "block": "nope"}]}, "unknown block 'nope'"),
        ("step unknown task", {**d, "steps": [{**s0, "groups": [["t0"], ["zz"]]}]}, "unknown task 'zz'"),
        ("step three groups", {**d, "steps": [{**s0, "groups": [["t0"], ["t1"], ["t2"]]}]}, "'steps.0.groups'"),
        ("step one group", {**d, "steps": [{**s0, "groups": [["t0", "t1"]]}]}, "'steps.0.groups'"),
        ("step empty group", {**d, "steps": [{**s0, "groups": [[], ["t1"]]}]}, "not a current group"),
        ("step self merge", {**d, "steps": [{**s0, "groups": [["t0"], ["t0"]]}]}, "with itself"),
        ("step repeated", {**d, "steps": [s0, s0]}, "'steps.1.groups': ["),
        ("step part of a group", {**d, "steps": [{**s0, "groups": [["t0"], ["t1"]]},
                                                   {**s0, "groups": [["t1"], ["t2"]]}]}, "'steps.1.groups': ['t1'] is not a current group"),
        ("step member twice", {**d, "steps": [{**s0, "groups": [["t0", "t0"], ["t1"]]}]}, "not a current group"),
        ("too many steps", {**d, "steps": [other] * (n_blocks * (n - 1) + 1)}, "more than blocks x (tasks - 1)"),
        ("step missing key", {**d, "steps": [{k: v for k, v in s0.items() if k != "size_bytes"}]},
         "'steps.0.size_bytes'"),
        ("step similarity string", {**d, "steps": [{**s0, "similarity": "high"}]}, "'steps.0.similarity'"),
        ("step size negative", {**d, "steps": [s0, {**s1, "size_bytes": -1}]}, "'steps.1.size_bytes'"),
        ("grams wrong block", {**d, "grams": {"x": [[1.0]]}}, "'grams'"),
        ("grams wrong shape", {**d, "grams": {**d["grams"], blk0["name"]: [[1.0]]}}, "'grams."),
        ("task_specific unknown", {**d, "task_specific_bytes": {"zz": 1}}, "'task_specific_bytes"),
    ]
    for key in ("format", "version", "tasks", "method", "linkage", "order", "seed", "unit_bytes", "start",
                "blocks", "steps"):
        cases.append((f"missing {key}", {k: v for k, v in d.items() if k != key}, f"'{key}'" if key not in (
            "format", "version") else key))
    return cases


def test_bad_plan_files(plan_job, capsys):
    root, cfg, d = plan_job
    for label, content, needle in bad_plans(d):
        path = root / "bad.json"
        path.write_text(json.dumps(content))
        line = one_line_error(capsys, ["merge", cfg, "--plan", path, "--size", "2", "-o", root / "out"],
                              root, needle)
        assert "bad.json" in line, (label, line)
    # the good plan is accepted (as a control)
    path = root / "good.json"
    path.write_text(json.dumps(d))
    from flexmerge.plan import Plan
    assert Plan.load(path).steps == FlexMerge(str(cfg)).plan().steps


@pytest.mark.parametrize("mutate,needle", [
    (lambda text: text.replace('"similarity": ', '"similarity": NaN, "x": ', 1), "NaN"),
    (lambda text: text.replace('"size_units": ', '"size_units": Infinity, "x": ', 1), "Infinity"),
    (lambda text: text.replace('"seed": 0', '"seed": -Infinity', 1), "Infinity"),
])
def test_plan_non_finite_numbers(plan_job, capsys, mutate, needle):
    root, cfg, d = plan_job
    path = root / "bad.json"
    text = json.dumps(d)
    path.write_text(mutate(text))
    one_line_error(capsys, ["merge", cfg, "--plan", path, "--size", "2", "-o", root / "out"], root, needle,
                   "finite")


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a JSON text file"),
    (os.urandom(0) + bytes(range(256)), "not a JSON text file"),
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\x00\x00\x00", "not valid JSON"),
    (b"[" * 100000, "bad.json"),
])
def test_plan_garbage(plan_job, capsys, content, needle):
    root, cfg, _ = plan_job
    path = root / "bad.json"
    path.write_bytes(content)
    one_line_error(capsys, ["merge", cfg, "--plan", path, "--size", "2", "-o", root / "out"], root, needle)


def test_plan_is_a_directory_or_missing(plan_job, capsys):
    root, cfg, _ = plan_job
    (root / "plandir").mkdir()
    one_line_error(capsys, ["merge", cfg, "--plan", root / "plandir", "--size", "2", "-o", root / "out"], root,
                   "is a directory")
    one_line_error(capsys, ["merge", cfg, "--plan", root / "nope.json", "--size", "2", "-o", root / "out"], root,
                   "not found")


def test_plan_accepts_optional_planner_field(plan_job):
    from flexmerge.plan import Plan

    _, _, d = plan_job
    for planner in ("similarity", "distortion"):
        assert Plan.from_dict({**d, "planner": planner}).planner == planner
    assert Plan.from_dict({k: v for k, v in d.items() if k not in ("planner", "fit")}).planner == "similarity"


# ---- 5. evaluator results and curve arguments ---------------------------------------------------


EVALUATORS = '''
import math, sys
import numpy as np
import torch

def ok(task, sd):
    return np.float32(0.5) if task == "t0" else 1

def nan(task, sd):
    return float("nan")

def np_nan(task, sd):
    return np.float64("nan")

def inf(task, sd):
    return math.inf

def neg_inf(task, sd):
    return -math.inf

def string(task, sd):
    return "0.9"

def none(task, sd):
    pass

def tensor(task, sd):
    return torch.tensor(0.5)

def boolean(task, sd):
    return True

def raises(task, sd):
    raise RuntimeError("cuda out of memory\\nsecond line")

def second_task_nan(task, sd):
    return 0.7 if task == "t0" else float("nan")

CALLS = []

def merged_nan(task, sd):
    CALLS.append(task)
    return 0.5 if len(CALLS) <= 3 else float("nan")  # the 3 fine-tuned references, then NaN
'''


@pytest.fixture
def curve_job(job):
    root, cfg = job
    (root / "evals.py").write_text(EVALUATORS)
    return root, cfg


def curve_argv(root, cfg, evaluator, *extra):
    return ["curve", cfg, "--evaluator", f"{root / 'evals.py'}:{evaluator}", "-o", root / "curve", "--sizes",
            "1,2", "--no-plots", "--no-progress", "--no-zero-shot", *extra]


@pytest.mark.parametrize("evaluator,value,task", [
    ("nan", "nan", "t0"), ("np_nan", "nan", "t0"), ("inf", "inf", "t0"), ("neg_inf", "-inf", "t0"),
    ("string", "a str ('0.9')", "t0"), ("none", "a NoneType", "t0"), ("tensor", "a Tensor", "t0"),
    ("boolean", "a bool (True)", "t0"),
    ("raises", "RuntimeError: cuda out of memory second line", "t0"), ("second_task_nan", "nan", "t1"),
    ("merged_nan", "returned nan", "t0"),
])
def test_evaluator_results(curve_job, capsys, evaluator, value, task):
    """The evaluator, the task and the value in one line; no non-finite score is ever recorded.
    (The curve table written so far is kept by design, marked incomplete.)"""
    root, cfg = curve_job
    code = main([str(a) for a in curve_argv(root, cfg, evaluator)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"evals.py:{evaluator}" in lines[0] and f"'{task}'" in lines[0] and value in lines[0], lines[0]
    data = json.loads((root / "curve" / "curve.json").read_text())
    assert data["complete"] is False
    assert len(data["rows"]) == (1 if evaluator == "merged_nan" else 0)  # the fine-tuned row only
    for row in data["rows"]:
        assert all(math.isfinite(v) for v in row["scores"].values())


def test_evaluator_numpy_and_int_scores_are_accepted(curve_job, capsys):
    root, cfg = curve_job
    assert main([str(a) for a in curve_argv(root, cfg, "ok", "--methods", "task_arithmetic")]) == 0, \
        capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--sizes", "nan"], "invalid size"), (["--sizes", "inf"], "invalid size"), (["--sizes", "-1"], "invalid size"),
    (["--sizes", "1e400"], "finite"), (["--sizes", ""], "no sizes"),
    (["--sizes", ",,"], "no sizes"), (["--sizes", "1,2.5 parsecs"], "unit 'parsecs'"),
    (["--sizes", "1e400MB"], "finite"),
    (["--methods", "nosuch"], "unknown merge method 'nosuch'"), (["--methods", ","], "names no method"),
    (["--methods", "ties,ties"], "more than once"),
    (["--methods", "ties", "--set", "k=2"], "'k'"), (["--methods", "ties", "--set", "lambda=.nan"], "'lambda'"),
    (["--methods", "ties", "--set", "nosuch=1"], "'nosuch'"),
    (["--orders", "random", "--seeds", "-1"], "seed -1"), (["--orders", "random", "--seeds", "1.5"], "--seeds"),
    (["--orders", "sideways"], "unknown order 'sideways'"), (["--linkages", "median"], "unknown linkage"),
])
def test_curve_arguments(curve_job, capsys, extra, needle):
    root, cfg = curve_job
    one_line_error(capsys, curve_argv(root, cfg, "raises", *extra), root, needle)


@pytest.mark.parametrize("spec,needle", [
    ("no_such_module_xyz:f", "cannot import module"), ("math", "module:function"), ("math:nosuch", "no attribute"),
    ("math:pi", "not a callable"), ("{root}/missing.py:f", "not found"), ("{root}/pkgdir/:f", "not found"),
    ("{root}/syntax.py:f", "SyntaxError"), ("{root}/binary.py:f", "failed"), ("{root}/exits.py:f", "sys.exit"),
    ("{root}/boom.py:f", "ZeroDivisionError"),
])
def test_evaluator_specs(curve_job, capsys, spec, needle):
    root, cfg = curve_job
    (root / "pkgdir").mkdir()
    (root / "syntax.py").write_text("def f(:\n")
    (root / "binary.py").write_bytes(b"\x00\xff\xfe garbage")
    (root / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (root / "boom.py").write_text("1 / 0\n")
    argv = ["curve", cfg, "--evaluator", spec.format(root=root), "-o", root / "curve", "--no-progress"]
    one_line_error(capsys, argv, root, "evaluator", needle)


# ---- 6. sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size,needle", [
    ("nan", "invalid size"), ("inf", "invalid size"), ("-1", "invalid size"), ("0", "outside the possible range"),
    ("0.0", "outside the possible range"), ("1e400", "finite"), ("", "invalid size"), ("  ", "invalid size"),
    ("2.5 parsecs", "unit 'parsecs'"), ("abc", "invalid size"), ("1e30GB", "outside the possible range"),
    ("9" * 40 + "B", "outside the possible range"), ("9" * 400, "finite"), ("1e400MB", "finite"),
    ("0.5", "outside the possible range"), ("1,5", "invalid size"), ("0x10", "invalid size"),
])
def test_bad_sizes(job, capsys, size, needle):
    root, cfg = job
    one_line_error(capsys, ["merge", cfg, "--size", size, "-o", root / "out"], root, needle)


@pytest.mark.parametrize("size", [float("nan"), float("inf"), -float("inf"), 10**400, "1e400", True, None, [2]])
def test_parse_size_rejects_non_sizes(size):
    with pytest.raises(FlexMergeError, match="invalid size"):
        parse_size(size)


def test_parse_size_accepts_sizes():
    assert parse_size("2.5 units") == (2.5, None) and parse_size(2) == (2.0, None)
    assert parse_size("40MB") == (None, 40_000_000) and parse_size("1KiB") == (None, 1024)
    assert parse_assignments(["lambda=1e-3"]) == {"lambda": "1e-3"}  # PyYAML reads 1e-3 as a string...
    assert make_method({"name": "ties", "lambda": "1e-3"}).params.lam == 1e-3  # ...which pydantic parses


# ---- endless or unreadable inputs -------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_endless_config_and_plan_are_bounded(job, capsys, monkeypatch):
    import flexmerge.plan_file

    root, cfg = job
    one_line_error(capsys, ["plan", "/dev/zero", "-o", root / "p.json"], root, "larger than 16 MiB")
    monkeypatch.setattr(flexmerge.plan_file, "PLAN_MAX_BYTES", 1 << 20)
    one_line_error(capsys, ["merge", cfg, "--plan", "/dev/zero", "--size", "2", "-o", root / "out"], root,
                   "too large for a plan")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_and_plan(job, capsys):
    root, cfg = job
    (root / "plan.json").write_text("{}")
    for p in (cfg, root / "plan.json"):
        p.chmod(0)
    try:
        one_line_error(capsys, ["plan", cfg, "-o", root / "p.json"], root, "cannot read config")
        cfg.chmod(0o644)
        one_line_error(capsys, ["merge", cfg, "--plan", root / "plan.json", "--size", "2", "-o", root / "out"],
                       root, "cannot read plan")
    finally:
        for p in (cfg, root / "plan.json"):
            p.chmod(0o644)


def test_bad_auto_plan_alternatives(job, capsys):
    root, cfg = job
    cfg.write_text(cfg.read_text() + "planner: auto\n")
    d = json.loads(json.dumps(FlexMerge(str(cfg)).plan().to_dict()))
    assert d["alternatives"]
    name, alt = next(iter(d["alternatives"].items()))
    s0 = alt["steps"][0]
    for content, needle in [
        ({**d, "alternatives": {name: {**alt, "steps": [{**s0, "block": "nope"}]}}},
         f"'alternatives.{name}.steps.0.block'"),
        ({**d, "alternatives": {name: {**alt, "steps": [s0, s0]}}}, f"'alternatives.{name}.steps.1.groups'"),
        ({**d, "alternatives": {"best": alt}}, "'alternatives.best'"),
        ({**d, "alternatives": {name: {**alt, "fit": "squeeze"}}}, f"'alternatives.{name}.fit'"),
    ]:
        (root / "bad.json").write_text(json.dumps(content))
        one_line_error(capsys, ["merge", cfg, "--plan", root / "bad.json", "--size", "2", "-o", root / "out"],
                       root, needle)
