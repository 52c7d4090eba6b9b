"""The method interface and registry: a name is registered once, ``make_method`` builds from a
name, a mapping or an instance (returned as it is unless overridden), with seed 0 by default;
the base class's defaults (no name, no parameters, deterministic, order-invariant, no note);
parameters are frozen and take field names or YAML aliases; what a stored group needs."""

from __future__ import annotations

import pytest

import torch
from pydantic import ValidationError

from flexmerge.errors import FlexMergeError
from flexmerge.methods import available_methods, make_method, method_class
from flexmerge.methods.base import GroupInput, MergeMethod, StoredGroup
from flexmerge.methods.registry import register


def test_a_name_taken_by_another_class_is_refused_and_the_same_class_may_register_again():
    cls = method_class("ties")
    assert register(cls) is cls  # the same class again: accepted, unchanged
    impostor = type("Impostor", (cls,), {"name": "ties"})
    with pytest.raises(TypeError, match="registered twice"):
        register(impostor)
    assert method_class("ties") is cls
    with pytest.raises(TypeError, match="has no name"):
        register(type("Nameless", (cls,), {"name": ""}))


def test_make_method_defaults_and_instances():
    m = make_method("dare")
    assert m.seed == 0
    assert make_method({"name": "dare", "p": 0.5}, seed=3).seed == 3
    assert make_method(m) is m  # an instance without overrides is returned as it is
    o = make_method(m, overrides={"p": 0.25})
    assert o is not m and o.describe()["p"] == 0.25 and o.seed == m.seed
    with pytest.raises(FlexMergeError, match="unknown merge method 'nope'"):
        make_method("nope")
    with pytest.raises(FlexMergeError, match="mapping with a 'name' key"):
        make_method({"p": 0.5})
    with pytest.raises(FlexMergeError, match="got int"):
        make_method(3)


def test_base_class_defaults():
    class Plain(MergeMethod):  # no name, no Params of its own
        def merge(self, group):
            return StoredGroup(merged={})

    with pytest.raises(TypeError, match="has no name"):
        register(Plain)
    m = Plain()
    assert (m.seed, m.describe(), m.note, m.randomized, m.order_invariant) == (0, {"name": ""}, "", False, True)
    with pytest.raises(FlexMergeError, match="nope"):
        Plain(nope=1)
    assert method_class("ties")().seed == 0
    assert GroupInput({}, {}, [0, 1]).seed == 0


def test_which_methods_are_randomized_order_dependent_or_noted():
    """Pinned so that a changed default of the base class shows: only DARE draws random numbers,
    only MagMax depends on member order (ties of magnitude go to the later member), and the
    methods that transform some tensors otherwise than the rest say so in a note."""
    names = available_methods()
    assert [m for m in names if method_class(m).randomized] == ["dare"]
    assert [m for m in names if not method_class(m).order_invariant] == ["magmax"]
    assert [m for m in names if method_class(m).note] == ["doge", "iso_c", "iso_cts", "larv", "tsv"]


def test_parameters_are_frozen_and_take_the_field_name_or_the_alias():
    params = method_class("ties").Params
    assert params(lam=0.5) == params(**{"lambda": 0.5})
    with pytest.raises(ValidationError):
        make_method("ties").params.lam = 2.0


def test_a_stored_group_needs_the_base_when_it_has_masks_or_scalars():
    t = torch.zeros(2, 3)
    assert not StoredGroup(merged={"w": t[0]}).needs_base
    assert StoredGroup(merged={"w": t[0]}, masks={"w": t.bool()}).needs_base
    assert StoredGroup(merged={"w": t[0]}, scalars=torch.ones(2)).needs_base


def test_method_text_and_repr_as_a_user_writes_them():
    from flexmerge.methods.base import method_text

    assert method_text({"name": "ties", "k": 0.2, "lambda": 1.0}) == "ties (k=0.2, lambda=1.0)"
    assert method_text({"name": "tsv", "alpha": 1.0, "rank_fraction": None}) == "tsv (alpha=1.0)"
    assert method_text({"name": "average"}) == "average"
    assert (method_text({"name": "consensus", "inner": {"name": "ties", "k": 0.2}, "lambda_c": None})
            == "consensus (inner=ties (k=0.2))")
    assert repr(make_method({"name": "ties", "k": 0.3})) == "Ties(k=0.3, lambda=1.0)"


def test_parameter_errors_name_what_is_allowed():
    with pytest.raises(FlexMergeError, match=r"unknown parameter 'kk' \(allowed: k, lambda\)"):
        make_method({"name": "ties", "kk": 1})
    with pytest.raises(FlexMergeError, match=r"unknown parameter 'k' \(allowed: none\)"):
        make_method({"name": "average", "k": 1})


def test_chunks_must_fill_each_tensor_exactly():
    m = make_method("task_arithmetic")
    g = GroupInput({}, {}, [0, 1])
    chunks = m.chunked_merge(g, {"w": (2, 3)})
    chunks.add("w", torch.ones(2, 4), torch.zeros(4))
    with pytest.raises(RuntimeError, match="2 of 6 elements|4 of 6 elements"):
        chunks.result()
    with pytest.raises(RuntimeError, match="past its 6 elements"):
        chunks.add("w", torch.ones(2, 3), torch.zeros(3))
    chunks.add("w", torch.ones(2, 2), torch.zeros(2))
    assert chunks.result().merged["w"].shape == (2, 3)


def test_seeded_generator_is_keyed_by_seed_and_what_it_applies_to():
    import zlib

    from flexmerge.methods.base import seeded_generator

    # the seed: crc32 of the keys joined by \x1f, plus the run seed in the high 32 bits
    assert seeded_generator(0, 3, "w").initial_seed() == zlib.crc32(b"0\x1f3\x1fw")
    assert seeded_generator(5, 3, "w").initial_seed() == zlib.crc32(b"5\x1f3\x1fw") + (5 << 32)
    draws = {k: torch.rand(4, generator=seeded_generator(*k)) for k in [(0, 3, "w"), (0, 4, "w"), (1, 3, "w")]}
    assert torch.equal(draws[(0, 3, "w")], torch.rand(4, generator=seeded_generator(0, 3, "w")))
    assert not torch.equal(draws[(0, 3, "w")], draws[(0, 4, "w")])
    assert not torch.equal(draws[(0, 3, "w")], draws[(1, 3, "w")])
