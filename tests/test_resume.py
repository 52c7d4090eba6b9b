"""Resuming a sweep from the table in its output directory (flexmerge.evaluate.resume), on tiny models."""

import json
import os
import textwrap

import pytest
import torch
from helpers import one_thread  # noqa: F401  (one torch thread for this module)
from safetensors.torch import load_file

from flexmerge.errors import FlexMergeError
from flexmerge.evaluate import SweepResult, sweep

METHODS = ["task_arithmetic", "average"]
SIZES = [1, 1.5, 2, 2.5, 3]


def counting_evaluator(cfg, fail_at=None, exc=RuntimeError):
    """score(t) = (1 + index of t) / (1 + ||theta - theta_t||); ``calls`` lists (task, merged
    parameters' checksum) per call; call number ``fail_at`` (1-based) raises ``exc`` instead."""
    ft = {t: load_file(p) for t, p in cfg["tasks"].items()}
    order = list(cfg["tasks"])
    calls = []

    def evaluate(task, sd):
        if fail_at is not None and len(calls) + 1 == fail_at:
            raise exc("interrupted")
        calls.append((task, round(float(sum(v.double().sum() for v in sd.values())), 9)))
        d = torch.sqrt(sum(((sd[k].double() - ft[task][k].double()) ** 2).sum() for k in ft[task]))
        return float((1 + order.index(task)) / (1 + d))

    evaluate.calls = calls
    return evaluate


def run(cfg, ev, out, **kw):
    logs = []
    args = dict(zero_shot=True, orders="greedy,left-right", evaluator_name="toy", plots=False, log=logs.append)
    args.update(kw)
    res = sweep(cfg, kw.pop("methods", METHODS), kw.pop("sizes", SIZES), ev, out=out,
                **{k: v for k, v in args.items() if k not in ("methods", "sizes")})
    return res, logs


def table(res: SweepResult) -> tuple:
    return res.tasks, res.rows, res.finetuned, res.zero_shot, res.notes, res.complete


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_sweep_evaluates_only_the_missing_rows(bert_set, tmp_path, exc):
    cfg = bert_set()
    n = len(cfg["tasks"])
    full_ev = counting_evaluator(cfg)
    full, _ = run(cfg, full_ev, tmp_path / "full")
    assert full.complete and full.meta["reused_rows"] == 0

    # interrupted half-way, in the middle of a merged model's tasks
    half = len(full_ev.calls) // 2 + 2  # the second task of a model (2n reference calls first)
    assert half % n == 2
    first = counting_evaluator(cfg, fail_at=half, exc=exc)
    with pytest.raises((FlexMergeError, KeyboardInterrupt)) as info:
        run(cfg, first, tmp_path / "b")
    if exc is RuntimeError:
        assert "rerun the sweep to continue" in str(info.value)
    partial = SweepResult.load(tmp_path / "b")
    assert not partial.complete and 0 < len(partial.rows) < len(full.rows)
    assert partial.rows == full.rows[:len(partial.rows)]

    again = counting_evaluator(cfg)
    res, logs = run(cfg, again, tmp_path / "b")
    # the same table as the uninterrupted sweep, rows, flags and notes alike
    assert table(res) == table(full)
    assert table(SweepResult.load(tmp_path / "b")) == table(full)
    # evaluated: exactly the merged models that the partial table lacks, each task once
    done = {r["key"] for r in partial.rows}
    missing = [r for r in full.rows if r["evaluated"] and r["key"] not in done]
    assert len(again.calls) == res.meta["evaluations"] == n * len(missing)
    lost = len(first.calls) % n  # tasks of the interrupted model evaluated before the interruption
    assert lost > 0 and again.calls == full_ev.calls[len(first.calls) - lost:]
    assert res.meta["reused_rows"] == len(partial.rows)
    assert any(f"resuming from {tmp_path / 'b' / 'curve.json'}: {len(partial.rows)} finished rows" in m
               and "interrupted" in m for m in logs)
    assert (f"resumed: {len(partial.rows)} rows reused from the previous table, "
            f"{len(again.calls)} evaluator calls made") in logs


def test_finished_sweep_reruns_for_free_and_no_resume_starts_afresh(bert_set, tmp_path):
    cfg = bert_set()
    ev = counting_evaluator(cfg)
    full, _ = run(cfg, ev, tmp_path / "o", zero_shot=False, orders=None)
    calls = len(ev.calls)
    assert calls > 0
    ev2 = counting_evaluator(cfg)
    res, logs = run(cfg, ev2, tmp_path / "o", zero_shot=False, orders=None)
    assert ev2.calls == [] and table(res) == table(full) and res.meta["reused_rows"] == len(full.rows)
    assert any("(from the previous table)" in m for m in logs)
    ev3 = counting_evaluator(cfg)
    res, logs = run(cfg, ev3, tmp_path / "o", zero_shot=False, orders=None, resume=False)
    assert len(ev3.calls) == calls and res.meta["reused_rows"] == 0 and table(res) == table(full)
    assert not any("resum" in m for m in logs)

    # a size added later: only its row is evaluated
    ev4 = counting_evaluator(cfg)
    res, _ = run(cfg, ev4, tmp_path / "o", zero_shot=False, orders=None, sizes=SIZES + [1.25])
    added = [r for r in res.rows if r["requested_size"] == 1.25]
    assert len(ev4.calls) == len(cfg["tasks"]) * sum(r["evaluated"] for r in added) > 0
    assert res.meta["reused_rows"] == len(full.rows)


def test_rows_of_another_setting_are_evaluated_again(bert_set, tmp_path):
    cfg = bert_set()
    n = len(cfg["tasks"])
    out = tmp_path / "o"
    first, _ = run(cfg, counting_evaluator(cfg), out, zero_shot=False, orders=None)

    # another method parameter: only that method's rows are evaluated again
    ev = counting_evaluator(cfg)
    res, _ = run(cfg, ev, out, zero_shot=False, orders=None,
                 methods=[{"name": "task_arithmetic", "lambda": 0.5}, "average"])
    ta = [r for r in res.select(run="main", method="task_arithmetic") if r["evaluated"]]
    assert len(ev.calls) == n * len(ta) > 0
    assert res.meta["reused_rows"] == 1 + len(res.select(run="main", method="average"))  # + fine-tuned
    assert [r["scores"] for r in res.select(method="average")] == [r["scores"] for r in first.select(method="average")]

    # another evaluator (name), or a checkpoint that changed: nothing is reused, the log says why
    ev = counting_evaluator(cfg)
    res, logs = run(cfg, ev, out, zero_shot=False, orders=None, evaluator_name="toy2")
    assert res.meta["reused_rows"] == 0 and any("another setting (evaluator differ)" in m for m in logs)
    run(cfg, counting_evaluator(cfg), out, zero_shot=False, orders=None)  # back to "toy"
    st = os.stat(cfg["tasks"]["t1"])
    os.utime(cfg["tasks"]["t1"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ev = counting_evaluator(cfg)
    res, logs = run(cfg, ev, out, zero_shot=False, orders=None)
    assert res.meta["reused_rows"] == 0 and any("another setting (checkpoints differ)" in m for m in logs)
    assert len(ev.calls) == len(counting_evaluator(cfg).calls) + res.meta["evaluations"]


def test_foreign_table_is_refused_before_any_evaluation(bert_set, tmp_path):
    cfg = bert_set()
    for name, text in (("curve.csv", "my,data\n1,2\n"), ("curve.json", '{"mine": true}')):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text(text)
        ev = counting_evaluator(cfg)
        with pytest.raises(FlexMergeError, match=f"{name} exists and was not made by flexmerge"):
            run(cfg, ev, out)
        assert ev.calls == [] and (out / name).read_text() == text and sorted(os.listdir(out)) == [name]


def test_cli_resume_and_no_resume(bert_set, tmp_path, capsys):
    from flexmerge import cli
    from flexmerge.curve_cli import curve

    present = any(c.callback is curve or c.name == "curve" for c in cli.app.registered_commands)
    if not present:
        cli.app.command()(curve)
    cfg = bert_set()
    (tmp_path / "merge.yaml").write_text(json.dumps(cfg))
    log = tmp_path / "calls.txt"
    (tmp_path / "my_eval.py").write_text(textwrap.dedent(f"""
        import os
        LOG = {str(log)!r}

        def evaluate(task, sd):
            with open(LOG, "a") as fh:
                fh.write(task + "\\n")
            if os.environ.get("STOP_AT") and sum(1 for _ in open(LOG)) == int(os.environ["STOP_AT"]):
                raise RuntimeError("stopped")
            return float(len(task) + sum(float(v.double().sum()) for v in sd.values()) % 1)
        """))
    args = ["curve", str(tmp_path / "merge.yaml"), "--sizes", "1,2", "--methods", "task_arithmetic,average",
            "--evaluator", f"{tmp_path / 'my_eval.py'}:evaluate", "-o", str(tmp_path / "c"), "--no-plots"]
    try:
        os.environ["STOP_AT"] = "8"  # 3 fine-tuned, 3 zero-shot, then the second merged model fails
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "error: evaluator" in err and "rerun the sweep to continue" in err
        del os.environ["STOP_AT"]
        log.write_text("")
        assert cli.main(args) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        # the references were kept; 2 methods x 2 sizes are 4 merged models of 3 tasks
        assert "resuming from" in err
        assert "resumed: 2 rows reused from the previous table, 12 evaluator calls made" in err
        assert len(log.read_text().split()) == 12
        log.write_text("")
        assert cli.main(args + ["--no-resume"]) == 0
        assert len(log.read_text().split()) == 3 + 3 + 12
    finally:
        os.environ.pop("STOP_AT", None)
        if not present:
            cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.callback is not curve]


def test_messages_of_curve_name_its_own_options(tmp_path):
    """curve has no --force, and an interrupted curve keeps its finished rows: the messages say so."""
    from flexmerge.cli import _left_behind
    from flexmerge.evaluate.table import check_out

    (tmp_path / "curve.json").write_text("{}")
    with pytest.raises(FlexMergeError) as exc:
        check_out(tmp_path)
    assert "--force" not in str(exc.value) and "(-o)" in str(exc.value)
    assert "rerun the same command to resume" in _left_behind(["curve", "m.yaml", "-o", "out"])
    assert _left_behind(["merge", "m.yaml", "-o", "out"]) == "nothing was written"
