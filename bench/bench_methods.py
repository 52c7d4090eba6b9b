"""Benchmark: merge time and peak RSS per method and size; rebuild latency of mask bundles.

Models: 8 synthetic tasks of a 22M-parameter BERT (the shapes of
all-MiniLM-L6-v2, see bench_plan.py), safetensors on disk. For every method:

* the plan (global pass + similarity pass + greedy plan) once, saved to plan.json;
* a merge to a bundle on disk at size 1.0 (or the method's minimum) and every integer size up to 8,
  each in a fresh subprocess reusing the plan: wall seconds of ``merge`` and the peak RSS.

Then, for ``consensus`` and ``emr``, the rebuild latency of one task into a preallocated
``BertModel`` (``Bundle.apply_task``, FlexMerge Appendix C.9) at sizes from the minimum to 8,
against the time of one forward pass (batch 32 x 64 tokens) of the same model.

    python bench/bench_methods.py [--methods ties,emr] [--sizes 1,2,8] [--dir DIR]
    python bench/bench_methods.py --methods "tsv;wudi;wudi:solver=closed_form;doge;larv:inner=iso_c" --sizes 1

A method is a name or, with ``;`` between methods, ``name:key=value,key=value`` (values as YAML).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_plan import make_models  # noqa: E402

CHILD_PLAN = r"""
import json, sys, time, resource
from flexmerge.engine import FlexMerge
cfg, method, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
fm = FlexMerge(cfg, method=method)
plan = fm.plan()
plan.save(out)
print(json.dumps({"seconds": time.perf_counter() - t0, "min_units": plan.min_units,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

CHILD_MERGE = r"""
import json, sys, time, resource, shutil
from flexmerge.engine import FlexMerge
from flexmerge.plan import Plan
cfg, method, plan_path, size, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
fm = FlexMerge(cfg, method=method)
fm.use_plan(Plan.load(plan_path))
t0 = time.perf_counter()
b = fm.merge(size, out)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "units": b.size_units, "bytes": b.size_bytes,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

CHILD_REBUILD = r"""
import json, sys, time, torch
from transformers import BertConfig, BertModel
from flexmerge.bundle import Bundle
torch.set_num_threads(2)
paths = json.loads(sys.argv[1])
model = BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536, max_position_embeddings=512), add_pooling_layer=True).eval()
ids = torch.randint(0, 30522, (32, 64))
with torch.no_grad():
    model(input_ids=ids)
    t = []
    for _ in range(5):
        t0 = time.perf_counter(); model(input_ids=ids); t.append(time.perf_counter() - t0)
fwd = sorted(t)[len(t) // 2]
rows = []
for size, path in paths.items():
    b = Bundle.load(path)
    tasks = b.tasks
    b.apply_task(model, tasks[0])
    times = []
    for i in range(1, 6):
        t0 = time.perf_counter(); b.apply_task(model, tasks[i % len(tasks)]); times.append(time.perf_counter() - t0)
    rows.append({"size": float(size), "units": b.size_units, "rebuild_s": sorted(times)[len(times) // 2]})
print(json.dumps({"forward_s": fwd, "rows": rows}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_methods(text: str) -> list[tuple[str, dict | str]]:
    """``"ties,emr"`` or ``"tsv;wudi:solver=closed_form"`` -> ``[(label, spec), ...]``; the
    parameters are parsed as ``flexmerge merge --set`` parses them."""
    from flexmerge.config import parse_assignments

    out = []
    for item in filter(None, (m.strip() for m in text.split(";" if ";" in text else ","))):
        name, _, rest = item.partition(":")
        params = parse_assignments([p.strip() for p in rest.split(",") if p.strip()])
        out.append((item.replace(":", " ").replace(",", " "), {"name": name, **params} if params else name))
    return out


def main() -> None:
    from flexmerge.methods import available_methods

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(available_methods()))
    ap.add_argument("--sizes", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "flexmerge-bench-plan")
    ap.add_argument("--no-rebuild", action="store_true")
    args = ap.parse_args()
    cfg = json.dumps(make_models(args.dir, args.tasks))
    work = Path(tempfile.mkdtemp(prefix="flexmerge-bench-methods-"))
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"{args.tasks} synthetic tasks of a 22.7M-parameter BERT; bundles in {work}")
    print(f"{'method':28s} {'plan s':>7s} {'size':>6s} {'units':>7s} {'merge s':>8s} {'peak RSS MiB':>13s}")
    bundles: dict[str, dict[str, str]] = {}
    for method, spec in parse_methods(args.methods):
        plan_path = work / f"{method.replace(' ', '_')}-plan.json"
        try:
            p = child(CHILD_PLAN, cfg, json.dumps(spec), str(plan_path))
        except RuntimeError as exc:
            print(f"{method:16s} plan failed: {exc}")
            continue
        todo = sorted({max(s, p["min_units"]) for s in sizes if s >= 1})
        for size in todo:
            out = work / f"{method.replace(' ', '_')}-{size:g}"
            try:
                r = child(CHILD_MERGE, cfg, json.dumps(spec), str(plan_path), repr(size), str(out))
            except RuntimeError as exc:
                print(f"{method:16s} {'':>7s} {size:>6.3g} failed: {exc}")
                continue
            print(f"{method:28s} {p['seconds']:>7.1f} {size:>6.3g} {r['units']:>7.3f} {r['seconds']:>8.1f} "
                  f"{r['peak_rss'] / 2**20:>13.0f}", flush=True)
            bundles.setdefault(method, {})[repr(size)] = str(out)
    if not args.no_rebuild:
        for method in ("consensus", "emr"):
            if method not in bundles:
                continue
            r = child(CHILD_REBUILD, json.dumps(bundles[method]))
            print(f"\nrebuild of one task into a preallocated BertModel, {method} "
                  f"(one forward pass, batch 32 x 64 tokens: {1e3 * r['forward_s']:.0f} ms)")
            print(f"{'size':>6s} {'units':>7s} {'rebuild ms':>11s} {'÷ forward':>10s}")
            for row in r["rows"]:
                print(f"{row['size']:>6.3g} {row['units']:>7.3f} {1e3 * row['rebuild_s']:>11.0f} "
                      f"{row['rebuild_s'] / r['forward_s']:>10.2f}")


if __name__ == "__main__":
    main()
