"""Conformance of every registered merge method (discovered from the registry, so a new method is
covered without editing this file).

* At an intermediate size, where blocks hold partial groups such as tasks {0, 2} of 4, every task's
  stored or rebuilt weights equal the method applied to exactly its group's members, computed here
  from the checkpoints with the method's own ``global_pass``/``transform``/``merge`` and the rebuild
  rule of :mod:`flexmerge.methods.base` (``theta_0 + scalars[i] * masks[i] * merged``).
* Groups of one keep the task's own tensors bit for bit.
* The bytes written equal the planned size.
* ``merge`` is invariant to the order of the group's members where the method declares
  ``order_invariant``; ``transform`` on a flat element range equals that range of the whole
  transform where it declares ``elementwise_transform``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import bert_like, finetune, write_checkpoint
from flexmerge.engine import FlexMerge
from flexmerge.materialize import pack_mask, unpack_mask
from flexmerge.methods import GroupInput, available_methods, make_method
from flexmerge.plan import Grouping
from helpers import group, stored_bytes

METHODS = available_methods()
N = 4
FEWER_STEPS = {"doge": {"steps": 25}, "wudi": {"steps": 25}}
"""Iterative methods run fewer optimiser steps here: what is checked (each group's own merge, the
planned bytes) does not depend on the number of steps, and the defaults cost minutes."""


def spec(method: str) -> dict:
    return {"name": method, **FEWER_STEPS.get(method, {})}
# Per block (cycled): partitions of the 4 tasks with groups whose members are not a prefix 0..g-1.
PATTERNS = [
    [(0, 2), (1,), (3,)],
    [(0, 1, 3), (2,)],
    [(0, 2), (1, 3)],
    [(1, 2, 3), (0,)],
    [(0, 1, 2, 3)],
]


def test_the_registry_is_not_empty():
    assert {"task_arithmetic", "ties", "consensus", "emr"} <= set(METHODS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    base = bert_like(0)
    tasks = {f"t{i}": str(write_checkpoint(finetune(base, i), d / f"t{i}", "safetensors")) for i in range(N)}
    return {"base": str(write_checkpoint(base, d / "base", "safetensors")), "tasks": tasks}


def hand_grouping(fm: FlexMerge) -> Grouping:
    groups = {b.name: PATTERNS[i % len(PATTERNS)] for i, b in enumerate(fm.blockmap.blocks)}
    nbytes = sum(fm.cost.block_cost(i, [len(g) for g in groups[b.name]])
                 for i, b in enumerate(fm.blockmap.blocks))
    return Grouping(groups, steps=0, size_bytes=nbytes, size_units=fm.cost.units(nbytes))


def expected_weights(cfg: dict, spec: dict, seed: int, grouping: Grouping, blocks, kinds) -> dict:
    """``{task: {param: tensor}}`` from the checkpoints and a fresh method instance alone."""
    method = make_method(spec, seed=seed)
    base = load_file(cfg["base"])
    fts = [load_file(p) for p in cfg["tasks"].values()]
    names = [n for b in blocks for n in b.params]
    taus = {n: torch.stack([ft[n].float() - base[n].float() for ft in fts]) for n in names}
    if method.has_global_pass:
        stream = lambda: iter(taus.items())  # noqa: E731
        stream.base = lambda n: base[n].float()  # the pretrained tensors, as the engine's stream has
        method.global_pass(stream, N)
    if method.has_transform:
        taus = {n: method.transform(n, t) for n, t in taus.items()}
    tasks = list(cfg["tasks"])
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for block in blocks:
        for members in grouping.groups[block.name]:
            if kinds[block.name][members] == "original":  # the size rule keeps the originals
                continue
            rows = {n: torch.stack([taus[n][t] for t in members]) for n in block.params}
            stored = method.merge(GroupInput(task_vectors=rows, base={n: base[n].float() for n in block.params},
                                             task_ids=list(members), block=block.name, seed=seed))
            for pos, t in enumerate(members):
                for n in block.params:
                    out[tasks[t]][n] = (base[n].float() + stored.rebuild_delta(pos, n)).to(base[n].dtype)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_intermediate_size_stores_each_groups_own_merge_and_the_planned_bytes(checkpoints, tmp_path, method):
    fm = FlexMerge(checkpoints, method=spec(method))
    grouping = hand_grouping(fm)
    blocks = fm.blockmap.blocks
    # not vacuous: some group that is not the prefix 0..g-1 of the tasks is merged, not kept
    kinds = {b.name: dict(zip(grouping.groups[b.name],
                              fm.cost.layout(bi, [len(g) for g in grouping.groups[b.name]]).kinds))
             for bi, b in enumerate(blocks)}
    merged_groups = [g for k in kinds.values() for g, kind in k.items() if kind != "original"]
    assert any(g != tuple(range(len(g))) and len(g) < N for g in merged_groups), method
    if not fm.method.needs_base:  # plain methods merge every group of two or more
        assert all((kind == "original") == (len(g) == 1) for k in kinds.values() for g, kind in k.items())

    bundle = fm.merge(grouping=grouping, out=tmp_path / "b")
    want = expected_weights(checkpoints, fm.method.describe(), fm.method.seed, grouping, blocks, kinds)
    for i, (t, path) in enumerate(checkpoints["tasks"].items()):
        own = load_file(path)
        got = bundle.state_dict(t)
        for b in blocks:
            members = next(g for g in grouping.groups[b.name] if i in g)
            for n in b.params:
                expect = own[n] if kinds[b.name][members] == "original" else want[t][n]
                assert got[n].dtype == expect.dtype and torch.equal(got[n], expect), (method, t, n, members)

    # bytes written (tensor data of the block files) == the planned size == the bundle's size
    assert stored_bytes(tmp_path / "b", bundle.manifest) == grouping.size_bytes == bundle.size_bytes


def _taus(seed: int, g: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(g, 6, 5, generator=gen), "b": torch.randn(g, 7, generator=gen)}


def _rebuilds(stored, names, g):
    return [{n: stored.rebuild_delta(i, n) for n in names} for i in range(g)]


@pytest.mark.parametrize("method", [m for m in METHODS if make_method(m).order_invariant])
@pytest.mark.parametrize("perm", [(2, 0, 1), (1, 0, 2)])
def test_merge_is_invariant_to_member_order(method, perm):
    m = make_method(method, seed=3)
    taus = _taus(0)
    if m.has_global_pass:
        m.global_pass(lambda: iter(taus.items()), 3)
    if m.has_transform:
        taus = {n: m.transform(n, t) for n, t in taus.items()}
    a = m.merge(group(**taus))
    shuffled = group(**{n: t[list(perm)] for n, t in taus.items()})
    shuffled.task_ids = list(perm)
    b = m.merge(shuffled)
    for n in taus:
        torch.testing.assert_close(b.merged[n], a.merged[n], rtol=1e-5, atol=1e-6)
    ra, rb = _rebuilds(a, taus, 3), _rebuilds(b, taus, 3)
    for pos, t in enumerate(perm):  # member pos of the shuffled group is task t
        for n in taus:
            torch.testing.assert_close(rb[pos][n], ra[t][n], rtol=1e-5, atol=1e-6)


def test_some_method_declares_member_order_matters():
    """MagMax breaks ties in |tau| by member order (the authors' merge_max_abs)."""
    assert not make_method("magmax").order_invariant
    x = torch.tensor([[2.0, 1.0], [-2.0, 0.5]])
    m = make_method("magmax")
    assert m.merge(group(v=x)).merged["v"].tolist() == [-2.0, 1.0]
    assert m.merge(group(v=x.flip(0))).merged["v"].tolist() == [2.0, 1.0]


ELEMENTWISE = [m for m in METHODS if make_method(m).elementwise_transform]


def test_some_method_claims_an_elementwise_transform():
    assert "ties" in ELEMENTWISE


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_chunked_transform_equals_the_whole_transform(method):
    taus = _taus(1, g=4)
    whole, chunked = make_method(method), make_method(method)
    whole.global_pass(lambda: iter(taus.items()), 4)

    def chunks():  # the stream contract: large tensors as flat element ranges [N, k]
        for n, t in taus.items():
            flat = t.reshape(4, -1)
            for start in range(0, flat.shape[1], 7):
                yield n, flat[:, start:start + 7]

    chunked.global_pass(chunks, 4)
    for n, t in taus.items():
        full = whole.transform(n, t)
        assert full.shape == t.shape
        flat = full.reshape(4, -1)
        for start in range(0, flat.shape[1], 7):
            piece = t.reshape(4, -1)[:, start:start + 7]
            assert torch.equal(whole.transform(n, piece), flat[:, start:start + 7]), (n, start)
            assert torch.equal(chunked.transform(n, piece), flat[:, start:start + 7]), (n, start)


ELEMENTWISE_MERGE = [m for m in METHODS if make_method(m).elementwise_merge]


def test_the_llm_methods_merge_entry_by_entry():
    assert {"task_arithmetic", "ties"} <= set(ELEMENTWISE_MERGE)


def _with_cancellations(taus: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mostly negative task vectors with entries whose members cancel exactly (+a, -a), so that
    TIES's block-level zero-sum rule picks -1 for them."""
    out = {}
    for i, (n, t) in enumerate(taus.items()):
        t = -t.abs()
        flat = t.reshape(t.shape[0], -1)
        for j in range(i, flat.shape[1], 5):
            flat[:, j] = 0.0
            flat[0, j], flat[1, j] = 0.25 * (j + 1), -0.25 * (j + 1)
        out[n] = t
    return out


@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("method", ELEMENTWISE_MERGE)
def test_chunked_merge_equals_the_whole_merge(method, cancel):
    taus = _taus(2, g=3)
    if cancel:
        taus = _with_cancellations(taus)
    m = make_method(method)
    if m.has_global_pass:
        m.global_pass(lambda: iter(taus.items()), 3)
    if m.has_transform:
        taus = {n: m.transform(n, t) for n, t in taus.items()}
    base = {n: torch.randn(t.shape[1:], generator=torch.Generator().manual_seed(9)) for n, t in taus.items()}
    whole = m.merge(GroupInput(task_vectors=taus, base=base, task_ids=[0, 1, 2], block="b", seed=0))
    merger = m.chunked_merge(GroupInput(task_vectors={}, base={}, task_ids=[0, 1, 2], block="b", seed=0),
                             {n: tuple(t.shape[1:]) for n, t in taus.items()})
    for n, t in taus.items():  # ragged flat chunks, in order, as the engine feeds them
        flat, b = t.reshape(3, -1), base[n].reshape(-1)
        for start in range(0, flat.shape[1], 7):
            merger.add(n, flat[:, start:start + 7], b[start:start + 7])
    got = merger.result()
    assert got.masks is None and got.scalars is None
    for n in taus:
        assert torch.equal(got.merged[n], whole.merged[n]), (method, n)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (8,), (3, 5), (2, 3, 4)])
def test_masks_pack_to_one_bit_per_element_and_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, tuple(shape)), mask)
