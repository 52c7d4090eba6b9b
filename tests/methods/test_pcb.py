"""PCB-Merging: a hand example, the released algorithm re-derived in plain torch, validation."""

import math

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.pcb import Pcb, pcb_merge, pcb_weights
from helpers import group


def reference_pcb(x: torch.Tensor, r: float) -> torch.Tensor:
    """PCB as in the authors' PCB_merge, in float64: sort-based clamps, min-max, exp/tanh."""
    x = x.double()
    n, d = x.shape

    def norm(y):
        lo, hi = y.min(1, keepdim=True).values, y.max(1, keepdim=True).values
        return (y - lo) / (hi - lo)

    def clamp(y, min_ratio, max_ratio):
        s = torch.sort(y, dim=1).values
        lo = s[:, int(d * min_ratio)].unsqueeze(1)
        hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(y, lo, hi)

    a = clamp(x.abs(), 0.0001, 0.0001)
    c = torch.sign(x) * a
    score = torch.exp(n * norm(a) ** 2) * torch.tanh(x * x.sum(0))
    scale = norm(clamp(score, 1 - r, 0))
    return (c * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)


def test_hand_example():
    # D = 3: |tau| clamped to [smallest, 2nd largest]; t0 -> c0 = [1, -2, 2], t1 -> c1 = [2, 1, -2]
    # intra: exp(2 * minmax(|c|)^2) = [1, e^2, e^2] and [e^2, 1, e^2]; sum tau = [4, -1, 1]
    # scores t0 = [tanh 4, e^2 tanh 2, e^2 tanh 3] ~ [1.0, 7.12, 7.35] -> r = 0.5 keeps entry 2 only
    #        t1 = [e^2 tanh 12, tanh -1, e^2 tanh -2] ~ [7.39, -0.76, -7.12] -> keeps entry 0 only
    v = torch.tensor([[1., -2., 3.], [3., 1., -2.]])
    out = Pcb(r=0.5, **{"lambda": 1.5}).merge(group(v=v)).merged["v"]
    assert torch.allclose(out, torch.tensor([1.5 * 2., 0., 1.5 * 2.]), atol=1e-6)
    e2 = math.exp(2)
    assert math.tanh(4) < e2 * math.tanh(2) < e2 * math.tanh(3)  # the order used above


@pytest.mark.parametrize("g,r", [(2, 0.1), (3, 0.1), (5, 0.3), (4, 1.0)])
def test_matches_released_algorithm_on_the_flattened_block(g, r):
    gen = torch.Generator().manual_seed(g)
    w = torch.randn(g, 48, 40, generator=gen) * 0.01
    b = torch.randn(g, 64, generator=gen) * 0.02
    out = Pcb(r=r).merge(group(w=w, b=b)).merged
    ref = reference_pcb(torch.cat([w.reshape(g, -1), b], 1), r).float()
    assert out["w"].shape == (48, 40) and out["b"].shape == (64,)
    assert torch.allclose(torch.cat([out["w"].reshape(-1), out["b"]]), ref, rtol=1e-6, atol=1e-7)


def test_each_task_keeps_ratio_r_and_large_groups_stay_finite():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 1000, generator=gen)  # exp(120 * 1) overflows float32 in the naive form
    m = pcb_merge(x, 0.1)
    assert torch.isfinite(m).all()
    _, scale = pcb_weights(x, 0.1)
    # distinct scores: weight > 0 exactly above the cut sorted[floor(0.9 * 1000)] -> 99 per task
    assert torch.equal((scale > 0).sum(1), torch.full((120,), 99))
    ref = reference_pcb(x[:3], 0.1).float()
    assert torch.allclose(pcb_merge(x[:3], 0.1), ref, rtol=1e-6, atol=1e-7)


def test_degenerate_block_gives_zero_not_nan():
    out = Pcb().merge(group(z=torch.zeros(3, 5))).merged["z"]
    assert torch.equal(out, torch.zeros(5))


@pytest.mark.parametrize("params", [{"r": 0}, {"r": 1.5}, {"lambda": -1}, {"k": 0.1}])
def test_bad_parameters_raise(params):
    with pytest.raises(FlexMergeError):
        make_method({"name": "pcb", **params})


def test_defaults():
    assert make_method("pcb").describe() == {"name": "pcb", "r": 0.1, "lambda": 1.0}


@pytest.mark.parametrize("r", [0.1, 0.5, 1.0])
def test_chunked_merge_equals_the_whole_matrix_formulation(r):
    # pcb_merge runs column chunks with known row minima/maxima; pcb_weights is the direct form
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 257, generator=g) * 0.01
    x[:, :60] = 0  # frozen entries: ties at the order statistics
    clipped, scale = pcb_weights(x, r)
    direct = (clipped * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)
    assert torch.equal(pcb_merge(x, r), direct)  # one chunk: the same operations, bit for bit
    chunked = pcb_merge(x, r, chunk=16)  # chunk edges move elements between SIMD body and tail
    assert torch.allclose(chunked, direct, rtol=0, atol=1e-6 * float(x.abs().max()))
