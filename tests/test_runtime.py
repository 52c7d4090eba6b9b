"""MultiTaskModel: every task served from one bundle equals that task's exported model run alone."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from conftest import write_checkpoint
from helpers import one_thread, post_json, save_hf_bert_tasks  # noqa: F401  (one_thread: an autouse fixture)
from flexmerge import FlexMergeError, MultiTaskModel
from flexmerge.engine import FlexMerge

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()



MASK_METHODS = ["consensus", "emr"]  # a missing one fails (unknown method), never skips
TOL = 1e-5


# --------------------------------------------------------------------------- a plain torch module
class Gain(nn.Module):
    """A parameter used by a custom forward: served through the generic (functional_call) path."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.gain


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.scale = Gain(d)

    def forward(self, x):
        x = x + torch.tanh(self.attn(x))
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.norm(x + self.mlp(x))
        return self.scale(x)


class Tiny(nn.Module):
    """Embedding, Linear, Conv1d, LayerNorm, a custom parameter, and a two-layer task head whose
    widths differ per task (``hidden``, ``labels``)."""

    def __init__(self, labels=3, hidden=4, d=8, vocab=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Layer(d) for _ in range(2)])
        self.classifier = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, labels))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x.mean(1))


TASK_SHAPES = {"t0": (2, 4), "t1": (3, 5), "t2": (5, 6)}  # task -> (labels, head hidden)


def tiny_for(task=None):
    labels, hidden = TASK_SHAPES[task] if task else (3, 4)
    return Tiny(labels=labels, hidden=hidden)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base = Tiny().state_dict()
    tasks = {}
    for i, t in enumerate(TASK_SHAPES):
        g = torch.Generator().manual_seed(10 + i)
        head = tiny_for(t).state_dict()
        sd = {k: (head[k] if k.startswith("classifier.") else v + 0.1 * torch.randn(v.shape, generator=g))
              for k, v in base.items()}
        sd.update({k: v for k, v in head.items() if k.startswith("classifier.")})
        tasks[t] = str(write_checkpoint(sd, tmp / t, "safetensors"))
    bpath = write_checkpoint(base, tmp / "base", "safetensors")
    return {"base": str(bpath), "tasks": tasks, "exclude": [r"classifier\..*"]}


def tiny_inputs(seed=0, rows=(3, 2, 4), seq=5):
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randint(0, 16, (n, seq), generator=g) for t, n in zip(TASK_SHAPES, rows)}


def tiny_reference(bundle, task, ids):
    model = tiny_for(task)
    model.load_state_dict(bundle.state_dict(task))
    model.eval()
    with torch.no_grad():
        return model(ids)


def sizes_of(fm):
    plan = fm.plan()
    lo, hi = plan.min_units, plan.max_units
    return [lo, (lo + hi) / 2, hi]


# --------------------------------------------------------------------------- a tiny HF BERT
def bert_config(labels):
    return transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16, num_labels=labels)


HF_LABELS = {"sst2": 2, "trec": 6, "agnews": 4}


@pytest.fixture(scope="module")
def hf_cfg(tmp_path_factory):
    return save_hf_bert_tasks(tmp_path_factory.mktemp("hf"), HF_LABELS, bert_config)


def hf_inputs(seed=0, rows=(3, 4, 2), seq=7):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t, n in zip(HF_LABELS, rows):
        mask = torch.ones(n, seq, dtype=torch.long)
        mask[0, seq - 2:] = 0  # some padding
        out[t] = {"input_ids": torch.randint(1, 30, (n, seq), generator=g), "attention_mask": mask}
    return out


def hf_reference(bundle, task, inputs):
    model = transformers.BertForSequenceClassification(bert_config(HF_LABELS[task]))
    model.load_state_dict(bundle.state_dict(task))
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------------- equality with export
@pytest.mark.parametrize("method", ["task_arithmetic", *MASK_METHODS])
def test_hf_bert_every_task_equals_its_exported_model(hf_cfg, tmp_path, method):
    fm = FlexMerge(dict(hf_cfg, method=method))
    inputs = hf_inputs()
    policies = ["on_the_fly", "cache"] if method in MASK_METHODS else ["on_the_fly"]
    for i, size in enumerate(sizes_of(fm)):
        bundle = fm.merge(size, out=tmp_path / f"b{i}")
        for policy in policies:
            mt = MultiTaskModel.from_bundle(tmp_path / f"b{i}", rebuild_policy=policy)
            out = mt(inputs)
            assert list(out) == list(inputs)
            for t in HF_LABELS:
                ref = hf_reference(bundle, t, inputs[t])
                assert out[t].logits.shape == ref.shape == (inputs[t]["input_ids"].shape[0], HF_LABELS[t])
                torch.testing.assert_close(out[t].logits, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["task_arithmetic", *MASK_METHODS])
@pytest.mark.parametrize("per_task_factory", [True, False])
def test_plain_module_every_task_equals_its_exported_model(tiny_cfg, method, per_task_factory):
    fm = FlexMerge(dict(tiny_cfg, method=method))
    factory = tiny_for if per_task_factory else (lambda: tiny_for())
    inputs = tiny_inputs()
    for size in sizes_of(fm):
        bundle = fm.merge(size)  # in memory
        for policy in ("on_the_fly", "cache"):
            mt = MultiTaskModel.from_bundle(bundle, model_factory=factory, rebuild_policy=policy)
            for subset in (list(inputs), ["t2", "t0"], ["t1"]):
                out = mt({t: inputs[t] for t in subset})
                assert list(out) == subset
                for t in subset:
                    ref = tiny_reference(bundle, t, inputs[t])
                    assert out[t].shape == (inputs[t].shape[0], TASK_SHAPES[t][0])
                    torch.testing.assert_close(out[t], ref, atol=TOL, rtol=0)


def test_gpt2_conv1d_and_tied_lm_head(tmp_path):
    """GPT-2 (HF Conv1D, LM head tied to the embeddings and absent from the checkpoint)."""
    cfg = transformers.GPT2Config(vocab_size=24, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    tasks = {}
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        m = transformers.GPT2LMHeadModel(cfg)
        m.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        m.tie_weights()
        m.save_pretrained(tmp_path / f"g{i}")
        tasks[f"g{i}"] = str(tmp_path / f"g{i}")
    fm = FlexMerge({"base": str(tmp_path / "base"), "tasks": tasks, "method": "task_arithmetic"})
    g = torch.Generator().manual_seed(5)
    inputs = {t: {"input_ids": torch.randint(0, 24, (2, 6), generator=g), "use_cache": False} for t in tasks}
    for i, size in enumerate(sizes_of(fm)):
        bundle = fm.merge(size, out=tmp_path / f"b{i}")
        mt = MultiTaskModel.from_bundle(tmp_path / f"b{i}")
        out = mt(inputs)
        for t in tasks:
            ref = transformers.GPT2LMHeadModel(cfg)
            ref.load_state_dict(bundle.state_dict(t), strict=False)
            ref.tie_weights()
            ref.eval()
            with torch.no_grad():
                expect = ref(**inputs[t]).logits
            torch.testing.assert_close(out[t].logits, expect, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- sharing and cost
def test_tasks_of_one_group_share_storage(tiny_cfg, tmp_path):
    fm = FlexMerge(dict(tiny_cfg, method="task_arithmetic"))
    lo, mid, hi = sizes_of(fm)
    bundle = fm.merge(mid, out=tmp_path / "b")
    mt = MultiTaskModel.from_bundle(tmp_path / "b", model_factory=tiny_for)
    views = {t: mt.task_tensors(t) for t in TASK_SHAPES}
    shared = distinct = 0
    for block in bundle.blocks:
        for name in block.params:
            for a in TASK_SHAPES:
                for b in TASK_SHAPES:
                    if a >= b:
                        continue
                    same_group = bundle.group_of(a, block.name)[0] == bundle.group_of(b, block.name)[0]
                    pa, pb = views[a][name].data_ptr(), views[b][name].data_ptr()
                    if same_group:
                        assert pa == pb, (name, a, b)
                        shared += 1
                    else:
                        assert pa != pb, (name, a, b)
                        distinct += 1
    assert shared and distinct  # the intermediate size has both kinds
    # every tensor lives in the bundle's memory map: nothing loaded twice, nothing copied
    st = mt.stats()
    assert st["loaded_bytes"] <= st["stored_bytes"]
    for t in TASK_SHAPES:
        for name, v in views[t].items():
            torch.testing.assert_close(v, bundle.state_dict(t)[name], atol=0, rtol=0)


class CountMatmuls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("linear", "addmm", "mm"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_one_op_per_shared_module_and_one_per_group(tiny_cfg):
    fm = FlexMerge(dict(tiny_cfg, method="task_arithmetic"))
    lo, _, hi = sizes_of(fm)
    inputs = tiny_inputs()
    shared_linears, head_linears = 2 * 3, 2
    for size, per_module in ((lo, 1), (hi, 3)):
        mt = MultiTaskModel.from_bundle(fm.merge(size), model_factory=tiny_for)
        with CountMatmuls() as c:
            mt(inputs)
        assert c.n == shared_linears * per_module + head_linears * 3
        assert mt.variants("layers.0.attn") == per_module
        assert mt.variants("classifier.0") == 3


def test_mask_policies_memory(tiny_cfg):
    fm = FlexMerge(dict(tiny_cfg, method=MASK_METHODS[0]))
    bundle = fm.merge(sizes_of(fm)[0])
    inputs = tiny_inputs()
    fly = MultiTaskModel.from_bundle(bundle, model_factory=tiny_for, rebuild_policy="on_the_fly")
    for t in TASK_SHAPES:  # rebuilt weights equal the exported ones bit for bit
        expect = bundle.state_dict(t)
        assert all(torch.equal(v, expect[k]) for k, v in fly.task_tensors(t).items())
    fly(inputs)
    first = fly.stats()
    fly(inputs)
    second = fly.stats()
    assert first["cache_bytes"] == 0 and first["scratch_bytes"] > 0
    assert second["scratch_bytes"] == first["scratch_bytes"]  # buffers reused, not reallocated
    assert second["rebuilds"] == 2 * first["rebuilds"]        # rebuilt at every request

    full = MultiTaskModel.from_bundle(bundle, model_factory=tiny_for, rebuild_policy="cache")
    full(inputs)
    n = full.stats()["rebuilds"]
    full(inputs)
    assert full.stats()["rebuilds"] == n and full.stats()["cache_bytes"] > 0  # second request: all hits

    budget = full.stats()["cache_bytes"] // 3
    small = MultiTaskModel.from_bundle(bundle, model_factory=tiny_for, rebuild_policy="cache",
                                       cache_budget_bytes=budget)
    for _ in range(2):
        out = small(inputs)
        assert 0 < small.stats()["cache_bytes"] <= budget
    for t in TASK_SHAPES:
        torch.testing.assert_close(out[t], tiny_reference(bundle, t, inputs[t]), atol=TOL, rtol=0)

    tiny = MultiTaskModel.from_bundle(bundle, model_factory=tiny_for, rebuild_policy="cache",
                                      cache_budget_bytes=1)  # nothing fits: rebuilt as on the fly
    out = tiny(inputs)
    assert tiny.stats()["cache_bytes"] == 0 and tiny.stats()["scratch_bytes"] > 0
    for t in TASK_SHAPES:
        torch.testing.assert_close(out[t], tiny_reference(bundle, t, inputs[t]), atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["task_arithmetic", *MASK_METHODS])
def test_runs_spread_over_threads_give_the_same_outputs(tiny_cfg, method):
    """With 2 intra-op threads the runs of a Linear execute concurrently, one thread each (mask
    rebuilds into per-thread buffers); outputs must not change."""
    fm = FlexMerge(dict(tiny_cfg, method=method))
    inputs = tiny_inputs(rows=(3, 2, 4))
    torch.set_num_threads(2)
    try:
        masked = method in MASK_METHODS
        bundle = fm.merge(sizes_of(fm)[0] if masked else sizes_of(fm)[2])  # every task its own weights
        for policy in ("on_the_fly", "cache") if masked else ("on_the_fly",):
            mt = MultiTaskModel.from_bundle(bundle, model_factory=tiny_for, rebuild_policy=policy)
            out = mt(inputs)
            assert torch.get_num_threads() == 2
            assert mt._router._pool is not None  # the concurrent path ran
            seen = []  # a thread started now still gets the process default of 2 threads
            th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            th.start()
            th.join()
            assert seen == [2]
            for t in TASK_SHAPES:
                torch.testing.assert_close(out[t], tiny_reference(bundle, t, inputs[t]), atol=TOL, rtol=0)
    finally:
        torch.set_num_threads(1)


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny_bundle(tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "b"
    FlexMerge(dict(tiny_cfg, method="task_arithmetic")).merge(2.0, out=out)
    return out


def test_unknown_task(tiny_bundle):
    mt = MultiTaskModel.from_bundle(tiny_bundle, model_factory=tiny_for)
    with pytest.raises(FlexMergeError, match="unknown task 'nope'.*t0, t1, t2"):
        mt({"t0": torch.zeros(1, 5, dtype=torch.long), "nope": torch.zeros(1, 5, dtype=torch.long)})
    with pytest.raises(FlexMergeError, match="non-empty"):
        mt({})


def test_inputs_whose_shapes_disagree(tiny_bundle, hf_cfg, tmp_path):
    mt = MultiTaskModel.from_bundle(tiny_bundle, model_factory=tiny_for)
    with pytest.raises(FlexMergeError, match=r"task 't1' has shape \(2, 6\).*\(3, 5\)"):
        mt({"t0": torch.zeros(3, 5, dtype=torch.long), "t1": torch.zeros(2, 6, dtype=torch.long)})
    FlexMerge(dict(hf_cfg, method="task_arithmetic")).merge(1.0, out=tmp_path / "hf")
    hf = MultiTaskModel.from_bundle(tmp_path / "hf")
    good = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(FlexMergeError, match="'attention_mask' has 3 rows"):
        hf({"sst2": {"input_ids": torch.ones(2, 4, dtype=torch.long),
                     "attention_mask": torch.ones(3, 4, dtype=torch.long)}})
    with pytest.raises(FlexMergeError, match="entries"):
        hf({"sst2": good, "trec": {"input_ids": good["input_ids"]}})
    with pytest.raises(FlexMergeError, match="labels"):
        hf({"sst2": dict(good, labels=torch.zeros(2, dtype=torch.long))})


def test_corrupted_bundle_fails_checksum(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    files = json.loads((bad / "manifest.json").read_text())["files"]
    victim = bad / sorted(files)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(FlexMergeError, match="checksum"):
        MultiTaskModel.from_bundle(bad, model_factory=tiny_for)
    MultiTaskModel.from_bundle(bad, model_factory=tiny_for, verify=False)  # opt-out loads


class Renamed(Tiny):
    def __init__(self):
        super().__init__()
        self.head = self.classifier
        del self.classifier


def test_model_factory_that_does_not_match(tiny_bundle):
    with pytest.raises(FlexMergeError, match="'head.0.weight'.*not in the bundle"):
        MultiTaskModel.from_bundle(tiny_bundle, model_factory=Renamed)
    with pytest.raises(FlexMergeError, match=r"'embed.weight'.*\[16, 8\] in the bundle but \[16, 12\]"):
        MultiTaskModel.from_bundle(tiny_bundle, model_factory=lambda: Tiny(d=12))
    with pytest.raises(FlexMergeError, match="'classifier.0.(weight|bias)' of task 't0' has shape"):
        MultiTaskModel.from_bundle(tiny_bundle, model_factory=lambda task: Tiny(hidden=9))
    with pytest.raises(FlexMergeError, match="not a torch module"):
        MultiTaskModel.from_bundle(tiny_bundle, model_factory=lambda: object())
    with pytest.raises(FlexMergeError, match="rebuild_policy"):
        MultiTaskModel.from_bundle(tiny_bundle, model_factory=tiny_for, rebuild_policy="lazy")


def test_non_hf_bundle_without_factory(tiny_bundle):
    with pytest.raises(FlexMergeError, match="model_factory"):
        MultiTaskModel.from_bundle(tiny_bundle)


def test_params_on_meta_is_scoped_to_the_building_thread():
    from flexmerge.runtime import _params_on_meta

    inside, entered, done = {}, threading.Event(), threading.Event()

    def builder():
        with _params_on_meta():
            inside["lin"] = nn.Linear(3, 2)
            inside["buf"] = nn.BatchNorm1d(2)
            entered.set()
            done.wait(10)

    th = threading.Thread(target=builder)
    th.start()
    entered.wait(10)
    other = nn.Linear(3, 2)  # another thread while the builder's block is open: real parameters
    done.set()
    th.join()
    assert inside["lin"].weight.device.type == "meta" and inside["lin"].bias.device.type == "meta"
    assert inside["buf"].running_mean.device.type == "cpu"  # buffers stay real
    assert other.weight.device.type == "cpu"
    assert nn.Linear(3, 2).weight.device.type == "cpu"  # nothing left behind after the block


# --------------------------------------------------------------------------- flexmerge serve (thin HTTP)
def test_http_endpoint_per_task_and_batch_routes(tiny_bundle):
    import urllib.request

    from flexmerge.serve import make_server

    mt = MultiTaskModel.from_bundle(tiny_bundle, model_factory=tiny_for)
    server = make_server(mt, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"

    def post(path, body):
        return post_json(url, path, body, timeout=10)

    try:
        inputs = tiny_inputs()
        expect = mt(inputs)
        with urllib.request.urlopen(url + "/tasks", timeout=10) as r:
            assert json.loads(r.read())["tasks"] == ["t0", "t1", "t2"]
        code, body = post("/tasks/t1", {"inputs": inputs["t1"].tolist()})
        assert code == 200
        torch.testing.assert_close(torch.tensor(body["outputs"]), expect["t1"], atol=TOL, rtol=0)
        code, body = post("/batch", {"inputs": {t: v.tolist() for t, v in inputs.items()}})
        assert code == 200 and list(body["outputs"]) == list(inputs)
        for t in inputs:
            torch.testing.assert_close(torch.tensor(body["outputs"][t]), expect[t], atol=TOL, rtol=0)
        code, body = post("/tasks/nope", {"inputs": [[1, 2, 3, 4, 5]]})
        assert code == 400 and "unknown task 'nope'" in body["error"]
        code, body = post("/batch", {"inputs": {"t0": [[1, 2, 3, 4, 5]], "t1": [[1, 2, 3]]}})
        assert code == 400 and "pad to one sequence length" in body["error"]
    finally:
        server.shutdown()
        server.server_close()
