"""DARE: drop-and-rescale semantics, seeding, inner methods, validation."""

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.dare import Dare
from flexmerge.methods.ties import Ties, global_topk_thresholds
from helpers import group


def taus(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, 40, 25, generator=gen) + 0.01,
            "b": torch.randn(n, 30, generator=gen) + 0.01}


def test_every_entry_is_dropped_or_rescaled_exactly():
    p = 0.75
    x = taus()["w"]
    y = Dare(seed=1, p=p).transform("w", x)
    dropped = y == 0
    assert torch.equal(y[~dropped], x[~dropped] * 4.0)  # 1 / (1 - 0.75) = 4, exact in float32
    frac = dropped.float().mean().item()
    assert 0.70 < frac < 0.80  # 3000 Bernoulli(0.75) draws


def test_drop_matches_the_paper_equation_with_the_keyed_generator():
    from flexmerge.methods.base import seeded_generator
    p, seed = 0.5, 11
    x = taus()["b"]
    expect = torch.stack([
        x[t] * (torch.rand(x.shape[1:], generator=seeded_generator(seed, "dare", t, "b")) >= p) / (1 - p)
        for t in range(x.shape[0])])
    assert torch.equal(Dare(seed=seed, p=p).transform("b", x), expect)


def test_reproducible_with_same_seed_and_different_with_another():
    x = taus()["w"]
    a = Dare(seed=5, p=0.9).transform("w", x)
    assert torch.equal(a, Dare(seed=5, p=0.9).transform("w", x))
    assert not torch.equal(a, Dare(seed=6, p=0.9).transform("w", x))
    # keyed by tensor name and task row: another name, another mask; rows differ from each other
    assert not torch.equal(a, Dare(seed=5, p=0.9).transform("other", x))
    masks = a != 0
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("inner", ["task_arithmetic", "ties"])
def test_p0_equals_inner_method(inner):
    tvs = taus(4)
    dare = make_method({"name": "dare", "p": 0.0, "inner": inner})
    ref = make_method(inner)
    seen = {n: dare.transform(n, t) for n, t in tvs.items()}
    assert all(torch.equal(seen[n], tvs[n]) for n in tvs)
    got = dare.merge(group(**seen)).merged
    want = ref.merge(group(**tvs)).merged
    for n in tvs:
        assert torch.equal(got[n], want[n])


def test_task_arithmetic_inner_is_lambda_mean_of_dropped():
    tvs = taus(3)
    dare = Dare(seed=2, p=0.6, **{"lambda": 0.7})
    dropped = {n: dare.transform(n, t) for n, t in tvs.items()}
    out = dare.merge(group(**dropped)).merged
    for n in tvs:
        assert torch.allclose(out[n], 0.7 * dropped[n].mean(0), atol=1e-6)


def test_ties_inner_elects_without_trim_by_default():
    # p = 0 isolates the inner: sign election + disjoint mean, no top-k trim
    v = torch.tensor([[1., -2., 3.], [2., 1., -1.], [-4., 1., -1.]])
    out = Dare(p=0.0, inner="ties").merge(group(v=v)).merged["v"]
    assert torch.equal(out, torch.tensor([-4., 1., 3.]))


def test_ties_inner_with_k_trims_the_dropped_vectors_globally():
    tvs = taus(3)
    dare = Dare(seed=3, p=0.5, inner="ties", k=0.2)
    dare.global_pass(lambda: iter(list(tvs.items())), 3)
    plain = Dare(seed=3, p=0.5)  # same seed, task_arithmetic: the drop alone
    dropped = {n: plain.transform(n, t) for n, t in tvs.items()}
    want_thr = global_topk_thresholds(lambda: iter(list(dropped.items())), 3, 0.2)
    assert torch.equal(dare.inner.thresholds, want_thr)
    for n, t in tvs.items():
        d = dropped[n]
        assert torch.equal(dare.transform(n, t), d * (d.abs() >= want_thr.view(3, *[1] * (d.dim() - 1))))


def test_default_lambda_follows_inner():
    assert make_method("dare").describe()["lambda"] == 1.5
    assert make_method({"name": "dare", "inner": "ties"}).describe()["lambda"] == 1.0
    assert make_method("dare").describe()["p"] == 0.9
    assert Dare.randomized


def test_describe_round_trips():
    m = make_method({"name": "dare", "p": 0.3, "inner": "ties", "k": 0.5, "lambda": 2.0}, seed=4)
    again = make_method(m.describe(), seed=4)
    assert again.describe() == m.describe()
    assert isinstance(again.inner, Ties) and again.inner.params.k == 0.5


@pytest.mark.parametrize("params", [
    {"p": 1}, {"p": 1.5}, {"p": -0.1}, {"inner": "emr"}, {"lambda": 0},
    {"drop": 0.9}, {"k": 0.2}, {"inner": "ties", "k": 0}, {"inner": "ties", "k": 1.5},
])
def test_bad_parameters_raise(params):
    with pytest.raises(FlexMergeError):
        make_method({"name": "dare", **params})
