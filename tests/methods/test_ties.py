"""TIES-Merging: hand-computed merges, the exact global top-k threshold, validation."""

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.ties import (
    Ties, disjoint_mean, elect_sign, global_topk_thresholds, resolve_zero_signs, ties_merge,
)
from flexmerge.methods.base import GroupInput
from helpers import group


def stream_of(tensors):
    return lambda: iter(list(tensors.items()))


def test_hand_example_elect_and_disjoint_mean():
    v = torch.tensor([[1., -2., 3., 0.],
                      [2., 1., -1., 0.],
                      [-4., 1., -1., 0.]])
    w = torch.tensor([[[1., 2.], [3., -1.]],
                      [[1., 1.], [1., 1.]],
                      [[-1., 2.], [1., 1.]]])
    out = Ties(k=1.0, **{"lambda": 2.0}).merge(group(v=v, w=w)).merged
    # v: sums [-1, 0, 1, 0]; entry 1 has zero mass -> majority sign of the block (+1, w is all +)
    #    entry 0: only -4 agrees; entry 1: the two +1s; entry 2: only 3; entry 3: nothing -> 0
    assert torch.equal(out["v"], 2 * torch.tensor([-4., 1., 3., 0.]))
    # w: all sums positive; means over the positive entries only
    assert torch.allclose(out["w"], 2 * torch.tensor([[1., 5 / 3], [5 / 3, 1.]]), atol=1e-6)


def test_zero_mass_takes_majority_sign_and_helpers():
    signs = resolve_zero_signs({"a": torch.tensor([-1., -1., 0.]), "b": torch.tensor([1.])})
    assert torch.equal(signs["a"], torch.tensor([-1., -1., -1.]))
    taus = torch.tensor([[2., -3.], [-2., 1.]])
    assert torch.equal(elect_sign(taus), torch.tensor([0., -1.]))
    assert torch.equal(disjoint_mean(taus, torch.tensor([-1., -1.])), torch.tensor([-2., -3.]))


def test_trim_then_merge_hand_example():
    # D = 4 per task, k = 0.5 -> each task keeps its 2 largest magnitudes over BOTH tensors
    tvs = {"a": torch.tensor([[4., -1.], [-2., 1.]]), "b": torch.tensor([[0.5, 3.], [5., -0.1]])}
    m = Ties(k=0.5)
    m.global_pass(stream_of(tvs), 2)
    assert torch.equal(m.thresholds, torch.tensor([3., 2.]))
    trimmed = {n: m.transform(n, t) for n, t in tvs.items()}
    assert torch.equal(trimmed["a"], torch.tensor([[4., 0.], [-2., 0.]]))
    assert torch.equal(trimmed["b"], torch.tensor([[0., 3.], [5., 0.]]))
    out = m.merge(group(**trimmed)).merged
    # a: mass [2, 0] -> +, (majority +); b: [5, 3] -> +; trimmed zeros never count
    assert torch.equal(out["a"], torch.tensor([4., 0.]))
    assert torch.equal(out["b"], torch.tensor([5., 3.]))


@pytest.mark.parametrize("g", [2, 3, 5])
def test_k1_without_sign_conflict_equals_average(g):
    gen = torch.Generator().manual_seed(g)
    sign2 = torch.where(torch.rand(6, 5, generator=gen) > 0.5, 1., -1.)
    sign1 = torch.where(torch.rand(7, generator=gen) > 0.5, 1., -1.)
    w = sign2 * (torch.rand(g, 6, 5, generator=gen) + 0.1)
    b = sign1 * (torch.rand(g, 7, generator=gen) + 0.1)
    out = Ties(k=1.0).merge(group(w=w, b=b)).merged
    assert torch.allclose(out["w"], w.mean(0), atol=1e-6)
    assert torch.allclose(out["b"], b.mean(0), atol=1e-6)


def test_identical_task_vectors_are_returned():
    x = torch.tensor([[0., -1.5, 2.], [3., 0., -0.25]])
    out = ties_merge({"x": torch.stack([x, x, x])})
    assert torch.equal(out["x"], x)


def _messy_tensors(n):
    gen = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(n, 30, 20, generator=gen),
        "b": torch.randn(n, 17, generator=gen) * 1e-3,
        # many values inside one high-16-bit bin, with duplicates: exercises the second pass
        "same_bin": 1.0 + torch.randint(0, 50, (n, 400), generator=gen).float() * 2.0 ** -20,
        "neg": -torch.rand(n, 9, generator=gen) * 100,
        "zeros": torch.zeros(n, 40),
    }


@pytest.mark.parametrize("k", [1e-6, 0.01, 0.2, 0.5, 0.73, 0.999])
def test_global_threshold_is_exact_kth_largest_of_concatenation(k):
    n = 3
    tvs = _messy_tensors(n)
    thr = global_topk_thresholds(stream_of(tvs), n, k)
    cat = torch.cat([t.reshape(n, -1) for t in tvs.values()], dim=1).abs()
    d = cat.shape[1]
    m = max(1, int(k * d + 1e-9))
    assert torch.equal(thr, cat.kthvalue(d - m + 1, dim=1).values)
    # the trim keeps at least m entries, and every entry strictly above the threshold
    kept = (cat >= thr[:, None]).sum(1)
    assert bool((kept >= m).all()) and bool(((cat > thr[:, None]).sum(1) < m).all())


def test_global_pass_streams_twice_and_never_for_k1():
    tvs = _messy_tensors(2)
    calls = []

    def stream():
        calls.append(1)
        return iter(list(tvs.items()))

    m = Ties(k=0.3)
    m.global_pass(stream, 2)
    assert len(calls) == 2
    Ties(k=1.0).global_pass(stream, 2)
    assert len(calls) == 2
    x = torch.randn(2, 4)
    assert Ties(k=1.0).transform("x", x) is x


def test_transform_before_global_pass_is_an_error():
    with pytest.raises(FlexMergeError, match="global_pass"):
        Ties(k=0.2).transform("w", torch.ones(2, 3))


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 1.5}, {"k": -0.1}, {"lambda": 0}, {"density": 0.2}])
def test_bad_parameters_raise(params):
    with pytest.raises(FlexMergeError):
        make_method({"name": "ties", **params})


def test_defaults():
    assert make_method("ties").describe() == {"name": "ties", "k": 0.2, "lambda": 1.0}


@pytest.mark.parametrize("balance", [-1, 0, 1])
def test_chunked_merge_takes_the_blocks_zero_sum_sign_at_a_balance_of_one(balance):
    """Fed in chunks, a zero-sum entry takes -1 exactly when the block's sign balance (counted
    over every chunk) is negative; hand case with balance -1, 0 and +1 split over two tensors."""
    # entry 0 of "a" sums to zero (+2, -2); the other entries set the balance
    rest = {-1: [[-1.0], [-1.0]], 0: [[0.0], [0.0]], 1: [[1.0], [1.0]]}[balance]
    taus = {"a": torch.tensor([[2.0, 0.0], [-2.0, 0.0]]), "b": torch.tensor(rest)}
    whole = ties_merge(taus)
    m = make_method({"name": "ties", "k": 1.0})
    chunks = m.chunked_merge(GroupInput({}, {}, [0, 1]), {"a": (2,), "b": (1,)})
    chunks.add("a", taus["a"][:, :1], torch.zeros(1))
    chunks.add("a", taus["a"][:, 1:], torch.zeros(1))
    chunks.add("b", taus["b"], torch.zeros(1))
    got = chunks.result().merged
    expect_a0 = -2.0 if balance < 0 else 2.0  # the mean of the members that agree with the sign
    assert float(whole["a"][0]) == expect_a0 and float(got["a"][0]) == expect_a0
    assert all(torch.equal(got[n], whole[n]) for n in taus)
