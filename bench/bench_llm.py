"""Benchmark: merging Llama-shaped bf16 checkpoints, side by side with mergekit.

Synthesises, once and cached on disk, a random Llama-shaped base model and N fine-tunes in bf16 as
sharded HF directories (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
shards of ``--shard-gb``). A task's change of a matrix is low rank plus noise,
``delta = (U Vᵀ + E) · rel · ‖W‖ / ‖U Vᵀ + E‖`` with rank 8 and ``rel`` = 1e-3 (a fine-tune
changes its weights by about 1e-3 of their norm), computed in float32 and rounded once to bf16; vectors (norms) get
noise only. The noise comes from one shared pool of random numbers read at a random offset per
tensor (drawing 10⁹ fresh normals per model would dominate the generation time; the offsets make
every task's noise different).

Then, in one run, each in a fresh subprocess whose wall time and peak RSS (``wait4``) are taken:
reading every checkpoint once; ``flexmerge plan``; ``flexmerge merge`` at each ``--sizes`` for
task arithmetic and TIES; and ``mergekit-yaml`` (task arithmetic and TIES at one model, same
inputs) when ``--mergekit`` names its executable. Ratios are printed against the read-once time
and mergekit's figures measured in the same run.

    python bench/bench_llm.py --shape tinyllama --tasks 8 --mergekit /tmp/peers-venv/bin/mergekit-yaml
    python bench/bench_llm.py --shape llama218m --tasks 4 --mergekit ...

Shapes: ``tinyllama`` (TinyLlama-1.1B: hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads,
vocab 32000, untied), ``llama218m`` (hidden 1024, 12 layers, MLP 2816, 16 heads, vocab 32000,
untied), ``tiny`` (for a smoke test). The models go under ``--dir`` (default
``~/.cache/flexmerge/llm-bench``; ``FLEXMERGE_CACHE`` moves the cache root); outputs go to a
scratch directory there and are deleted after each step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tinyllama": dict(hidden=2048, layers=22, mlp=5632, heads=32, kv_heads=4, vocab=32000),
    "llama218m": dict(hidden=1024, layers=12, mlp=2816, heads=16, kv_heads=16, vocab=32000),
    "tiny": dict(hidden=64, layers=2, mlp=160, heads=4, kv_heads=2, vocab=512),
}
REL_DELTA = 1e-3
RANK = 8
POOL = 1 << 24


def llama_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    out = {"model.embed_tokens.weight": (s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (h, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.o_proj.weight"] = (h, h)
        out[p + "mlp.gate_proj.weight"] = (s["mlp"], h)
        out[p + "mlp.up_proj.weight"] = (s["mlp"], h)
        out[p + "mlp.down_proj.weight"] = (h, s["mlp"])
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (s["vocab"], h)
    return out


def llama_config(s: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
            "intermediate_size": s["mlp"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
            "vocab_size": s["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2}


def write_sharded(out: Path, tensors, shard_bytes: int, config: dict) -> None:
    """Write ``(name, tensor)`` pairs as HF shards of at most ``shard_bytes`` (one shard in memory)."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard: dict = {}
    names: list[list[str]] = []
    size = 0
    total = 0

    def flush():
        nonlocal shard, size
        if shard:
            idx = len(names)
            save_file(shard, str(tmp / f"part-{idx}.safetensors"), metadata={"format": "pt"})
            names.append(list(shard))
        shard, size = {}, 0

    for name, t in tensors:
        if size and size + t.nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += t.nbytes
        total += t.nbytes
    flush()
    n = len(names)
    weight_map = {}
    for i, keys in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (tmp / f"part-{i}.safetensors").rename(tmp / fname)
        weight_map.update({k: fname for k in keys})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)


def synthesize(root: Path, shape: str, n: int, shard_gb: float) -> tuple[Path, list[Path]]:
    """The cached base and task directories (made once)."""
    import torch

    s = SHAPES[shape]
    shapes = llama_shapes(s)
    cfg = llama_config(s)
    shard_bytes = int(shard_gb * (1 << 30))
    base_dir = root / "base"
    if not base_dir.exists():
        g = torch.Generator().manual_seed(0)

        def base_tensors():
            for name, shp in shapes.items():
                if len(shp) == 1:
                    yield name, torch.ones(shp, dtype=torch.bfloat16)
                else:
                    yield name, (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)
        t0 = time.perf_counter()
        write_sharded(base_dir, base_tensors(), shard_bytes, cfg)
        print(f"  base written in {time.perf_counter() - t0:.0f} s", flush=True)
    from safetensors import safe_open
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(12345))
    tasks = []
    for i in range(n):
        tdir = root / f"task{i}"
        tasks.append(tdir)
        if tdir.exists():
            continue
        g = torch.Generator().manual_seed(1000 + i)

        def task_tensors():
            handles = {}
            for name, shp in shapes.items():
                f = index[name]
                if f not in handles:
                    handles[f] = safe_open(str(base_dir / f), "pt")
                w = handles[f].get_tensor(name).to(torch.float32)
                numel = w.numel()
                noise = torch.empty(numel)
                pos = 0
                while pos < numel:  # the pool, read from random offsets
                    off = int(torch.randint(0, POOL, (1,), generator=g))
                    k = min(numel - pos, POOL - off)
                    noise[pos:pos + k] = pool[off:off + k]
                    pos += k
                d = noise.reshape(shp)
                if len(shp) == 2:
                    u = torch.randn(shp[0], RANK, generator=g)
                    v = torch.randn(RANK, shp[1], generator=g)
                    d = d + (u @ v) / math.sqrt(RANK)
                d *= REL_DELTA * w.norm() / d.norm()
                yield name, (w + d).to(torch.bfloat16)
        t0 = time.perf_counter()
        write_sharded(tdir, task_tensors(), shard_bytes, cfg)
        print(f"  task{i} written in {time.perf_counter() - t0:.0f} s", flush=True)
    return base_dir, tasks


def measured(cmd: list[str], env=None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) and output tail of one subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out_chunks = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out_chunks.append(line)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    tail = "".join(out_chunks)[-2000:]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return wall, rusage.ru_maxrss / (1 << 20), tail


READ_ONCE = r"""
import sys
n = 0
buf = bytearray(64 << 20)
for path in sys.argv[1:]:
    with open(path, 'rb', buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
print(n)
"""


def markdown(results: dict) -> str:
    """The figures of one run as a markdown table, with the ratios against read-once and mergekit."""
    runs = results["runs"]
    read = runs["read every checkpoint once"]["seconds"]
    imports = runs.get("python + imports of the CLI", {}).get("seconds", 0.0)
    lines = [f"{results['tasks']} × {results['shape']} + base, {results['input_gib']:.2f} GiB of bf16 safetensors",
             "", "| step | seconds | peak RSS (GiB) | vs read-once (imports excluded) | vs mergekit (time, RSS) |",
             "|---|---:|---:|---:|---:|"]
    for key, r in runs.items():
        vs_read = f"{(r['seconds'] - imports) / read:.2f}" if key.startswith("flexmerge") else ""
        vs_mk = ""
        for method in ("task_arithmetic", "ties"):
            mk = runs.get(f"mergekit {method} (one model)")
            if mk and key == f"flexmerge merge {method} size 1":
                vs_mk = f"{r['seconds'] / mk['seconds']:.2f}, {r['peak_rss_gib'] / mk['peak_rss_gib']:.2f}"
        lines.append(f"| {key} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {vs_read} | {vs_mk} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 1.5, 4.0])
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml (a separate venv; bench/README.md)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--only-synthesize", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--render", type=Path, default=None, help="print the markdown table of a JSON written by --out")
    a = ap.parse_args(argv)
    if a.render:
        print(markdown(json.loads(a.render.read_text())), end="")
        return 0
    cache = Path(os.environ.get("FLEXMERGE_CACHE", Path.home() / ".cache" / "flexmerge"))
    root = (a.dir or cache / "llm-bench") / f"{a.shape}-n{a.tasks}-shard{a.shard_gb:g}"
    t0 = time.perf_counter()
    if a.only_synthesize:
        synthesize(root, a.shape, a.tasks, a.shard_gb)
        return 0
    # Synthesis imports torch, and a child's peak RSS (wait4) starts from its parent's at fork: so
    # the models are made in a subprocess and this process, which measures, never imports torch.
    subprocess.run([sys.executable, __file__, "--shape", a.shape, "--tasks", str(a.tasks),
                    "--shard-gb", str(a.shard_gb), "--only-synthesize",
                    *(["--dir", str(a.dir)] if a.dir else [])], check=True)
    base, tasks = root / "base", [root / f"task{i}" for i in range(a.tasks)]
    files = sorted(p for d in [base, *tasks] for p in d.glob("*.safetensors"))
    gib = sum(p.stat().st_size for p in files) / (1 << 30)
    print(f"{a.shape} x {a.tasks} tasks + base: {gib:.2f} GiB of bf16 safetensors under {root} "
          f"(ready after {time.perf_counter() - t0:.0f} s)", flush=True)
    scratch = root / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    results: dict[str, dict] = {"shape": a.shape, "tasks": a.tasks, "input_gib": gib, "runs": {}}

    def record(key, wall, rss):
        results["runs"][key] = {"seconds": round(wall, 2), "peak_rss_gib": round(rss, 3)}
        print(f"  {key:<34} {wall:8.1f} s  {rss:6.2f} GiB", flush=True)

    py = sys.executable
    measured([py, "-c", READ_ONCE, *map(str, files)])  # warm the page cache as far as it goes
    wall, rss, _ = measured([py, "-c", READ_ONCE, *map(str, files)])
    record("read every checkpoint once", wall, rss)
    read_s = wall
    tasks_arg = [x for i, t in enumerate(tasks) for x in ("--task", f"t{i}={t}")]
    fm = [str(Path(sys.executable).parent / "flexmerge")]
    wall, rss, _ = measured([py, "-c", "import flexmerge.cli"])
    record("python + imports of the CLI", wall, rss)
    imports_s = wall
    for method in a.methods:
        common = ["--base", str(base), *tasks_arg, "--method", method, "--no-progress"]
        plan_file = scratch / f"plan-{method}.json"
        wall, rss, _ = measured([*fm, "plan", *common, "-o", str(plan_file)])
        record(f"flexmerge plan {method}", wall, rss)
        results[f"plan_over_read_{method}"] = round(wall / read_s, 3)
        results[f"plan_minus_imports_over_read_{method}"] = round((wall - imports_s) / read_s, 3)
        for size in a.sizes:
            out = scratch / f"bundle-{method}-{size:g}"
            # the minimum size needs no plan; other sizes reuse the plan file, as a user would
            reuse = [] if size == 1 else ["--plan", str(plan_file)]
            wall, rss, _ = measured([*fm, "merge", *common, "--size", str(size), "-o", str(out), *reuse])
            record(f"flexmerge merge {method} size {size:g}", wall, rss)
            shutil.rmtree(out)
    if a.mergekit:
        for method in a.methods:
            cfg = {"merge_method": "task_arithmetic" if method == "task_arithmetic" else "ties",
                   "base_model": str(base), "dtype": "bfloat16",
                   "models": [{"model": str(t), "parameters": {"weight": 1.5 / a.tasks} if method == "task_arithmetic"
                               else {"weight": 1.0, "density": 0.2}} for t in tasks]}
            if method != "task_arithmetic":
                cfg["parameters"] = {"normalize": True}
            yml = scratch / f"mergekit-{method}.yml"
            yml.write_text(json.dumps(cfg))  # JSON is YAML
            out = scratch / f"mergekit-{method}"
            wall, rss, _ = measured([a.mergekit, str(yml), str(out), "--out-shard-size", f"{a.shard_gb:g}B"])
            record(f"mergekit {method} (one model)", wall, rss)
            shutil.rmtree(out)
    runs = results["runs"]
    for method in a.methods:
        print(f"plan {method} / read-once: {results[f'plan_over_read_{method}']:.2f} "
              f"({results[f'plan_minus_imports_over_read_{method}']:.2f} without the imports)")
    for method in a.methods:
        k = f"flexmerge merge {method} size 1"
        mk = runs.get(f"mergekit {method} (one model)")
        if k in runs and mk:
            rt = runs[k]["seconds"] / mk["seconds"]
            rm = runs[k]["peak_rss_gib"] / mk["peak_rss_gib"]
            results[f"{method}_vs_mergekit"] = {"time": round(rt, 3), "peak_rss": round(rm, 3)}
            print(f"{method} size 1 vs mergekit: time {rt:.2f}x, peak RSS {rm:.2f}x")
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
