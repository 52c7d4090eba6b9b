"""Planners: the paper's similarity greedy stays step-for-step today's; the size-aware criteria
score exactly what a brute-force recomputation from the task vectors gives; fill never exceeds
the target and lands at least as close as the prefix.

``tests/data/similarity_plans.json`` holds the plans that ``make_plan`` made before planners
existed (commit 5946bc8), for :func:`golden_cases`; it was written by running that commit's
``make_plan`` on these cases.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flexmerge.blocks import Block, BlockMap
from flexmerge.errors import FlexMergeError
from flexmerge.plan import Plan, make_plan
from flexmerge.planners import GroupSums, group_distortion, predicted_loss, task_weights
from flexmerge.sizes import CostModel

GOLDEN = Path(__file__).parent / "data" / "similarity_plans.json"


def cost_model(sizes, masked=False):
    bm = BlockMap([Block(f"b{i}", [f"w{i}"], numel=s // 4, nbytes=s) for i, s in enumerate(sizes)])
    return CostModel(bm, stores_masks=masked, param_numels={f"w{i}": s // 4 for i, s in enumerate(sizes)})


def random_case(n, nblocks, seed, masked=False, dim=6, ties=False):
    """Block task vectors, Gram matrices and a cost model; ``ties``: integer vectors (equal
    similarities), one zero vector."""
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(1, 60)) * 4 for _ in range(nblocks)]
    taus = {}
    for i in range(nblocks):
        x = rng.integers(-1, 2, size=(n, dim)).astype(float) if ties else rng.normal(size=(n, dim)) * rng.uniform(0.1, 3, size=(n, 1))
        if ties and n > 2:
            x[n - 1] = 0.0
        taus[f"b{i}"] = x
    grams = {b: x @ x.T for b, x in taus.items()}
    return taus, grams, cost_model(sizes, masked), [f"t{i}" for i in range(n)]


def golden_cases():
    for k, (n, nblocks, masked, ties, linkage, order) in enumerate(itertools.product(
            (2, 3, 5, 8), (1, 3), (False, True), (False, True), ("min", "max", "avg"),
            ("greedy", "left-right", "right-left", "random"))):
        if (k % 3) and n == 8:
            continue
        case = {"n": n, "nblocks": nblocks, "masked": masked, "ties": ties, "linkage": linkage,
                "order": order, "seed": k}
        _, grams, cost, tasks = random_case(n, nblocks, k, masked, ties=ties)
        yield case, grams, cost, tasks


def steps_list(p):
    return [[s.block, [list(g) for g in s.groups], s.similarity, s.size_bytes, s.size_units] for s in p.steps]


def test_similarity_reproduces_todays_plans_exactly():
    golden = json.loads(GOLDEN.read_text())
    cases = list(golden_cases())
    assert len(golden) == len(cases) > 300
    for (case, grams, cost, tasks), want in zip(cases, golden):
        assert want["case"] == case
        p = make_plan(grams, cost, tasks, method={"name": "m"}, linkage=case["linkage"],
                      order=case["order"], seed=case["seed"])
        assert p.planner == "similarity" and p.fit == "prefix"
        assert steps_list(p) == want["steps"], case  # floats compared exactly


# ---- the criteria against brute force ----------------------------------------------------


def brute_weights(taus, planner):
    if planner == "distortion":
        total = sum((x ** 2).sum(axis=1) for x in taus.values())
        return {b: np.where(total > 0, 1 / np.where(total > 0, total, 1), 0.0) for b in taus}
    return {b: np.where((x ** 2).sum(axis=1) > 0, 1 / np.maximum((x ** 2).sum(axis=1), 1e-300), 0.0)
            for b, x in taus.items()}


def brute_distortion(x, w, members):
    m = x[list(members)].mean(axis=0)
    return sum(w[i] * ((x[i] - m) ** 2).sum() for i in members)


@pytest.mark.parametrize("planner", ["distortion", "hybrid"])
@pytest.mark.parametrize("seed", range(12))
def test_group_distortion_matches_brute_force(planner, seed):
    taus, grams, cost, tasks = random_case(5, 3, seed, ties=seed % 3 == 0)
    ws = dict(zip(grams, task_weights([grams[b] for b in grams], planner)))
    bw = brute_weights(taus, planner)
    for b in grams:
        np.testing.assert_allclose(ws[b], bw[b], rtol=1e-12)
        for r in range(1, 6):
            for members in itertools.combinations(range(5), r):
                got = group_distortion(grams[b], ws[b], members)
                want = brute_distortion(taus[b], bw[b], members)
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 10**6), planner=st.sampled_from(["distortion", "hybrid"]))
def test_pair_increase_matches_brute_force_along_merges(n, seed, planner):
    """After any sequence of merges, GroupSums' pair increases equal D(a u b) - D(a) - D(b)
    recomputed from the task vectors."""
    taus, grams, cost, tasks = random_case(n, 1, seed)
    x, g = taus["b0"], grams["b0"]
    w = task_weights([g], planner)[0]
    bw = brute_weights(taus, planner)["b0"]
    st_ = GroupSums(g, w)
    rng = np.random.default_rng(seed)
    while st_.num_groups > 1:
        reps, inc = st_.pair_increase()
        for i, a in enumerate(reps):
            assert st_.D[a] == pytest.approx(brute_distortion(x, bw, st_.members[a]), rel=1e-9, abs=1e-12)
            for j, b in enumerate(reps):
                if i < j:
                    want = (brute_distortion(x, bw, st_.members[a] + st_.members[b])
                            - brute_distortion(x, bw, st_.members[a]) - brute_distortion(x, bw, st_.members[b]))
                    assert inc[i, j] == pytest.approx(want, rel=1e-9, abs=1e-12)
        i, j = sorted(rng.choice(len(reps), 2, replace=False))
        st_.merge(reps[i], reps[j])


def brute_plan(taus, cost, planner):
    """The size-aware greedy from scratch: at every step score every (block, pair) from the task
    vectors and the cost model, take the lowest (ties: earliest block, smallest task indices)."""
    w = brute_weights(taus, planner)
    blocks = list(taus)
    groups = {b: [[i] for i in range(len(next(iter(taus.values()))))] for b in blocks}
    out = []
    while any(len(g) > 1 for g in groups.values()):
        best = None
        for bi, b in enumerate(blocks):
            gs = groups[b]
            now = cost.block_cost(bi, [len(g) for g in gs])
            for x, y in itertools.combinations(range(len(gs)), 2):
                after = [len(g) for k, g in enumerate(gs) if k != y]
                after[x] = len(gs[x]) + len(gs[y])
                saved = now - cost.block_cost(bi, after)
                inc = (brute_distortion(taus[b], w[b], gs[x] + gs[y]) - brute_distortion(taus[b], w[b], gs[x])
                       - brute_distortion(taus[b], w[b], gs[y]))
                key = ((0, inc / saved) if saved > 0 else (1, inc), bi, gs[x][0], gs[y][0])
                if best is None or key < best[0]:
                    best = (key, b, x, y)
        _, b, x, y = best
        gs = groups[b]
        out.append((b, list(gs[x]), list(gs[y])))
        gs[x] = sorted(gs[x] + gs.pop(y))
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5), nblocks=st.integers(1, 4), seed=st.integers(0, 10**6), masked=st.booleans(),
       planner=st.sampled_from(["distortion", "hybrid"]))
def test_size_aware_plans_equal_brute_force_greedy(n, nblocks, seed, masked, planner):
    taus, grams, cost, tasks = random_case(n, nblocks, seed, masked)
    p = make_plan(grams, cost, tasks, method={"name": "m"}, planner=planner)
    want = brute_plan(taus, cost, planner)
    assert [(s.block, s.groups[0], s.groups[1]) for s in p.steps] == \
        [(b, [tasks[i] for i in ga], [tasks[i] for i in gb]) for b, ga, gb in want]
    seq = p.sizes()
    assert all(b <= a for a, b in zip(seq, seq[1:])) and seq[0] == n * sum(cost.block_bytes)
    for k in range(len(p.steps) + 1):  # recorded sizes are the cost model's
        g = p.grouping(k)
        assert g.size_bytes == sum(cost.block_cost(i, [len(x) for x in g.groups[f"b{i}"]])
                                   for i in range(nblocks))
    q = make_plan(grams, cost, tasks, method={"name": "m"}, planner=planner)
    assert q.steps == p.steps  # deterministic


def test_distortion_prefers_the_large_orthogonal_block_per_byte():
    """By hand: block e (900 bytes, orthogonal, small vectors) vs block s (100 bytes, cos 0.5).
    Similarity merges s first; distortion charges e 0.1/900 per byte and s 0.5/100."""
    e = np.diag([0.1, 0.1])          # ||tau||^2 = 0.1 each, orthogonal
    s = np.array([[0.9, 0.45], [0.45, 0.9]])   # cos 0.5
    cost = cost_model([900, 100])
    grams = {"b0": e, "b1": s}
    sim = make_plan(grams, cost, ["x", "y"], method={"name": "m"})
    dis = make_plan(grams, cost, ["x", "y"], method={"name": "m"}, planner="distortion")
    assert [st_.block for st_ in sim.steps] == ["b1", "b0"]
    assert [st_.block for st_ in dis.steps] == ["b0", "b1"]
    # w = 1 / (0.1 + 0.9) = 1: D(e) = 0.1 + 0.1 - (1/2)(0.2) = 0.1, D(s) = 1.8 - (1/2)(2.7) = 0.45
    assert group_distortion(e, np.ones(2), [0, 1]) == pytest.approx(0.1)
    assert group_distortion(s, np.ones(2), [0, 1]) == pytest.approx(0.45)
    # predicted loss of the full merge: mean over 2 tasks of (0.1 + 0.45)
    assert predicted_loss(grams, dis.grouping(2).groups) == pytest.approx(0.55 / 2)
    assert predicted_loss(grams, dis.grouping(0).groups) == 0.0


def test_unknown_planner_and_orders_of_other_planners():
    _, grams, cost, tasks = random_case(3, 2, 0)
    with pytest.raises(FlexMergeError, match="unknown planner 'nope'; use similarity, distortion, hybrid"):
        make_plan(grams, cost, tasks, method={"name": "m"}, planner="nope")
    with pytest.raises(FlexMergeError, match="ablation of the similarity planner"):
        make_plan(grams, cost, tasks, method={"name": "m"}, planner="distortion", order="left-right")
    with pytest.raises(FlexMergeError, match="unknown fit"):
        make_plan(grams, cost, tasks, method={"name": "m"}, fit="best")


# ---- fitting a target ----------------------------------------------------------------------


def test_fill_by_hand_skips_the_step_that_overshoots_when_that_loses_less():
    """Two tasks, orthogonal block vectors: b0 (100 bytes, ||tau||^2 = a), b1 (10 bytes, c).
    w = 1/(a + c); D(b0) = a w, D(b1) = c w. Distortion merges b0 first when a/100 < c/10.
    Start 220; target 215: endings 120 (b0 merged, loss a w / 1) and 210 (b1 merged, c w).
    Fill takes the ending of lower predicted loss; the prefix always takes 120."""
    cost = cost_model([100, 10])
    for a, c, want in ((0.5, 0.1, 210), (0.05, 0.1, 120)):
        grams = {"b0": np.eye(2) * a, "b1": np.eye(2) * c}
        p = make_plan(grams, cost, ["x", "y"], method={"name": "m"}, planner="distortion")
        assert [s_.block for s_ in p.steps] == ["b0", "b1"] and p.sizes() == [220, 120, 110]
        assert p.at("215b", fit="prefix").size_bytes == 120
        g = p.at("215b")
        assert g.size_bytes == want and g.steps == 1
        assert g.groups["b1" if want == 210 else "b0"] == [(0, 1)]
        # by hand: each task loses ||(tau_x - tau_y)/2||^2 = d/2 of its total a + c; mean over tasks
        d = c if want == 210 else a
        assert predicted_loss(grams, g.groups) == pytest.approx(d / 2 / (a + c))
        assert p.at("110b").size_bytes == 110 and p.at("220b").steps == 0
        assert p.at("120b").groups == p.at("120b", fit="prefix").groups  # exact hit: the prefix


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 5), nblocks=st.integers(1, 5), seed=st.integers(0, 10**6), masked=st.booleans(),
       planner=st.sampled_from(["similarity", "distortion", "hybrid"]), frac=st.floats(0, 1))
def test_fill_never_exceeds_and_predicts_no_more_loss_than_the_prefix(n, nblocks, seed, masked, planner, frac):
    _, grams, cost, tasks = random_case(n, nblocks, seed, masked)
    p = make_plan(grams, cost, tasks, method={"name": "m"}, planner=planner)
    target = int(p.min_bytes + frac * (p.max_bytes - p.min_bytes))
    pre, fill = p.at(nbytes=target, fit="prefix"), p.at(nbytes=target, fit="fill")
    assert pre.size_bytes <= target and fill.size_bytes <= target
    assert predicted_loss(p.grams, fill.groups) <= predicted_loss(p.grams, pre.groups)
    # the size is exact: what the cost model gives for the grouping
    assert fill.size_bytes == sum(cost.block_cost(i, [len(x) for x in fill.groups[f"b{i}"]]) for i in range(nblocks))
    # each block's merges are a prefix of that block's steps in the plan
    idx = p.fill_steps(target)
    for b in p.blocks:
        own = [k for k, s in enumerate(p.steps) if s.block == b]
        taken = [k for k in idx if p.steps[k].block == b]
        assert taken == own[:len(taken)]


def test_plan_json_keeps_planner_and_fit(tmp_path):
    _, grams, cost, tasks = random_case(4, 3, 1)
    p = make_plan(grams, cost, tasks, method={"name": "m"}, planner="distortion")
    p.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["planner"] == "distortion" and d["fit"] == "fill"
    q = Plan.load(tmp_path / "p.json")
    assert q.planner == "distortion" and q.fit == "fill" and q.steps == p.steps
    assert q.at(2.5) == p.at(2.5)
    del d["planner"], d["fit"]  # a plan file written before planners existed
    old = Plan.from_dict(d)
    assert old.planner == "similarity" and old.fit == "prefix"


# ---- through the engine, the config and the CLI --------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "consensus"])
@pytest.mark.parametrize("planner", ["distortion", "hybrid"])
def test_engine_bundles_have_the_planned_size_within_the_request(tmp_path, method, planner):
    from test_engine import make_set
    from flexmerge.engine import FlexMerge

    cfg = make_set(tmp_path, n=4) | {"planner": planner}
    fm = FlexMerge(cfg, method=method)
    plan = fm.plan()
    assert plan.planner == planner and plan.fit == "fill"
    for size in (plan.max_units - 0.3, (plan.max_units + plan.min_units) / 2, plan.min_units):
        g = plan.at(size)
        bundle = fm.merge(size)
        assert bundle.size_bytes == g.size_bytes <= size * plan.unit_bytes + 1e-6
        assert bundle.manifest["plan"]["planner"] == planner
    # the reused Grams give the paper's plan back
    (tmp_path / "s").mkdir()
    assert fm.plan(planner="similarity").steps == FlexMerge(make_set(tmp_path / "s", n=4) | {"planner": "similarity"},
                                                         method=method).plan().steps


def test_config_and_cli_planner(tmp_path, capsys):
    import yaml
    from test_engine import make_set
    from flexmerge.cli import main
    from flexmerge.config import make_config

    assert make_config({**make_set(tmp_path), "planner": "hybrid"}).planner == "hybrid"
    with pytest.raises(FlexMergeError, match="'planner': must be 'similarity', 'distortion', 'hybrid' or 'auto'"):
        make_config({**make_set(tmp_path), "planner": "best"})
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(make_set(tmp_path)))
    assert main(["plan", str(path), "-o", str(tmp_path / "p.json"), "--planner", "distortion", "--no-progress"]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["planner"] == "distortion"
    assert main(["merge", str(path), "--size", "2.2", "-o", str(tmp_path / "out"), "--planner", "hybrid",
                 "--no-progress"]) == 0
    assert "requested 2.2" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["plan"]["planner"] == "hybrid"
    assert main(["plan", str(path), "-o", str(tmp_path / "q.json"), "--planner", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "planner" in err and err.count("\n") == 1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 5), nblocks=st.integers(1, 5), seed=st.integers(0, 10**6), masked=st.booleans(),
       frac=st.floats(0, 1))
def test_auto_takes_the_candidate_of_lowest_predicted_loss(n, nblocks, seed, masked, frac):
    _, grams, cost, tasks = random_case(n, nblocks, seed, masked)
    p = make_plan(grams, cost, tasks, method={"name": "m"}, planner="auto")
    assert p.planner == "auto" and set(p.alternatives) == {"hybrid", "similarity"}
    target = int(p.min_bytes + frac * (p.max_bytes - p.min_bytes))
    g = p.at(nbytes=target)
    options = {}
    for name in ("distortion", "hybrid", "similarity"):
        q = make_plan(grams, cost, tasks, method={"name": "m"}, planner=name)
        options[name] = q.at(nbytes=target)
    losses = {k: predicted_loss(p.grams, v.groups) for k, v in options.items()}
    assert g.planner in options and g.groups == options[g.planner].groups
    assert g.size_bytes == options[g.planner].size_bytes <= target
    assert losses[g.planner] == min(losses.values())
    first = next(k for k in ("distortion", "hybrid", "similarity") if losses[k] == min(losses.values()))
    assert g.planner == first  # ties: the earlier candidate


def test_auto_plan_json_round_trip_and_schema(tmp_path):
    _, grams, cost, tasks = random_case(4, 3, 5)
    p = make_plan(grams, cost, tasks, method={"name": "m"}, planner="auto")
    p.save(tmp_path / "p.json")
    q = Plan.load(tmp_path / "p.json")
    assert q.planner == "auto" and q.alternatives == p.alternatives
    for size in (1.2, 2.0, 3.3):
        assert q.at(size) == p.at(size)
    d = json.loads((tmp_path / "p.json").read_text())
    d["alternatives"]["hybrid"]["fit"] = "best"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(FlexMergeError, match="damaged: 'alternatives.hybrid.fit'"):
        Plan.load(tmp_path / "bad.json")


def test_sweep_uses_the_planner_and_its_fill(tmp_path):
    """A sweep with planner distortion evaluates Plan.at's (fill) groupings: rows report the
    requested and the actual size, never above the request; a plain evaluator sees the merge."""
    import torch
    from test_engine import make_set
    from flexmerge.engine import FlexMerge
    from flexmerge.evaluate import sweep

    cfg = make_set(tmp_path, n=4) | {"planner": "distortion"}
    seen = []

    def evaluate(task, sd):
        seen.append(task)
        return float(1 / (1 + sum(v.double().abs().sum() for v in sd.values()) / 1e4))

    sizes = [3.5, 2.5, 1.7]
    res = sweep(cfg, ["task_arithmetic"], sizes, evaluate, finetuned={t: 1.0 for t in cfg["tasks"]})
    plan = FlexMerge(cfg, method="task_arithmetic").plan()
    rows = res.select(run="main")
    assert [r["requested_size"] for r in rows] == sizes
    for r in rows:
        g = plan.at(r["requested_size"])
        assert r["size_bytes"] == g.size_bytes <= r["requested_size"] * plan.unit_bytes
        assert r["steps"] == g.steps
    assert seen  # merged models were evaluated


def test_cli_curve_planner_flag(tmp_path, capsys):
    import yaml
    from test_engine import make_set
    from flexmerge import cli
    from flexmerge.curve_cli import curve
    from flexmerge.evaluate import SweepResult

    if not any(c.callback is curve or c.name == "curve" for c in cli.app.registered_commands):
        cli.app.command()(curve)
    cfg = make_set(tmp_path, n=3)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "ev.py").write_text("def evaluate(task, sd):\n    return 1.0\n")
    code = cli.main(["curve", str(tmp_path / "merge.yaml"), "--sizes", "1.5,2.5", "--evaluator",
                     f"{tmp_path / 'ev.py'}:evaluate", "-o", str(tmp_path / "c"), "--no-progress", "--no-plots",
                     "--planner", "hybrid"])
    assert code == 0, capsys.readouterr().err
    res = SweepResult.load(tmp_path / "c")
    assert res.complete and [r["requested_size"] for r in res.select(run="main")] == [1.5, 2.5]
    code = cli.main(["curve", str(tmp_path / "merge.yaml"), "--evaluator", f"{tmp_path / 'ev.py'}:evaluate",
                     "-o", str(tmp_path / "d"), "--planner", "bogus"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "planner" in err


@pytest.mark.parametrize("seed", range(6))
def test_predicted_loss_matches_brute_force(seed):
    taus, grams, cost, tasks = random_case(5, 3, seed)
    p = make_plan(grams, cost, tasks, method={"name": "m"}, planner="hybrid")
    total = {i: sum((x[i] ** 2).sum() for x in taus.values()) for i in range(5)}
    for k in (0, 3, 7, len(p.steps)):
        g = p.grouping(k)
        want = 0.0
        for b, groups in g.groups.items():
            for members in groups:
                m = taus[b][list(members)].mean(axis=0)
                want += sum(((taus[b][i] - m) ** 2).sum() / total[i] for i in members)
        assert predicted_loss(p.grams, g.groups) == pytest.approx(want / 5, rel=1e-9, abs=1e-12)
