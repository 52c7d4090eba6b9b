"""Planning from LoRA adapters vs merely reading them (the target: planning all sizes reads each
adapter once, in at most 1.5x the time of reading them).

Writes N synthetic PEFT LoRA adapters (rank r on query/value/attention.output.dense of an
L-layer, W-wide BERT-shaped base, float32) to a temporary directory, then times, in one run and
with warm page cache: reading every adapter tensor once (one ``pread`` per tensor, as flexmerge
reads; and, for reference, safetensors' ``load_file`` of each whole file), and
``AdapterMerge(...).plan()`` (opening and checking the adapters, the Gram pass from the factors,
the plan of every size), split into open / Gram pass / planner. Prints both and their ratio (best
of ``--repeat``; the ratio against the faster of the two reads).

    python bench/bench_adapters.py --tasks 8 30 --rank 8                     # 12 x 768, as before
    python bench/bench_adapters.py --tasks 8 30 --rank 8 16 64 --large       # + 32 x 4096, r=16, N=8

The Gram pass costs ``K^2 (in + out) / 2`` multiply-adds per module for ``K = N r`` (or forms the
dense ``dW`` when cheaper, :meth:`flexmerge.adapters.source.AdapterSet.factor_gram`) against
``K (in + out)`` floats read, so the ratio grows with ``N r`` and does not depend on the width;
the planner's cost depends on N and the number of blocks only.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmerge.adapters.engine import AdapterMerge
from flexmerge.io import SafetensorsSource

MODULES = ("attention.self.query", "attention.self.value", "attention.output.dense")


def write_set(root: Path, n: int, rank: int, layers: int = 12, width: int = 768) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = {f"encoder.layer.{i}.{m}.weight": torch.zeros(width, width) for i in range(layers) for m in MODULES}
    save_file(base, str(root / "base.safetensors"))
    del base
    tasks = {}
    for t in range(n):
        d = root / f"task{t}"
        d.mkdir()
        sd = {}
        for i in range(layers):
            for m in MODULES:
                key = f"base_model.model.encoder.layer.{i}.{m}"
                sd[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=gen)
                sd[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=gen)
        save_file(sd, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["query", "value", "dense"],
            "base_model_name_or_path": "bench-base"}))
        tasks[f"task{t}"] = str(d)
    return {"base": str(root / "base.safetensors"), "tasks": tasks}


def read_all(cfg: dict) -> None:
    for path in cfg["tasks"].values():
        src = SafetensorsSource([Path(path) / "adapter_model.safetensors"], Path(path), "peft_adapter")
        for name in src.names():
            src.get(name)
        src.close()


def load_all(cfg: dict) -> None:
    for path in cfg["tasks"].values():
        load_file(str(Path(path) / "adapter_model.safetensors"))


def plan_timed(cfg: dict) -> tuple[float, float, float, object]:
    t0 = time.perf_counter()
    with AdapterMerge(cfg) as fm:
        t1 = time.perf_counter()
        grams = fm.grams()
        t2 = time.perf_counter()
        plan = fm.plan(grams=grams)
        t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, plan


def run_case(n: int, rank: int, layers: int, width: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_set(Path(tmp), n, rank, layers, width)
        read_all(cfg)  # warm the page cache
        t_read, t_load, parts = [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            read_all(cfg)
            t_read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_all(cfg)
            t_load.append(time.perf_counter() - t0)
            *p, plan = plan_timed(cfg)
            parts.append(p)
        r, lf = min(t_read), min(t_load)
        best = min(parts, key=sum)
        p = sum(best)
        mb = sum(os.path.getsize(Path(d) / "adapter_model.safetensors") for d in cfg["tasks"].values()) / 1e6
        print(f"N={n} r={rank} {layers}x{width} ({mb:.0f} MB): read {r:.3f} s (load_file {lf:.3f} s), plan {p:.3f} s "
              f"= open {best[0]:.3f} + grams {best[1]:.3f} + planner {best[2]:.3f} (ratio {p / min(r, lf):.2f}); "
              f"{len(plan.steps)} steps, {plan.max_units:g} -> {plan.min_units:g} adapter units", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 30])
    ap.add_argument("--rank", type=int, nargs="+", default=[8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--large", action="store_true", help="also a 32-layer, 4096-wide base, r=16, N=8 (540 MB)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads 1; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for n in args.tasks:
        for rank in args.rank:
            run_case(n, rank, args.layers, args.width, args.repeat)
    if args.large:
        run_case(8, 16, 32, 4096, args.repeat)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
