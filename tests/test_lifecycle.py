"""FlexMerge, ModelSet and the group cache as context managers: sources closed on leaving."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from flexmerge import FlexMergeError
from flexmerge.engine import FlexMerge
from flexmerge.validate import open_models

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")


def open_fds() -> int:
    gc.collect()  # files left open by earlier tests' objects are closed now, not mid-test
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow  # a few seconds (subprocesses): runs in CI's full run (.ci/run), not the default fast run
@needs_proc
def test_flexmerge_closes_its_sources_on_leaving_the_block(bert_set):
    cfg = bert_set()
    before = open_fds()
    with FlexMerge(cfg, method="task_arithmetic") as fm:
        fm.plan()
        sd = fm.merge(1.0).state_dict("t0")
        assert open_fds() >= before + 4  # base + 3 tasks, one safetensors file each
    assert open_fds() == before
    assert fm.models.closed
    with pytest.raises(FlexMergeError, match="closed"):
        fm.merge(1.0)
    with pytest.raises(FlexMergeError, match="closed"):
        fm.grams()
    with FlexMerge(cfg, method="task_arithmetic") as again:  # a new job reads the same values
        assert all(torch.equal(v, again.merge(1.0).state_dict("t0")[k]) for k, v in sd.items())


@needs_proc
def test_model_set_is_a_context_manager(bert_set):
    cfg = bert_set()
    before = open_fds()
    with open_models(cfg) as models:
        assert open_fds() >= before + 4
        assert models.task_names == ["t0", "t1", "t2"]
    assert models.closed and open_fds() == before


def test_group_cache_is_dropped_on_leaving_the_block(bert_set):
    fm = FlexMerge(bert_set(), method="task_arithmetic")
    plan = fm.plan()
    with fm.cache_groups() as same:
        assert same is fm and fm._group_cache == {}
        cached = fm.merge(plan.min_units).state_dict("t1")
        assert fm._group_cache  # the merged groups are kept
    assert fm._group_cache is None
    plain = fm.merge(plan.min_units).state_dict("t1")
    assert all(torch.equal(v, plain[k]) for k, v in cached.items())
    fm.cache_groups(True)  # the imperative form still works
    assert fm._group_cache == {}
    fm.cache_groups(False)
    assert fm._group_cache is None
    fm.close()
