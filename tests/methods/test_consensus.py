"""Consensus / TALL masks (Wang et al. 2024) over an inner merge: mask formula, forwarding of the
inner method's global pass and transform, validation."""

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from helpers import group


TA1 = {"name": "task_arithmetic", "lambda": 1.0}


def test_hand_example_with_task_arithmetic_inner():
    t1, t2 = [1.0, 0.0, -2.0, 4.0], [3.0, 1.0, 2.0, 0.0]
    stored = make_method({"name": "consensus", "inner": TA1, "lambda_c": 0.5}).merge(group(w=[t1, t2]))
    # tau_merged = mean = [2, .5, 0, 2]; 0.5 * |tau_merged - tau_t| = [.5, .25, 1, 1] for both tasks
    assert torch.equal(stored.merged["w"], torch.tensor([2.0, 0.5, 0.0, 2.0]))
    assert stored.masks["w"].tolist() == [[True, False, True, True], [True, True, True, False]]
    assert stored.scalars is None
    assert torch.equal(stored.rebuild_delta(1, "w"), torch.tensor([2.0, 0.5, 0.0, 0.0]))
    assert stored.extra["mask_density"] == 6 / 8


def test_masks_match_formula_on_random_data_and_inner_scaling_is_kept():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 4, generator=gen)
    inner = {"name": "task_arithmetic", "lambda": 1.5}
    stored = make_method({"name": "consensus", "inner": inner}).merge(group(w=list(w), b=list(b)))
    for name, taus in {"w": w, "b": b}.items():
        merged = 1.5 * taus.mean(0)
        torch.testing.assert_close(stored.merged[name], merged)
        expected = torch.stack([t.abs() >= 0.3 * (merged - t).abs() for t in taus])  # default 0.3
        assert torch.equal(stored.masks[name], expected)


def test_lambda_zero_keeps_every_element_and_reduces_to_inner():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 6, generator=gen)
    stored = make_method({"name": "consensus", "inner": TA1, "lambda_c": 0}).merge(group(w=list(w)))
    assert stored.masks["w"].all()
    torch.testing.assert_close(stored.rebuild_delta(0, "w"), w.mean(0))


def test_identical_task_vectors_rebuild_exactly():
    tau = torch.tensor([0.5, -1.0, 0.0, 2.0])
    stored = make_method({"name": "consensus", "inner": TA1}).merge(group(w=[tau, tau, tau]))
    for i in range(3):
        assert torch.equal(stored.rebuild_delta(i, "w"), tau)


def test_zero_task_vectors_give_no_nan():
    stored = make_method({"name": "consensus", "inner": TA1}).merge(group(w=[torch.zeros(3)] * 2))
    assert torch.equal(stored.merged["w"], torch.zeros(3))
    assert stored.masks["w"].all()  # 0 >= 0.3 * 0
    assert torch.isfinite(stored.rebuild_delta(0, "w")).all()


def test_inner_without_global_pass_is_forwarded_as_such():
    c = make_method({"name": "consensus", "inner": "task_arithmetic"})
    assert not c.has_global_pass and not c.has_transform and not c.randomized
    assert c.stores_masks and c.needs_base and not c.stores_scalars
    x = torch.randn(2, 3)
    assert c.transform("w", x) is x


def test_describe_round_trips_with_inner_parameters():
    c = make_method({"name": "consensus", "inner": {"name": "task_arithmetic", "lambda": 2.0}, "lambda_c": 0.4})
    d = c.describe()
    assert d == {"name": "consensus", "lambda_c": 0.4, "inner": {"name": "task_arithmetic", "lambda": 2.0}}
    again = make_method(d)
    assert again.describe() == d and again.inner.params.lam == 2.0


def test_ties_inner_forwards_global_trim_and_matches_ties():
    gen = torch.Generator().manual_seed(2)
    data = {"w": torch.randn(3, 4, 5, generator=gen), "b": torch.randn(3, 5, generator=gen)}

    def stream():
        yield from data.items()

    c = make_method("consensus")  # default inner: ties
    ties = make_method("ties")
    assert c.params.inner == "ties" and c.params.lambda_c == 0.3
    assert c.has_global_pass and c.has_transform
    c.global_pass(stream, 3)
    ties.global_pass(stream, 3)
    seen = {n: c.transform(n, t) for n, t in data.items()}
    for n, t in data.items():
        assert torch.equal(seen[n], ties.transform(n, t))
    assert (seen["w"] == 0).any()  # the trim happened
    stored = c.merge(group(**seen))
    inner = ties.merge(group(**seen))
    for n, taus in seen.items():
        assert torch.equal(stored.merged[n], inner.merged[n])
        expected = taus.abs() >= 0.3 * (inner.merged[n] - taus).abs()
        assert torch.equal(stored.masks[n], expected)


@pytest.mark.parametrize("spec", [
    {"lambda_c": -0.1},
    {"lam": 0.3},
    {"inner": "no_such_method", "lambda_c": 0.3},
    {"inner": "emr"},
    {"inner": "consensus"},
    {"inner": {"name": "consensus"}},
    {"inner": {"name": "task_arithmetic", "lambda": -1}},
])
def test_bad_parameters_raise(spec):
    with pytest.raises(FlexMergeError):
        make_method({"name": "consensus", **spec})


@pytest.mark.parametrize("inner", ["ties", "dare", "magmax", "task_arithmetic"])
def test_declared_properties_follow_the_inner_method(inner):
    c, i = make_method({"name": "consensus", "inner": inner}), make_method(inner)
    assert (c.randomized, c.elementwise_transform, c.order_invariant) == \
        (i.randomized, i.elementwise_transform, i.order_invariant)
    assert (c.has_global_pass, c.has_transform) == (i.has_global_pass, i.has_transform)
