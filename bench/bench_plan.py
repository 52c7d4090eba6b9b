"""Benchmark: plan the full FlexMerge trajectory for N synthetic tasks of a BERT-sized model.

A 22M-parameter BERT (all-MiniLM-L6-v2 shapes: vocab 30522,
hidden 384, 6 layers, MLP 1536) written as safetensors; N fine-tuned copies = base + noise.
Prints, per N: seconds and peak RSS of (a) merely reading every checkpoint once and (b) the
whole plan (validation, one streaming Gram pass, greedy plan), and their ratio. Each is measured
in a fresh subprocess after a warm-up read so that both see the same page cache.
Targets: plan / read <= 1.5; peak RSS <= 2 model sizes + N x the largest block.

    python bench/bench_plan.py --tasks 8 30 [--dir /tmp/flexmerge-bench] [--planner distortion]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, MLP, VOCAB, POS = 384, 6, 1536, 30522, 512


def bert_shapes() -> dict[str, tuple[int, ...]]:
    s = {"embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
         "embeddings.position_embeddings.weight": (POS, HIDDEN),
         "embeddings.token_type_embeddings.weight": (2, HIDDEN),
         "embeddings.LayerNorm.weight": (HIDDEN,), "embeddings.LayerNorm.bias": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            s[p + m + ".weight"] = (HIDDEN, HIDDEN)
            s[p + m + ".bias"] = (HIDDEN,)
        s[p + "intermediate.dense.weight"] = (MLP, HIDDEN)
        s[p + "intermediate.dense.bias"] = (MLP,)
        s[p + "output.dense.weight"] = (HIDDEN, MLP)
        s[p + "output.dense.bias"] = (HIDDEN,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            s[p + ln + ".weight"] = (HIDDEN,)
            s[p + ln + ".bias"] = (HIDDEN,)
    s["pooler.dense.weight"] = (HIDDEN, HIDDEN)
    s["pooler.dense.bias"] = (HIDDEN,)
    return s


def make_models(root: Path, n: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    shapes = bert_shapes()
    base_path = root / "base.safetensors"
    g = torch.Generator().manual_seed(0)
    if not base_path.exists():
        save_file({k: torch.randn(v, generator=g) * 0.05 for k, v in shapes.items()}, str(base_path))
    from safetensors import safe_open
    with safe_open(str(base_path), "pt") as fh:
        base = {k: fh.get_tensor(k) for k in fh.keys()}
    tasks = {}
    for i in range(n):
        p = root / f"task{i:02d}.safetensors"
        if not p.exists():
            gi = torch.Generator().manual_seed(100 + i)
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=gi) for k, v in base.items()}, str(p))
        tasks[f"task{i:02d}"] = str(p)
    return {"base": str(base_path), "tasks": tasks}


CHILD = r"""
import json, resource, sys, time
cfg = json.loads(sys.argv[2])
# Imports (about 1.4 s, mostly torch) are outside both timings: the ratio compares the passes.
from flexmerge.engine import FlexMerge
from flexmerge.io import open_checkpoint
t0 = time.perf_counter()
if sys.argv[1] == "read":
    # the I/O floor: every tensor of every checkpoint read once, with the same reader
    for path in [cfg["base"], *cfg["tasks"].values()]:
        src = open_checkpoint(path)
        for k in src.names():
            src.get(k)
        src.close()
else:
    plan = FlexMerge(cfg).plan()
    assert len(plan.steps) == len(plan.blocks) * (len(cfg["tasks"]) - 1)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_child(mode: str, cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(cfg)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 30])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "flexmerge-bench-plan")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--planner", default=None, help="planner of the plan pass (default: the config's)")
    args = ap.parse_args()
    shapes = bert_shapes()
    model_bytes = sum(4 * torch.Size(s).numel() for s in shapes.values())
    from flexmerge.blocks import build_block_map
    from flexmerge.io import TensorInfo
    bm = build_block_map({k: TensorInfo(v, torch.float32) for k, v in shapes.items()}, "component")
    largest = max(b.nbytes for b in bm.blocks)
    print(f"model: {model_bytes / 4e6:.1f}M parameters, {model_bytes / 2**20:.1f} MiB fp32; "
          f"{len(bm.blocks)} blocks, largest {largest / 2**20:.1f} MiB")
    print(f"{'N':>3} {'read s':>8} {'plan s':>8} {'ratio':>6} {'read RSS MiB':>13} {'plan RSS MiB':>13} "
          f"{'bound MiB':>10} {'RSS ok':>6}")
    for n in args.tasks:
        cfg = make_models(args.dir, n)
        run_child("read", cfg)  # warm the page cache
        reads = [run_child("read", cfg) for _ in range(args.repeat)]
        plan_cfg = cfg if args.planner is None else {**cfg, "planner": args.planner}
        plans = [run_child("plan", plan_cfg) for _ in range(args.repeat)]
        r = min(x["seconds"] for x in reads)
        p = min(x["seconds"] for x in plans)
        rss = max(x["peak_rss"] for x in plans)
        bound = 2 * model_bytes + n * largest
        print(f"{n:>3} {r:>8.2f} {p:>8.2f} {p / r:>6.2f} {max(x['peak_rss'] for x in reads) / 2**20:>13.0f} "
              f"{rss / 2**20:>13.0f} {bound / 2**20:>10.0f} {'yes' if rss <= bound else 'NO':>6}")


if __name__ == "__main__":
    main()
