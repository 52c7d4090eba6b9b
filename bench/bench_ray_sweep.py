"""Benchmark: a sweep's wall time, serial vs Ray (flexmerge.evaluate.distributed), same table.

The target: with two one-CPU workers on a 2-core machine the Ray sweep should take
at most the serial sweep's wall time. Synthetic tasks (base + noise, a tiny two-layer model) and an
evaluator that does ``--work`` 256x256 matrix products per call on one torch thread stand in for
a real evaluator's cost. Prints the evaluator calls, the serial sweep's seconds, Ray's start-up
seconds and the Ray sweep's seconds (and their ratios), and checks that both tables are equal.

    python bench/bench_ray_sweep.py --work 0 300 [--cpus 2] [--tasks 3]
    python bench/bench_ray_sweep.py --text8 [--max-test 300]

``--text8``: the real case instead: the cached text8 checkpoints and their test-set evaluator
(:class:`~flexmerge.bench.suite.Text8Suite`), task arithmetic and TIES at 1, 2, 4 and 6 units.
The serial sweep runs the evaluator on torch's 2 threads, the Ray sweep on ``--cpus`` one-thread
workers (Ray sets one OpenMP thread per one-CPU task).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_tasks(root: Path, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(2)}
    save_file(base, str(root / "base.safetensors"))
    tasks = {}
    for t in range(n):
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        tasks[f"t{t}"] = str(root / f"t{t}.safetensors")
        save_file(ft, tasks[f"t{t}"])
    return {"base": str(root / "base.safetensors"), "tasks": tasks}


def make_evaluator(work: int):
    def evaluate(task, sd):
        torch.set_num_threads(1)
        x = torch.ones(256, 256)
        for _ in range(work):
            x = (x @ x) / 256
        return float(sum(float(v.double().sum()) for v in sd.values()) % 1)
    return evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=int, nargs="+", default=[0, 300])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--text8", action="store_true", help="the real text8 checkpoints and evaluator")
    ap.add_argument("--max-test", type=int, default=300)
    a = ap.parse_args()
    import ray

    if a.text8:
        return text8(a, ray)

    from flexmerge.evaluate import sweep

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = write_tasks(root, a.tasks)
        methods, sizes = ["task_arithmetic", "ties"], [1, 1.5, 2, 2.5]  # 2 methods x 4 sizes
        for work in a.work:
            ev = make_evaluator(work)
            t0 = time.perf_counter()
            serial = sweep(cfg, methods, sizes, ev, out=root / f"s{work}", plots=False, resume=False, zero_shot=True)
            t1 = time.perf_counter()
            ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, logging_level="WARNING")
            t2 = time.perf_counter()
            got = sweep(cfg, methods, sizes, ev, out=root / f"r{work}", plots=False, resume=False, zero_shot=True,
                        ray=True)
            t3 = time.perf_counter()
            ray.shutdown()
            same = [r["scores"] for r in got.rows] == [r["scores"] for r in serial.rows]
            s, i, r = t1 - t0, t2 - t1, t3 - t2
            print(f"work {work}: {serial.meta['evaluations']} calls; serial {s:.2f} s; ray start {i:.2f} s, "
                  f"ray sweep {r:.2f} s (ratio {r / s:.2f}; with start {(r + i) / s:.2f}); same table: {same}",
                  flush=True)


def text8(a, ray) -> None:
    from flexmerge.bench.suite import Text8Suite
    from flexmerge.evaluate import sweep

    suite = Text8Suite(max_test=a.max_test, progress=False)
    suite.prepare()
    ref = {t: r["finetuned"] for t, r in suite.reference().items()}
    cfg, ev = suite.merge_config(), suite.evaluator
    methods, sizes = ["task_arithmetic", "ties"], [1, 2, 4, 6]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.set_num_threads(2)
        t0 = time.perf_counter()
        serial = sweep(cfg, methods, sizes, ev, out=root / "serial", plots=False, resume=False, finetuned=ref)
        t1 = time.perf_counter()
        ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, logging_level="WARNING")
        t2 = time.perf_counter()
        got = sweep(cfg, methods, sizes, ev, out=root / "ray", plots=False, resume=False, finetuned=ref, ray=True)
        t3 = time.perf_counter()
        ray.shutdown()
        same = (root / "serial" / "curve.csv").read_bytes() == (root / "ray" / "curve.csv").read_bytes()
        s, i, r = t1 - t0, t2 - t1, t3 - t2
        print(f"text8, 2 methods x 4 sizes: {serial.meta['evaluations']} evaluator calls; serial {s:.1f} s; "
              f"ray start {i:.1f} s, ray sweep {r:.1f} s (ratio {r / s:.2f}; with start {(r + i) / s:.2f}); "
              f"same curve.csv: {same}; rows equal: {[x['scores'] for x in got.rows] == [x['scores'] for x in serial.rows]}",
              flush=True)


if __name__ == "__main__":
    main()
