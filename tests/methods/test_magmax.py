"""MagMax: maximum-magnitude selection."""

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from flexmerge.methods.magmax import MagMax
from helpers import group


def test_hand_example():
    v = torch.tensor([[1., -5., 2.], [-3., 4., 0.5], [2., 1., -2.]])
    out = MagMax(**{"lambda": 2.0}).merge(group(v=v)).merged["v"]
    # |.| maxima: -3 (task 1), -5 (task 0), and a tie 2 / -2 -> the later task (2), as merge_max_abs
    assert torch.equal(out, torch.tensor([-6., -10., -4.]))


@pytest.mark.parametrize("g", [2, 3, 6])
def test_matches_sequential_max_abs_on_1d_and_2d(g):
    gen = torch.Generator().manual_seed(g)
    tv = {"w": torch.randn(g, 7, 5, generator=gen), "b": torch.randn(g, 9, generator=gen),
          "s": torch.randn(g, generator=gen)}
    out = MagMax().merge(group(**tv)).merged
    for n, t in tv.items():
        ref = t[0]
        for i in range(1, g):  # the authors' loop: keep the current one when |new| >= |kept|
            ref = torch.where(t[i].abs() >= ref.abs(), t[i], ref)
        assert out[n].shape == t.shape[1:]
        assert torch.equal(out[n], ref)


def test_identical_vectors_are_returned():
    x = torch.tensor([[0.5, -2.], [0., 3.]])
    assert torch.equal(MagMax().merge(group(x=torch.stack([x, x]))).merged["x"], x)


@pytest.mark.parametrize("params", [{"lambda": 0}, {"lambda": -1}, {"k": 0.2}])
def test_bad_parameters_raise(params):
    with pytest.raises(FlexMergeError):
        make_method({"name": "magmax", **params})


def test_defaults():
    assert make_method("magmax").describe() == {"name": "magmax", "lambda": 1.0}
