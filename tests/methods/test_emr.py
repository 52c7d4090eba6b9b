"""EMR-Merging (Huang et al. 2024): hand example, exact rebuilds when tasks agree, zero handling."""

import pytest
import torch

from flexmerge.errors import FlexMergeError
from flexmerge.methods import make_method
from helpers import group


def _rebuilds(stored, names, g):
    return [{n: stored.rebuild_delta(i, n) for n in names} for i in range(g)]


def test_hand_example_elect_mask_rescale():
    w = [[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, -1.0, -1.0], [-1.0, -3.0, -2.0, 0.0]]
    b = [[0.5], [-0.5], [0.0]]  # sum 0 -> elected sign -1 (authors' code)
    stored = make_method("emr").merge(group(w=w, b=b))
    # sum w = [2, -4, -3, 2] -> signs [+, -, -, +]; max agreeing magnitudes [2, 3, 2, 3]
    assert torch.equal(stored.merged["w"], torch.tensor([2.0, -3.0, -2.0, 3.0]))
    assert torch.equal(stored.merged["b"], torch.tensor([-0.5]))
    assert stored.masks["w"].tolist() == [[True, True, False, True], [True, False, True, False],
                                          [False, True, True, False]]
    assert stored.masks["b"].tolist() == [[False], [True], [False]]
    # gamma_t = sum|tau_t| / sum|m_t * tau_uni| over the whole block (both tensors)
    expected = torch.tensor([6.5 / 8.0, 5.5 / 4.5, 6.0 / 5.0])
    torch.testing.assert_close(stored.scalars, expected, atol=1e-7, rtol=0)
    assert stored.scalars.dtype == torch.float32 and stored.masks["w"].dtype == torch.bool
    # task 2 rebuilds gamma_2 * m_2 * tau_uni
    torch.testing.assert_close(stored.rebuild_delta(1, "w"), expected[1] * torch.tensor([2.0, 0.0, -2.0, 0.0]))
    assert stored.extra["mask_density"] == 8 / 15  # 7 of 12 + 1 of 3 mask bits set
    # the rescalers are ratios of magnitudes: the same for task vectors 1024x smaller
    small = make_method("emr").merge(group(w=torch.tensor(w) / 1024, b=torch.tensor(b) / 1024))
    torch.testing.assert_close(small.scalars, expected, atol=1e-7, rtol=0)


def test_identical_task_vectors_rebuild_exactly():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)
    b[1] = 0.0
    stored = make_method("emr").merge(group(w=[w] * 3, b=[b] * 3))
    assert torch.equal(stored.scalars, torch.ones(3))
    for rebuilt in _rebuilds(stored, ["w", "b"], 3):
        assert torch.equal(rebuilt["w"], w) and torch.equal(rebuilt["b"], b)


def test_positive_multiples_rebuild_exactly():
    # same sign and magnitude pattern: tau_uni = max(c) tau, gamma_t = c_t / max(c)
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(4, 3, generator=gen)
    coeffs = [1.0, 3.0, 0.5]
    stored = make_method("emr").merge(group(w=[c * tau for c in coeffs]))
    torch.testing.assert_close(stored.scalars, torch.tensor(coeffs) / 3.0, atol=1e-7, rtol=0)
    for c, rebuilt in zip(coeffs, _rebuilds(stored, ["w"], 3)):
        torch.testing.assert_close(rebuilt["w"], c * tau, atol=1e-6, rtol=1e-6)


def test_disjoint_supports_rebuild_exactly():
    t1 = torch.tensor([1.5, 0.0, 0.0, -2.0])
    t2 = torch.tensor([0.0, -0.5, 0.0, 0.0])
    t3 = torch.tensor([0.0, 0.0, 4.0, 0.0])
    stored = make_method("emr").merge(group(w=[t1, t2, t3]))
    for t, rebuilt in zip([t1, t2, t3], _rebuilds(stored, ["w"], 3)):
        assert torch.equal(rebuilt["w"], t)


def test_zero_task_vectors_give_no_nan():
    stored = make_method("emr").merge(group(w=[torch.zeros(3), torch.zeros(3)]))
    assert torch.equal(stored.scalars, torch.ones(2)) and not stored.masks["w"].any()
    assert torch.equal(stored.merged["w"], torch.zeros(3))
    # a zero task and a task that agrees with no elected sign rebuild theta_0, gamma stays finite
    stored = make_method("emr").merge(group(w=[[0.0, 0.0], [3.0, 3.0], [-1.0, -1.0]]))
    assert torch.isfinite(stored.scalars).all()
    assert stored.scalars[0] == 1.0 and stored.scalars[2] == 1.0
    assert torch.equal(stored.rebuild_delta(0, "w"), torch.zeros(2))
    assert torch.equal(stored.rebuild_delta(2, "w"), torch.zeros(2))
    assert torch.equal(stored.rebuild_delta(1, "w"), torch.tensor([3.0, 3.0]))


def test_flags_and_validation():
    m = make_method("emr")
    assert m.stores_masks and m.stores_scalars and m.needs_base and not m.randomized
    with pytest.raises(FlexMergeError, match="emr"):
        make_method({"name": "emr", "lambda": 1.0})
