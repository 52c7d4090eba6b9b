"""Channel Merging baseline: k-means with cosine distance per tensor, merged by task arithmetic."""

import numpy as np
import pytest
import torch

import flexmerge.engine as engine
from flexmerge.baselines import ChannelMerging, integer_size, kmeans_cosine_gram
from flexmerge.bundle import Bundle
from flexmerge.engine import FlexMerge
from flexmerge.errors import FlexMergeError

from conftest import bert_like, write_checkpoint


def gram(x):
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def test_kmeans_two_clear_clusters_by_hand():
    # directions: tasks 0, 1 along x (cos 0.9988), tasks 2, 3 along y; |v| differ on purpose
    x = [[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]]
    for seed in range(10):
        assert kmeans_cosine_gram(gram(x), 2, seed=seed, key="w").tolist() == [0, 0, 1, 1]
    # interleaved: labels are numbered by the smallest member
    y = [[0.0, 1.0], [1.0, 0.0], [0.1, 3.0], [2.0, 0.1]]
    assert kmeans_cosine_gram(gram(y), 2, seed=0).tolist() == [0, 1, 0, 1]
    # cosine, not Euclidean: a long and a short vector in one direction belong together
    z = [[100.0, 1.0], [0.01, 0.0], [0.0, 0.01], [1.0, 100.0]]
    assert kmeans_cosine_gram(gram(z), 2, seed=1).tolist() == [0, 0, 1, 1]


def test_kmeans_edge_cases_give_exactly_k_clusters():
    x = np.random.default_rng(0).normal(size=(5, 7))
    assert kmeans_cosine_gram(gram(x), 5).tolist() == [0, 1, 2, 3, 4]
    assert kmeans_cosine_gram(gram(x), 1).tolist() == [0, 0, 0, 0, 0]
    dup = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # three identical vectors, k = 3
    for seed in range(5):
        lab = kmeans_cosine_gram(gram(dup), 3, seed=seed)
        assert len(set(lab.tolist())) == 3 and lab[3] not in lab[:3]
    zeros = np.zeros((4, 3))  # a frozen tensor: no NaN, still exactly k groups
    for k in (1, 2, 3, 4):
        assert len(set(kmeans_cosine_gram(gram(zeros), k, seed=2).tolist())) == k
    with pytest.raises(FlexMergeError, match="integer number of clusters in 1..4"):
        kmeans_cosine_gram(gram(zeros), 5)


def test_kmeans_result_is_a_lloyd_fixed_point():
    # written from the definition with explicit vectors: every point is closest (cosine) to the
    # normalised mean of its own cluster
    rng = np.random.default_rng(3)
    checked = 0
    for trial in range(20):
        x = torch.tensor(rng.normal(size=(10, 6)))
        k = int(rng.integers(2, 4))
        lab = torch.tensor(kmeans_cosine_gram(gram(x.numpy()), k, seed=trial, key="t"))
        assert sorted(set(lab.tolist())) == list(range(k))
        centres = torch.stack([torch.nn.functional.normalize(x[lab == j].mean(0), dim=0) for j in range(k)])
        cos = torch.nn.functional.normalize(x, dim=1) @ centres.T
        own = cos[torch.arange(10), lab]
        if all(int((lab == j).sum()) >= 2 for j in range(k)):  # no empty-cluster repair possible
            assert bool((own >= cos.max(dim=1).values - 1e-9).all()), trial
            checked += 1
    assert checked >= 10


def test_kmeans_is_deterministic_per_seed_and_key():
    x = np.random.default_rng(1).normal(size=(6, 4))
    a = kmeans_cosine_gram(gram(x), 3, seed=5, key="layer.0")
    assert np.array_equal(a, kmeans_cosine_gram(gram(x), 3, seed=5, key="layer.0"))


@pytest.fixture
def clustered(tmp_path):
    """Four tasks; in every tensor tasks 0 and 2 move along one direction, 1 and 3 along an
    orthogonal one (plus tiny noise)."""
    base = bert_like(0)
    g = torch.Generator().manual_seed(7)
    tasks = {f"t{i}": {} for i in range(4)}
    for name, w in base.items():
        if name.startswith("classifier"):
            for i in range(4):
                tasks[f"t{i}"][name] = torch.randn(w.shape, generator=g)
            continue
        a = torch.randn(w.shape, generator=g)
        b = torch.randn(w.shape, generator=g)
        b = b - (b * a).sum() / (a * a).sum() * a
        for i in range(4):
            direction = a if i % 2 == 0 else b
            tasks[f"t{i}"][name] = w + 0.1 * direction + 1e-4 * torch.randn(w.shape, generator=g)
    cfg = {"base": str(write_checkpoint(base, tmp_path / "base", "safetensors")),
           "tasks": {t: str(write_checkpoint(sd, tmp_path / t, "safetensors")) for t, sd in tasks.items()},
           "exclude": [r"classifier\..*"]}
    return cfg, base, tasks


def test_two_clusters_merge_by_task_arithmetic(clustered, monkeypatch):
    cfg, base, tasks = clustered
    passes = []
    real = engine.block_grams
    monkeypatch.setattr(engine, "block_grams", lambda *a, **k: passes.append(1) or real(*a, **k))
    cm = ChannelMerging(cfg, lam=1.25)
    g2 = cm.grouping(2)
    names = [n for n in base if not n.startswith("classifier")]
    assert sorted(g2.groups) == sorted(names)  # one block per tensor
    assert all(groups == [(0, 2), (1, 3)] for groups in g2.groups.values())
    bundle = cm.merge(2)
    unit = cm.fm.cost.unit_bytes
    assert bundle.size_bytes == g2.size_bytes == 2 * unit and bundle.size_units == 2.0
    for t, mate in (("t0", "t2"), ("t1", "t3"), ("t2", "t0")):
        sd = bundle.state_dict(t)
        for n in names:
            want = base[n] + 1.25 * ((tasks[t][n] - base[n]) + (tasks[mate][n] - base[n])) / 2
            assert torch.allclose(sd[n], want, atol=1e-6), n
        assert torch.equal(sd["classifier.weight"], tasks[t]["classifier.weight"])
    for k in (1, 3, 4):
        cm.grouping(k)
    assert len(passes) == 1  # the Gram matrices of one streaming pass serve every k


def test_sizes_are_exact_integers_only(clustered, tmp_path):
    cfg, base, tasks = clustered
    cm = ChannelMerging(cfg, lam=1.0)
    unit = cm.fm.cost.unit_bytes
    g3 = cm.grouping(3)
    assert g3.size_bytes == 3 * unit and g3.size_units == 3.0
    for groups in g3.groups.values():
        assert len(groups) == 3
        pair = [grp for grp in groups if len(grp) == 2][0]
        assert pair in ((0, 2), (1, 3))  # the one merge stays within a cluster
    full = cm.merge(4)
    assert full.size_units == 4.0
    for t in tasks:
        sd = full.state_dict(t)
        assert all(torch.equal(sd[n], tasks[t][n]) for n in tasks[t])
    one = cm.merge(1).state_dict("t1")
    ta = FlexMerge(cfg, method={"name": "task_arithmetic", "lambda": 1.0}).merge(1.0).state_dict("t1")
    assert all(torch.allclose(one[n], ta[n], atol=1e-6) for n in ta)
    written = Bundle.load(cm.merge(2, out=tmp_path / "cm2").root)
    assert written.size_bytes == 2 * unit
    for bad, msg in ((2.5, "integer sizes only"), ("1.5", "integer sizes only"), (0, "outside 1..4"),
                     (5, "outside 1..4"), ("40MB", "not bytes")):
        with pytest.raises(FlexMergeError, match=msg):
            cm.grouping(bad)
    assert integer_size("3", 4) == 3 and integer_size(2.0, 4) == 2


def test_seed_comes_from_config_and_is_reported(clustered):
    cfg, _, _ = clustered
    cm = ChannelMerging(dict(cfg, seed=4))
    assert cm.seed == 4
    assert cm.describe() == {"name": "channel_merging", "lambda": 1.5, "seed": 4,
                             "clustering": "kmeans-cosine per tensor", "max_iters": 100}
    other = ChannelMerging(dict(cfg, seed=4))
    assert all(np.array_equal(cm.labels(3)[n], other.labels(3)[n]) for n in cm.labels(3))
