"""Sweeps on Ray (flexmerge.evaluate.distributed) on tiny models: a local cluster of two one-CPU
workers gives the serial sweep's table, survives a killed worker, and resumes; without ray
installed, --ray is a one-line error."""

import json
import os
import sys
import textwrap

import pytest
import torch
from unittest import mock

import flexmerge.engine as engine
from flexmerge.materialize import materialize
from helpers import module_like, one_thread  # noqa: F401  (one torch thread, as in the one-CPU workers)
from safetensors.torch import load_file

from flexmerge.errors import FlexMergeError
from flexmerge.evaluate import SweepResult, sweep

METHODS = ["task_arithmetic", "ties"]
SIZES = [1, 1.5, 2, 2.5]  # 2 methods x 4 sizes (3 tasks: 2.5 keeps one task's own blocks)


def toy_evaluator(cfg, marker=None, stop=None, log=None):
    """score(t) = (1 + index of t) / (1 + ||theta - theta_t||). ``marker``: the first call (in any
    process) creates it and kills its process; ``stop``: while that file exists, a merged model
    whose weights sum to its content raises; ``log``: one line per call appended to that file."""
    ft = {t: load_file(p) for t, p in cfg["tasks"].items()}
    order = list(cfg["tasks"])

    def evaluate(task, sd):
        total = round(float(sum(v.double().sum() for v in sd.values())), 6)
        if marker is not None:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)  # the worker dies in the middle of the sweep
        if stop is not None and os.path.exists(stop) and open(stop).read() == repr(total):
            raise RuntimeError("stopped")
        if log is not None:
            with open(log, "a") as fh:
                fh.write(f"{task} {total!r}\n")
        d = torch.sqrt(sum(((sd[k].double() - ft[task][k].double()) ** 2).sum() for k in ft[task]))
        return float((1 + order.index(task)) / (1 + d))

    return evaluate


def table(res: SweepResult) -> tuple:
    return res.tasks, res.rows, res.finetuned, res.zero_shot, res.notes, res.complete


def run(cfg, ev, out, **kw):
    return sweep(cfg, METHODS, SIZES, ev, out=out, zero_shot=True, orders="left-right", plots=False,
                 evaluator_name="toy", **kw)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The serial sweep's table on the module's own tiny models."""
    from conftest import bert_like, finetune, write_checkpoint  # the bert_set fixture's makers

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = bert_like(0)
    tasks = {}
    for i in range(3):
        heads = {"classifier.weight": torch.randn(2 + i, 8), "classifier.bias": torch.randn(2 + i)}
        tasks[f"t{i}"] = str(write_checkpoint(finetune(base, i, heads=heads), root / f"t{i}", "safetensors"))
    cfg = {"base": str(write_checkpoint(base, root / "base", "safetensors")), "tasks": tasks,
           "exclude": [r"classifier\..*"]}
    res = run(cfg, toy_evaluator(cfg, log=str(root / "serial-calls")), root / "serial")
    assert res.complete
    return cfg, res, root / "serial"


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_missing_is_one_line(monkeypatch, tmp_path, capsys):
    from flexmerge import cli
    from flexmerge.curve_cli import curve

    monkeypatch.setitem(sys.modules, "ray", None)  # 'import ray' fails as if it were not installed
    with pytest.raises(FlexMergeError, match=r'pip install -e "\.\[ray\]"'):
        sweep({"base": "nowhere", "tasks": {}}, None, [1], lambda t, sd: 1.0, ray=True)
    present = any(c.callback is curve or c.name == "curve" for c in cli.app.registered_commands)
    if not present:
        cli.app.command()(curve)
    try:
        code = cli.main(["curve", str(tmp_path / "merge.yaml"), "--evaluator", "nowhere_mod:fn", "--ray",
                         "-o", str(tmp_path / "c")])
    finally:
        if not present:
            cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.callback is not curve]
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'pip install -e ".[ray]"' in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow  # starts a Ray cluster (about 10 s)
def test_cli_ray_starts_and_stops_its_own_cluster(serial, tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
    from flexmerge import cli
    from flexmerge.curve_cli import curve

    assert not ray.is_initialized()
    cfg, res, serial_out = serial
    (tmp_path / "merge.yaml").write_text(json.dumps(cfg))
    # an evaluator file that only the driver has imported: the workers import it from its path
    (tmp_path / "ev.py").write_text(textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        TASKS = {json.dumps(cfg["tasks"])}
        FT = {{t: load_file(p) for t, p in TASKS.items()}}

        def evaluate(task, sd):
            d = torch.sqrt(sum(((sd[k].double() - FT[task][k].double()) ** 2).sum() for k in FT[task]))
            return float((1 + list(TASKS).index(task)) / (1 + d))
        """))
    present = any(c.callback is curve or c.name == "curve" for c in cli.app.registered_commands)
    if not present:
        cli.app.command()(curve)
    try:
        args = ["curve", str(tmp_path / "merge.yaml"), "--sizes", ",".join(map(str, SIZES)), "--methods",
                ",".join(METHODS), "--orders", "left-right", "--evaluator", f"{tmp_path / 'ev.py'}:evaluate",
                "--no-plots", "--no-progress"]
        assert cli.main(args + ["-o", str(tmp_path / "ray"), "--ray"]) == 0, capsys.readouterr().err
        assert not ray.is_initialized()  # the local cluster it started is shut down
        assert cli.main(args + ["-o", str(tmp_path / "serial")]) == 0, capsys.readouterr().err
    finally:
        if not present:
            cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.callback is not curve]
    assert (tmp_path / "ray" / "curve.csv").read_bytes() == (tmp_path / "serial" / "curve.csv").read_bytes()
    got = SweepResult.load(tmp_path / "ray")
    assert got.meta["ray"]["cpus"] >= 1
    assert [r["scores"] for r in got.rows] == [r["scores"] for r in res.rows]  # the toy scores of run()


def test_unreachable_address_is_one_line_and_writes_nothing(serial, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
    if ray.is_initialized():
        pytest.skip("a Ray session is already initialised in this process (it would be used instead)")
    cfg, _, _ = serial
    with pytest.raises(FlexMergeError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:1 .*--ray-address"):
        run(cfg, toy_evaluator(cfg), tmp_path / "o", ray_address="127.0.0.1:1")
    assert not (tmp_path / "o").exists() and not ray.is_initialized()


@pytest.mark.slow  # starts a Ray cluster (about 10 s)
def test_ray_sweep_equals_serial(cluster, serial, tmp_path):
    cfg, res, serial_out = serial
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return materialize(*args, **kwargs)

    with mock.patch.object(engine, "materialize", counting):
        got = run(cfg, toy_evaluator(cfg), tmp_path / "o", ray=True)
    # the driver merged on one thread beside the workers, then got its own setting back
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    assert table(got) == table(res)
    assert got.meta["evaluations"] == res.meta["evaluations"] > 0
    assert (tmp_path / "o" / "curve.csv").read_bytes() == (serial_out / "curve.csv").read_bytes()
    assert got.meta["ray"]["cpus"] == 2 and cluster.is_initialized()  # a session it did not start stays


@pytest.mark.slow  # starts a Ray cluster (about 10 s)
def test_killed_worker_is_retried_and_the_table_complete(cluster, serial, tmp_path):
    cfg, res, _ = serial
    marker = tmp_path / "died"
    got = run(cfg, toy_evaluator(cfg, marker=str(marker)), tmp_path / "o", ray=True)
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker died
    assert table(got) == table(res) and got.complete


@pytest.mark.slow  # starts a Ray cluster (about 10 s)
def test_interrupted_ray_sweep_resumes(cluster, serial, tmp_path):
    cfg, res, serial_out = serial
    n = len(cfg["tasks"])
    merged = [r for r in res.rows if r["run"] != "reference" and r["evaluated"]]
    # stop at the third distinct merged model: its weights' sum identifies it
    sums = []
    for line in (serial_out.parent / "serial-calls").read_text().split("\n")[2 * n:]:
        if line and line.split()[1] not in sums:
            sums.append(line.split()[1])
    stop = tmp_path / "stop"
    stop.write_text(sums[2])
    log = tmp_path / "calls"
    with pytest.raises(FlexMergeError, match="rerun the sweep to continue"):
        run(cfg, toy_evaluator(cfg, stop=str(stop), log=str(log)), tmp_path / "o", ray=True)
    partial = SweepResult.load(tmp_path / "o")
    assert not partial.complete and partial.rows == res.rows[:len(partial.rows)]
    stop.unlink()
    log = tmp_path / "calls-again"
    got = run(cfg, toy_evaluator(cfg, log=str(log)), tmp_path / "o", ray=True)
    assert table(got) == table(res)
    done = {r["key"] for r in partial.rows}
    missing = [r for r in merged if r["key"] not in done]
    assert len(log.read_text().split("\n")) - 1 == got.meta["evaluations"] == n * len(missing) > 0
    assert got.meta["reused_rows"] == len(partial.rows)



@pytest.mark.slow  # starts a Ray cluster (about 10 s)
def test_model_factory_in_workers(cluster, serial, tmp_path):
    cfg, res, _ = serial
    ev = toy_evaluator(cfg)
    built = tmp_path / "built"

    def factory(task):
        with open(built, "a") as fh:
            fh.write(f"{os.getpid()} {task}\n")
        return module_like(load_file(cfg["tasks"][task]))

    def module_eval(task, model):
        assert isinstance(model, torch.nn.Module)
        return ev(task, model.state_dict())

    got = run(cfg, module_eval, tmp_path / "o", ray=True, model_factory=factory)
    assert [r["scores"] for r in got.rows] == [r["scores"] for r in res.rows]
    lines = built.read_text().split("\n")[:-1]
    assert len(lines) == len(set(lines)) < got.meta["evaluations"]  # once per (worker, task), then reused


@pytest.mark.slow  # starts a Ray cluster (about 10 s)
def test_worker_dying_every_time_is_a_one_line_error(cluster, serial, tmp_path):
    cfg, res, _ = serial

    def dies(task, sd):
        os._exit(1)

    with pytest.raises(FlexMergeError) as info:
        run(cfg, dies, tmp_path / "o", ray=True, ray_options={"max_retries": 0})
    msg = str(info.value)
    assert msg.startswith("Ray failed to run the evaluator on task 't0' (fine-tuned checkpoint): ")
    assert "\n" not in msg and "rerun the sweep to continue" in msg
    partial = SweepResult.load(tmp_path / "o")
    assert partial.rows == [] and not partial.complete
