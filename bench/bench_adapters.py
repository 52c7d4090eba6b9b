"""Planning from LoRA adapters vs merely reading them (issue 13: "planning all sizes from adapters
reads each adapter once: <= 1.5x the time of reading them").

Writes N synthetic PEFT LoRA adapters (r on query/value/attention.output.dense of a 12-layer,
768-wide BERT-shaped base, float32) to a temporary directory, then times, in one run and with warm
page cache: reading every adapter tensor once, and ``AdapterMerge(...).plan()`` (opening and
checking the adapters, the Gram pass from the factors, the plan of every size). Prints both and
their ratio (best of ``--repeat``).

    python bench/bench_adapters.py --tasks 8 30 --rank 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from flexmerge.adapters.engine import AdapterMerge
from flexmerge.io import SafetensorsSource

MODULES = ("attention.self.query", "attention.self.value", "attention.output.dense")


def write_set(root: Path, n: int, rank: int, layers: int = 12, width: int = 768) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = {f"encoder.layer.{i}.{m}.weight": torch.zeros(width, width) for i in range(layers) for m in MODULES}
    save_file(base, str(root / "base.safetensors"))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 30])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    args = ap.parse_args()
    for n in args.tasks:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = write_set(Path(tmp), n, args.rank, args.layers, args.width)
            read_all(cfg)  # warm the page cache
            t_read, t_plan = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                read_all(cfg)
                t_read.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with AdapterMerge(cfg) as fm:
                    plan = fm.plan()
                t_plan.append(time.perf_counter() - t0)
            r, p = min(t_read), min(t_plan)
            print(f"N={n} r={args.rank} {args.layers}x{args.width}: read {r:.3f} s, plan {p:.3f} s (ratio {p / r:.2f}); "
                  f"{len(plan.steps)} steps, {plan.max_units:g} -> {plan.min_units:g} adapter units")


if __name__ == "__main__":
    main()
