"""Normalisation statistics of merged groups: ``pooled`` against ``per_task`` on a tiny CNN.

A CNN (3x3 stem, two pointwise + depthwise units, each conv followed by BatchNorm) is trained on a
synthetic "pretraining" task, then fine-tuned on four tasks whose inputs differ in per-channel
scale and shift (so each task's BatchNorm statistics move) and whose labels come from different
random teacher networks. Every method is merged at sizes 1, 1.5, 2, 3 (a mask method at its
minimum instead of sizes below it) under both statistics rules (:mod:`flexmerge.sizes`), and
each task's merged model is scored on 2000 fresh examples. Prints one line per (method, rule,
size): actual units, normalised accuracy (merged / fine-tuned, averaged over the tasks) and the
mean squared difference of the logits from the fine-tuned model's, then the mean over seeds at
each method's smallest size. Synthetic data: it measures the rule, not a real vision benchmark.

``--recalibrate N`` also re-estimates the statistics of every merged bundle on N unlabeled
examples per task (fresh draws of the task's inputs, batches of 64; :mod:`flexmerge.recalibrate`)
under both rules (``pooled+recal``, ``per_task+recal``) and reports the seconds a recalibrated
merge takes against a data-free one, measured in the same run.

    python bench/bench_statistics.py --seeds 0 1 2 --recalibrate 256
"""

from __future__ import annotations

import argparse
import statistics as stats
import time

import torch
from torch import nn

from flexmerge.engine import FlexMerge
from flexmerge.recalibrate import Recalibration

TASKS = ("a", "b", "c", "d")
METHODS = ("task_arithmetic", "ties", "tsv", "emr")
SIZES = (1.0, 1.5, 2.0, 3.0)


class Unit(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.dw = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.pw(x))))))


class CNN(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.layers = nn.ModuleList([Unit(16, 32), Unit(32, 32)])
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        for u in self.layers:
            x = u(x)
        return self.head(x.mean(dim=(2, 3)))


def make_tasks(seed: int) -> dict:
    """Per task: input scale and shift per channel, and a random teacher that labels."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, t in enumerate(("pre",) + TASKS):
        torch.manual_seed(100 + i + 1000 * seed)
        teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                nn.Linear(32, 4))
        pre = t == "pre"
        scale = torch.ones(1, 3, 1, 1) if pre else torch.rand(1, 3, 1, 1, generator=gen) * 1.5 + 0.5
        shift = torch.zeros(1, 3, 1, 1) if pre else torch.rand(1, 3, 1, 1, generator=gen) * 2 - 1
        out[t] = (scale, shift, teacher)
    return out


def batch(spec, n: int, g: torch.Generator):
    scale, shift, teacher = spec
    x = torch.randn(n, 3, 8, 8, generator=g) * scale + shift
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return x, y


def train(model: CNN, spec, steps: int, seed: int) -> CNN:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = batch(spec, 64, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def score(model: CNN, spec) -> tuple[float, torch.Tensor]:
    x, y = batch(spec, 2000, torch.Generator().manual_seed(999))
    model.eval()
    with torch.no_grad():
        out = model(x)
    return float((out.argmax(1) == y).float().mean()), out


def unlabeled(specs: dict, n: int, seed: int, size: int = 64):
    """``batches(task)``: ``n`` fresh unlabeled inputs of the task, in batches of ``size``."""

    def batches(task: str) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(7000 + 10 * seed + TASKS.index(task))
        return [batch(specs[task], min(size, n - i), g)[0] for i in range(0, n, size)]
    return batches


def setup(seed: int, steps: int) -> tuple[dict, dict, dict, dict]:
    """The tasks, the merge config (base and fine-tuned state dicts), and each fine-tuned model's
    accuracy and logits on its test examples."""
    specs = make_tasks(seed)
    torch.manual_seed(0)
    base_sd = {k: v.clone() for k, v in train(CNN(), specs["pre"], steps, 1).state_dict().items()}
    fts, ft_acc, ft_out = {}, {}, {}
    for i, t in enumerate(TASKS):
        m = CNN()
        m.load_state_dict(base_sd)
        torch.manual_seed(10 + i + 1000 * seed)
        m.head.reset_parameters()
        train(m, specs[t], steps, 50 + i)
        fts[t] = {k: v.clone() for k, v in m.state_dict().items()}
        ft_acc[t], ft_out[t] = score(m, specs[t])
    cfg = {"base": base_sd, "tasks": fts, "exclude": [r"head\..*"]}
    return specs, cfg, ft_acc, ft_out


def evaluate(bundle, specs: dict, ft_acc: dict, ft_out: dict) -> tuple[float, float]:
    """Normalised accuracy and logit MSE against the fine-tuned models, averaged over the tasks."""
    accs, errs = [], []
    for t in TASKS:
        m = CNN()
        m.load_state_dict(bundle.state_dict(t))
        a, out = score(m, specs[t])
        accs.append(a / ft_acc[t])
        errs.append(float(((out - ft_out[t]) ** 2).mean()))
    return stats.mean(accs), stats.mean(errs)


def run_seed(seed: int, steps: int, recalibrate: int = 0) -> list[dict]:
    specs, cfg, ft_acc, ft_out = setup(seed, steps)
    recal = Recalibration(unlabeled(specs, recalibrate, seed), lambda task: CNN()) if recalibrate else None
    rows = []
    for method in METHODS:
        for rule in ("pooled", "per_task"):
            fm = FlexMerge(cfg, method=method, statistics=rule)
            plan = fm.plan()
            for size in dict.fromkeys(max(s, plan.min_units) for s in SIZES):
                for label, how in [(rule, None)] + ([(rule + "+recal", recal)] if recal else []):
                    t0 = time.perf_counter()
                    bundle = fm.merge(size, recalibrate=how)
                    seconds = time.perf_counter() - t0
                    norm, mse = evaluate(bundle, specs, ft_acc, ft_out)
                    row = {"seed": seed, "method": method, "rule": label, "units": bundle.size_units,
                           "smallest": size == max(SIZES[0], plan.min_units), "normalized": norm,
                           "logit_mse": mse, "seconds": seconds}
                    rows.append(row)
                    print(f"seed {seed} {method:16s} {label:15s} {row['units']:.3f} units: normalized "
                          f"{norm:.4f}, logit MSE {mse:.4f}, merge {seconds:.3f} s", flush=True)
            fm.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=500, help="SGD steps of pretraining and of each fine-tune")
    ap.add_argument("--recalibrate", type=int, default=0, metavar="N",
                    help="also recalibrate the statistics on N unlabeled examples per task (e.g. 256)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for s in a.seeds for r in run_seed(s, a.steps, a.recalibrate)]
    rules = ("pooled", "per_task") + (("pooled+recal", "per_task+recal") if a.recalibrate else ())
    print("\nmean over seeds at each method's smallest size (normalized accuracy / units):")
    for method in METHODS:
        cells = []
        for rule in rules:
            sub = [r for r in rows if r["method"] == method and r["rule"] == rule and r["smallest"]]
            cells.append(f"{rule} {stats.mean(r['normalized'] for r in sub):.3f} / "
                         f"{stats.mean(r['units'] for r in sub):.3f}")
        print(f"  {method:16s} " + ", ".join(cells))
    if a.recalibrate:
        for rule in ("pooled", "per_task"):
            plain = stats.mean(r["seconds"] for r in rows if r["rule"] == rule)
            recal = stats.mean(r["seconds"] for r in rows if r["rule"] == rule + "+recal")
            print(f"seconds per merge ({rule}, mean over all): data-free {plain:.3f}, recalibrated on "
                  f"{a.recalibrate} examples per task {recal:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
