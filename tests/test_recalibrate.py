"""BatchNorm statistics re-estimated on unlabeled data after merging (:mod:`flexmerge.recalibrate`):
the values equal torch's own train-mode statistics (a group of one) and the pooled statistics of
the members' (a merged group); on the synthetic tasks of ``bench/bench_statistics.py`` the
outputs move closer to the fine-tuned models'; the manifest records it; the CLI takes it; bad
input is one line, exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from flexmerge.bundle import Bundle
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError
from flexmerge.recalibrate import Recalibration, task_statistics
from helpers import one_thread  # noqa: F401  (module fixture)
from test_batchnorm import TinyCNN, cnn_set, hand_pooled, stat_names

MODULES = ("bn0", "layers.0.bn1", "layers.0.bn2")


def known_batches(task: str, sizes=(24,)) -> list[torch.Tensor]:
    """Inputs from N(mu_t, sigma_t) per channel, a distribution of its own per task."""
    i = int(task[1:])
    g = torch.Generator().manual_seed(40 + i)
    mu = torch.tensor([1.0, -0.5, 0.25]).view(1, 3, 1, 1) * (i + 1)
    sigma = torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1) + 0.25 * i
    return [mu + sigma * torch.randn(n, 3, 6, 6, generator=g) for n in sizes]


def torch_statistics(sd: dict, x: torch.Tensor) -> dict:
    """What torch stores after one train-mode forward of ``x`` with ``momentum=None``."""
    model = TinyCNN()
    model.load_state_dict(sd)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


RECAL = Recalibration(known_batches, lambda task: TinyCNN())


def test_a_group_of_one_gets_torchs_statistics_of_the_data():
    cfg = cnn_set()
    fm = FlexMerge(cfg)
    bundle = fm.merge(grouping=fm.plan().grouping(0), recalibrate=RECAL)  # size N: fine-tuned weights
    for t in fm.tasks:
        sd = bundle.state_dict(t)
        want = torch_statistics(cfg["tasks"][t], known_batches(t)[0])
        for name, value in want.items():
            assert torch.allclose(sd[name], value, rtol=1e-5, atol=1e-6), (t, name)
            assert not torch.allclose(sd[name], cfg["tasks"][t][name], rtol=1e-2)  # not the checkpoint's
        for name in cfg["tasks"][t]:  # weights and num_batches_tracked: the checkpoint's, bit for bit
            if name not in want:
                assert torch.equal(sd[name], cfg["tasks"][t][name]), name
    assert bundle.manifest["plan"]["recalibration"] == {"examples": {t: 24 for t in fm.tasks},
                                                        "batches": {t: 1 for t in fm.tasks}}


def test_batches_of_any_size_pool_every_example():
    """bn0 sees the stem's output, which does not depend on the batch: over three batches of unequal
    sizes its statistics are the mean and unbiased variance of all examples and positions."""
    cfg = cnn_set()
    sizes = (5, 17, 2)
    sd = cfg["tasks"]["t1"]
    model = TinyCNN()
    model.load_state_dict(sd)
    model.eval()
    model.layers[0].train()
    got, examples, count = task_statistics(model, known_batches("t1", sizes), "t1",
                                           set(stat_names(sd)), "known_batches")
    assert (examples, count) == (24, 3)
    x = torch.cat(known_batches("t1", sizes)).double()
    y = nn.functional.conv2d(x, sd["stem.weight"].double(), padding=1)  # [24, 8, 6, 6]
    flat = y.transpose(0, 1).reshape(8, -1)
    assert torch.allclose(got["bn0.running_mean"], flat.mean(1), rtol=1e-6, atol=1e-7)
    assert torch.allclose(got["bn0.running_var"], flat.var(1, unbiased=True), rtol=1e-6, atol=1e-7)
    # the model comes back as it was: its modes, its own statistics
    assert [m.training for m in model.modules()] == [False] * 4 + [True] * 5 + [False]
    assert torch.equal(model.bn0.running_var, sd["bn0.running_var"])


@pytest.mark.parametrize("rule", ["pooled", "per_task"])
def test_merged_groups_store_the_pooled_statistics_of_their_members(rule):
    cfg = cnn_set()
    fm = FlexMerge(cfg, method="ties", statistics=rule)
    plan = fm.plan()
    for k in (len(plan.steps) // 2, len(plan.steps)):
        grouping = plan.grouping(k)
        free = fm.merge(grouping=grouping)
        cal = fm.merge(grouping=grouping, recalibrate=RECAL)
        # each member measured on its own merged model: train-mode statistics ignore the stored ones
        own = {t: torch_statistics(free.state_dict(t), known_batches(t)[0]) for t in fm.tasks}
        for block in fm.blockmap.blocks:
            groups = grouping.groups[block.name] if rule == "pooled" else [[i] for i in range(len(fm.tasks))]
            for members in groups:
                names = [fm.tasks[i] for i in members]
                for stat in block.statistics:
                    module = stat.rpartition(".")[0]
                    mu, var = hand_pooled([own[t][f"{module}.running_mean"] for t in names],
                                          [own[t][f"{module}.running_var"] for t in names])
                    want = var if stat.endswith("running_var") else mu
                    for t in names:
                        assert torch.allclose(cal.state_dict(t)[stat], want, rtol=1e-5, atol=1e-6), (k, stat, t)
        for t in fm.tasks:  # only the statistics change; the size too stays
            for name, value in free.state_dict(t).items():
                if not name.endswith(("running_mean", "running_var")):
                    assert torch.equal(cal.state_dict(t)[name], value)
        assert cal.size_bytes == free.size_bytes


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_statistics.py"
    spec = importlib.util.spec_from_file_location("_bench_statistics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~5-10 s: runs in CI's full run (.ci/run), not the default fast run
def test_recalibrated_outputs_come_closer_to_the_fine_tuned_models():
    """bench/bench_statistics.py's synthetic tasks (seed 0, short training): at one model unit, the
    merged models' logits come closer to the fine-tuned models' with statistics re-estimated on 256
    unlabeled examples per task than with the pooled data-free ones, for each method."""
    bs = _bench()
    specs, cfg, ft_acc, ft_out = bs.setup(0, 150)
    recal = Recalibration(bs.unlabeled(specs, 256, 0), lambda task: bs.CNN())
    for method in ("task_arithmetic", "ties"):
        fm = FlexMerge(cfg, method=method)
        free_acc, free_mse = bs.evaluate(fm.merge(1.0), specs, ft_acc, ft_out)
        cal_acc, cal_mse = bs.evaluate(fm.merge(1.0, recalibrate=recal), specs, ft_acc, ft_out)
        assert cal_mse < 0.85 * free_mse, (method, free_mse, cal_mse)
        if method == "ties":  # data-free TIES loses accuracy here; re-estimation wins most of it back
            assert cal_acc > free_acc + 0.04, (free_acc, cal_acc)


def test_manifest_records_it_and_older_bundles_still_load(tmp_path):
    cfg = cnn_set()
    fm = FlexMerge(cfg)
    bundle = fm.merge(1.0, out=tmp_path / "cal", recalibrate=Recalibration(
        lambda t: known_batches(t, (8, 8, 4)), lambda task: TinyCNN()))
    bundle.verify()
    mpath = tmp_path / "cal" / "manifest.json"
    data = json.loads(mpath.read_text())
    assert data["plan"]["recalibration"] == {"examples": {t: 20 for t in fm.tasks}, "batches": {t: 3 for t in fm.tasks}}
    assert fm.merge(1.0, out=tmp_path / "free").manifest["plan"]["recalibration"] is None
    del data["plan"]["recalibration"]  # as a bundle written before the field existed
    mpath.write_text(json.dumps(data))
    assert Bundle.load(tmp_path / "cal").manifest["plan"]["recalibration"] is None
    data["plan"]["recalibration"] = {"examples": {t: 0 for t in fm.tasks}, "batches": {t: 1 for t in fm.tasks}}
    mpath.write_text(json.dumps(data))
    with pytest.raises(FlexMergeError, match="'recalibration' must give at least one example"):
        Bundle.load(tmp_path / "cal")


class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def test_bad_input_is_one_line():
    cfg = cnn_set()
    fm = FlexMerge(cfg)
    factory = lambda task: TinyCNN()  # noqa: E731
    cases = [
        (Recalibration(lambda t: [], factory), "yielded no batch for task 't0'"),
        (Recalibration(lambda t: iter(()), factory), "yielded no batch for task 't0'"),
        (Recalibration(lambda t: torch.zeros(4, 3, 6, 6), factory), "returned a Tensor for task 't0'"),
        (Recalibration(lambda t: [(torch.zeros(4, 3, 6, 6), torch.zeros(4))], factory),
         "batch 0 of task 't0' is a tuple"),
        (Recalibration(lambda t: [torch.zeros(4, 5, 6, 6)], factory), "the model failed on batch 0"),
        (Recalibration(lambda t: 1 / 0, factory), "failed for task 't0' \\(ZeroDivisionError"),
        (Recalibration(known_batches, lambda task: NoBN()), "has no tensor 'bn0.bias'"),
        (Recalibration(known_batches, lambda task: "resnet"), "returned a str for task 't0'"),
        (Recalibration(lambda t: [torch.full((4, 3, 6, 6), float("nan"))], factory), "non-finite statistics"),
    ]
    for recal, message in cases:
        with pytest.raises(FlexMergeError, match=message) as info:
            fm.merge(1.0, recalibrate=recal)
        assert "\n" not in str(info.value)
    with pytest.raises(FlexMergeError, match="batches must be a callable"):
        Recalibration([torch.zeros(1)], factory)
    with pytest.raises(FlexMergeError, match="has no BatchNorm whose statistics"):
        task_statistics(NoBN(), [torch.zeros(2, 4)], "t0", {"bn.running_mean"})
    bn = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4))
    with pytest.raises(FlexMergeError, match=r"BatchNorm '1' expects 4 channels in dimension 1, its input is \[2, 5\]"):
        task_statistics(bn, [torch.zeros(2, 5)], "t0", {"1.running_mean"})
    mlp = {"base": {"fc.weight": torch.zeros(2, 2)}, "tasks": {"a": {"fc.weight": torch.ones(2, 2)},
                                                                "b": {"fc.weight": -torch.ones(2, 2)}}}
    with pytest.raises(FlexMergeError, match="no normalisation statistics outside the excluded tensors"):
        FlexMerge(mlp).merge(1.0, recalibrate=Recalibration(lambda t: [torch.zeros(2, 2)], lambda t: NoBN()))


USER_CODE = '''
import torch

from test_batchnorm import TinyCNN  # tests/ is on sys.path under pytest


def factory(task):
    return TinyCNN()


def batches(task):
    g = torch.Generator().manual_seed(len(task) + ord(task[-1]))
    return [torch.randn(16, 3, 6, 6, generator=g) * 2 + 1 for _ in range(2)]


def empty(task):
    return []


def evaluate(task, model):
    return float(model.bn0.running_var.mean())
'''


def _files(tmp_path) -> tuple[list[str], str]:
    cfg = cnn_set()
    args = []
    for name, sd in [("base", cfg["base"])] + list(cfg["tasks"].items()):
        path = tmp_path / f"{name}.pt"
        torch.save(sd, path)
        args += ["--base", str(path)] if name == "base" else ["--task", f"{name}={path}"]
    user = tmp_path / "user_code.py"
    user.write_text(USER_CODE)
    return args + ["--exclude", r"head\..*"], str(user)


def test_cli_merge_and_curve_recalibrate(tmp_path, capsys):
    from flexmerge.cli import main

    args, user = _files(tmp_path)
    out = tmp_path / "bundle"
    assert main(["merge", *args, "-s", "1", "-o", str(out), "--no-progress",
                 "--recalibrate-bn", f"{user}:batches", "--model-factory", f"{user}:factory"]) == 0
    assert "BatchNorm statistics re-estimated on 32+ examples per task" in capsys.readouterr().out
    bundle = Bundle.load(out)
    assert bundle.manifest["plan"]["recalibration"]["examples"] == {t: 32 for t in bundle.tasks}
    from flexmerge.evaluate import load_callable

    api = FlexMerge(cnn_set()).merge(1.0, recalibrate=Recalibration(load_callable(f"{user}:batches"),
                                                                    load_callable(f"{user}:factory")))
    for t in bundle.tasks:
        for name, value in api.state_dict(t).items():
            assert torch.equal(bundle.state_dict(t)[name], value), name
    # curve: every merged model is recalibrated before the evaluator sees it
    assert main(["curve", str(_yaml(tmp_path)), "-s", "1", "-m", "ties", "-e", f"{user}:evaluate",
                 "--model-factory", f"{user}:factory", "--recalibrate-bn", f"{user}:batches",
                 "-o", str(tmp_path / "curve"), "--no-plots", "--no-progress", "--no-zero-shot"]) == 0
    rows = json.loads((tmp_path / "curve" / "curve.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "ties")
    tied = FlexMerge(cnn_set(), method="ties").merge(
        1.0, recalibrate=Recalibration(load_callable(f"{user}:batches"), load_callable(f"{user}:factory")))
    for t, score in row["scores"].items():
        assert score == pytest.approx(float(tied.state_dict(t)["bn0.running_var"].mean()), rel=1e-6)


def _yaml(tmp_path) -> Path:
    lines = [f"base: {tmp_path / 'base.pt'}", "tasks:"]
    lines += [f"  t{i}: {tmp_path / f't{i}.pt'}" for i in range(4)]
    lines += ["exclude:", "  - 'head\\..*'"]
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_bad_recalibration_input_is_one_line_exit_2(tmp_path, capsys):
    from flexmerge.cli import main

    args, user = _files(tmp_path)
    out = str(tmp_path / "bundle")
    cases = [
        (["--recalibrate-bn", f"{user}:nope", "--model-factory", f"{user}:factory"], "has no attribute 'nope'"),
        (["--recalibrate-bn", f"{user}:batches"], "--recalibrate-bn and --model-factory go together"),
        (["--model-factory", f"{user}:factory"], "--recalibrate-bn and --model-factory go together"),
        (["--recalibrate-bn", f"{user}:empty", "--model-factory", f"{user}:factory"], "yielded no batch"),
        (["--recalibrate-bn", "no_such_module_xyz:batches", "--model-factory", f"{user}:factory"],
         "cannot import module 'no_such_module_xyz'"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["merge", *args, "-s", "1", "-o", out, "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
        assert not Path(out).exists()
    assert main(["curve", str(_yaml(tmp_path)), "-s", "1", "-e", f"{user}:evaluate", "--recalibrate-bn",
                 f"{user}:batches", "-o", str(tmp_path / "curve"), "--no-plots", "--no-progress"]) == 2
    assert "--recalibrate-bn needs --model-factory" in capsys.readouterr().err
