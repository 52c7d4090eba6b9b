"""MultiTaskModel serves adapter bundles (flexmerge.runtime.adapters), and LoRA
adapters of different ranks (flexmerge.adapters.source.RANK_RULE): at size N every task equals
PEFT's model of its own adapter, at other sizes PEFT's model of its exported adapter, mixed batches
route rows by task, stored groups are held once."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from helpers import post_json, stored_bytes  # noqa: E402
from test_adapters import cfg, inputs, make_base, make_lora, peft_out, save_random_adapters  # noqa: E402

from flexmerge.adapters.engine import AdapterMerge  # noqa: E402
from flexmerge.adapters.export import export_adapter  # noqa: E402
from flexmerge.errors import FlexMergeError  # noqa: E402
from flexmerge.plan import Grouping  # noqa: E402
from flexmerge.runtime import MultiTaskModel  # noqa: E402


def served(mt, task, x=None):
    with torch.no_grad():
        return mt({task: inputs() if x is None else x})[task].last_hidden_state


@pytest.fixture()
def ranked(tmp_path):
    """Three LoRA adapters of one base: ranks 2, 4 and 3 (value: 1, 4, 2); alpha and rslora differ."""
    base = make_base(tmp_path)
    tasks = {"a": make_lora(base, tmp_path / "a", 1, r=2, rank_pattern={"value": 1}),
             "b": make_lora(base, tmp_path / "b", 2, r=4, lora_alpha=8, use_rslora=True),
             "c": make_lora(base, tmp_path / "c", 3, r=3, rank_pattern={"value": 2}, alpha_pattern={"value": 5.0})}
    return base, tasks


def test_size_n_serves_each_adapter_as_peft(ranked, tmp_path):
    base, tasks = ranked
    bundle = AdapterMerge(cfg(base, tasks)).merge(3, tmp_path / "bundle")
    mt = MultiTaskModel.from_bundle(tmp_path / "bundle")
    for t, path in tasks.items():
        torch.testing.assert_close(served(mt, t), peft_out(base, path), rtol=0, atol=0)
    # each task its own factors, sliced back to its own rank (views of the stored tensors)
    side = mt.model.get_submodule("encoder.layer.0.attention.self.query")
    assert mt.variants("encoder.layer.0.attention.self.query") == 3
    assert [v[0].shape[0] for v in side._variants] == [2, 4, 3]
    assert bundle.size_units == 3


def test_intermediate_size_equals_peft_of_the_export_and_mixed_batches_route_rows(ranked, tmp_path):
    base, tasks = ranked
    fm = AdapterMerge(cfg(base, tasks))
    # block 0 merges a+b, block 1 merges b+c: every task shares one group with another
    groups = {"encoder.layer.0.attention": [(0, 1), (2,)], "encoder.layer.1.attention": [(0,), (1, 2)]}
    nbytes = fm.cost.block_cost(0, [2, 1]) + fm.cost.block_cost(1, [1, 2])
    bundle = fm.merge(grouping=Grouping(groups, 2, nbytes, fm.cost.units(nbytes)))
    mt = MultiTaskModel.from_bundle(bundle, base=base)
    refs = {}
    for t in tasks:
        refs[t] = peft_out(base, export_adapter(bundle, t, tmp_path / f"exp-{t}"))
        torch.testing.assert_close(served(mt, t), refs[t], rtol=1e-5, atol=1e-5)
    # a mixed batch: each task's rows equal its own model's
    gen = torch.Generator().manual_seed(3)
    xs = {t: {"input_ids": torch.randint(0, 50, (k, 9), generator=gen), "attention_mask": torch.ones(k, 9, dtype=torch.long)}
          for t, k in zip(tasks, (2, 1, 3))}
    with torch.no_grad():
        mixed = mt(xs)
    for t in tasks:
        pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base), str(tmp_path / f"exp-{t}"))
        with torch.no_grad():
            ref = pm.eval()(**xs[t]).last_hidden_state
        torch.testing.assert_close(mixed[t].last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    # stored groups held once: a and b run layer 0's query on the same merged factors (no copy)
    q0 = mt.model.get_submodule("encoder.layer.0.attention.self.query")
    assert mt.variants("encoder.layer.0.attention.self.query") == 2 and q0._mapping == (0, 0, 1)
    ta, tb, tc = (mt.task_tensors(t) for t in tasks)
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert ta[key] is tb[key] and ta[key].data_ptr() != tc[key].data_ptr()
    # every task's rows run on the base model's own weight
    ref = transformers.BertModel.from_pretrained(base).encoder.layer[0].attention.self.query.weight
    assert torch.equal(q0.inner.weight, ref)


def test_size_one_serves_the_merged_adapter(ranked, tmp_path):
    base, tasks = ranked
    bundle = AdapterMerge(cfg(base, tasks)).merge(1, tmp_path / "one")
    mt = MultiTaskModel.from_bundle(tmp_path / "one")
    ref = peft_out(base, export_adapter(bundle, "a", tmp_path / "exp"))
    for t in tasks:
        torch.testing.assert_close(served(mt, t), ref, rtol=1e-5, atol=1e-5)
    assert all(mt.variants(n) == 1 for n in mt._routed)


def test_ia3_served_as_peft(tmp_path):
    base = make_base(tmp_path)
    tasks = save_random_adapters(
        tmp_path, lambda: transformers.BertModel.from_pretrained(base),
        [peft.IA3Config(target_modules=["key", "intermediate.dense"], feedforward_modules=["intermediate.dense"])
         for _ in range(2)], "ia3_l", 0.2, 40, "i", add=True)
    fm = AdapterMerge(cfg(base, tasks))
    fm.merge(2, tmp_path / "full")
    mt = MultiTaskModel.from_bundle(tmp_path / "full")
    x = {t: inputs() for t in tasks}
    with torch.no_grad():
        mixed = mt(x)
    for t, path in tasks.items():
        assert torch.equal(served(mt, t), peft_out(base, path))  # one task: PEFT's ops, bit for bit
        torch.testing.assert_close(mixed[t].last_hidden_state, peft_out(base, path), rtol=1e-5, atol=1e-5)
    one = fm.merge(1, tmp_path / "one")
    mt1 = MultiTaskModel.from_bundle(tmp_path / "one")
    ref = peft_out(base, export_adapter(one, "i0", tmp_path / "exp"))
    torch.testing.assert_close(served(mt1, "i1"), ref, rtol=1e-6, atol=1e-6)


def test_serving_errors_are_one_line(ranked, tmp_path):
    base, tasks = ranked
    AdapterMerge(cfg(base, tasks)).merge(3, tmp_path / "bundle")
    other = make_base(tmp_path / "o")  # same shapes, other weights
    torch.manual_seed(1)
    m = transformers.BertModel.from_pretrained(other)
    with torch.no_grad():
        m.encoder.layer[0].attention.self.query.weight.add_(1.0)
    m.save_pretrained(other)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    manifest_base = manifest["sources"]["base"]["path"]
    import shutil
    shutil.rmtree(manifest_base)
    shutil.copytree(other, manifest_base)
    with pytest.raises(FlexMergeError, match=r"base model .* differs from the one the bundle was merged from"):
        MultiTaskModel.from_bundle(tmp_path / "bundle")
    mt = MultiTaskModel.from_bundle(tmp_path / "bundle", base=other)  # explicitly given: taken as is
    assert served(mt, "a").shape == peft_out(other, tasks["a"]).shape
    one_layer = make_base(tmp_path / "w", layers=1)
    with pytest.raises(FlexMergeError, match=r"adapts module 'encoder.layer.1.*base model has not"):
        MultiTaskModel.from_bundle(tmp_path / "bundle", base=one_layer)


# ---- adapters of different ranks (flexmerge.adapters.source.RANK_RULE) -------------------------
def test_different_ranks_sizes_count_the_stored_factors(ranked, tmp_path):
    base, tasks = ranked
    fm = AdapterMerge(cfg(base, tasks))
    ms = fm.models
    q, v = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.value.weight"
    assert ms.modules[q].ranks == [2, 4, 3] and ms.modules[q].rank == 4
    assert ms.modules[v].ranks == [1, 4, 2] and ms.modules[v].rank == 4
    for w in (q, v):  # Grams from factors of ranks (2, 4, 3) and (1, 4, 2): r_i x r_j blocks at their offsets
        dense = torch.stack([ms.delta(t, w).double().reshape(-1) for t in range(3)])
        ref = dense @ dense.T
        torch.testing.assert_close(torch.from_numpy(ms.factor_gram(w)), ref, rtol=1e-5, atol=1e-6 * float(ref.max()))
    # one unit: per layer, query and value at the stored rank 4: 2 * 4 * (16 + 16) floats of 4 bytes, 2 layers
    unit = 2 * 2 * 4 * (16 + 16) * 4
    assert fm.cost.unit_bytes == unit
    for size in (3, 2, 1):
        bundle = fm.merge(size, tmp_path / f"b{size}")
        assert stored_bytes(tmp_path / f"b{size}", bundle.manifest) == bundle.size_bytes <= size * unit
    # size N: the exports are the adapters, tensor for tensor (padding sliced off)
    from safetensors.torch import load_file
    bundle_n = AdapterMerge(cfg(base, tasks)).merge(3)
    for t, path in tasks.items():
        out = export_adapter(bundle_n, t, tmp_path / f"e-{t}")
        got, want = (load_file(str(p / "adapter_model.safetensors")) for p in (out, path))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert json.loads((out / "adapter_config.json").read_text()) == json.loads((path / "adapter_config.json").read_text())
    assert bundle_n.manifest["adapter"]["rank_rule"] == "max"


def test_different_ranks_merge_exactly_when_the_sum_fits_the_stored_rank(tmp_path):
    """a has rank 2; b has rank 4 and contains a's factors: dW_a + dW_b has rank <= 4, so the
    merged group (rank 4) holds lambda * (dW_a + dW_b) / 2 exactly (to float32 rounding)."""
    base = make_base(tmp_path)
    a = make_lora(base, tmp_path / "a", 1, r=2, lora_alpha=2)  # s = 1
    b = make_lora(base, tmp_path / "b", 2, r=4, lora_alpha=4)  # s = 1
    from safetensors.torch import load_file, save_file
    fa, fb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    for k in fb:
        if "lora_A" in k:
            fb[k][:2] = fa[k]
        else:
            fb[k][:, :2] = fa[k]
    save_file(fb, str(b / "adapter_model.safetensors"))
    fm = AdapterMerge(cfg(base, {"a": a, "b": b}, method={"name": "task_arithmetic", "lambda": 1.0}))
    g = fm.models.factor_gram("encoder.layer.1.attention.self.query.weight")  # ranks 2 and 4
    da, db = (fm.models.delta(t, "encoder.layer.1.attention.self.query.weight").double().reshape(-1) for t in (0, 1))
    torch.testing.assert_close(torch.from_numpy(g), torch.tensor([[da @ da, da @ db], [db @ da, db @ db]]),
                               rtol=1e-5, atol=1e-6)
    bundle = fm.merge(1)
    out = export_adapter(bundle, "a", tmp_path / "merged")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 2 and all(v == 4 for v in conf["rank_pattern"].values())  # merged modules at rank 4
    pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base), str(out))
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight"):
            w = name.removeprefix("base_model.model.") + ".weight"
            want = (fm.models.delta(0, w) + fm.models.delta(1, w)) / 2
            torch.testing.assert_close(mod.get_delta_weight("default").detach(), want, rtol=1e-4, atol=1e-5)


def test_different_layer_shapes_or_dtypes_still_refused(ranked, tmp_path):
    base, tasks = ranked
    half = tmp_path / "half"
    half.mkdir()
    from safetensors.torch import load_file, save_file
    sd = {k: v.half() for k, v in load_file(str(tasks["a"] / "adapter_model.safetensors")).items()}
    save_file(sd, str(half / "adapter_model.safetensors"))
    (half / "adapter_config.json").write_text((tasks["a"] / "adapter_config.json").read_text())
    with pytest.raises(FlexMergeError, match=r"adapter 'x'.*float16.*same layer shapes and dtype per module \(LoRA "
                                             r"ranks may differ\)"):
        AdapterMerge(cfg(base, {**tasks, "x": half}))
    conf = json.loads((tasks["a"] / "adapter_config.json").read_text())
    conf["r"] = 5  # the factors have rank 2 (query): export and serving would read the wrong rank
    (half / "adapter_config.json").write_text(json.dumps(conf))
    save_file(load_file(str(tasks["a"] / "adapter_model.safetensors")), str(half / "adapter_model.safetensors"))
    with pytest.raises(FlexMergeError, match=r"adapter 'x'.*module 'encoder.layer.0.attention.self.query' has rank 2 "
                                             r"factors but its adapter_config.json gives rank 5"):
        AdapterMerge(cfg(base, {**tasks, "x": half}))


def test_modules_to_save_heads_are_routed_per_task(tmp_path):
    """LoRA adapters of a classifier with their own ``modules_to_save`` head: each task's rows run
    its own head (task-specific tensors), the LoRA side paths as elsewhere."""
    torch.manual_seed(0)
    conf = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=32, num_labels=3)
    transformers.BertForSequenceClassification(conf).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    tasks = {}
    for i in range(2):
        model = transformers.BertForSequenceClassification.from_pretrained(base)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                        init_lora_weights=False, modules_to_save=["classifier"]))
        gen = torch.Generator().manual_seed(60 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        pm.save_pretrained(tmp_path / f"h{i}")
        tasks[f"h{i}"] = tmp_path / f"h{i}"
    bundle = AdapterMerge(cfg(base, tasks)).merge(1, tmp_path / "one")
    mt = MultiTaskModel.from_bundle(tmp_path / "one")
    x = {t: inputs() for t in tasks}
    with torch.no_grad():
        mixed = mt(x)
    for t in tasks:
        out = export_adapter(bundle, t, tmp_path / f"e-{t}")
        pm = peft.PeftModel.from_pretrained(transformers.BertForSequenceClassification.from_pretrained(base), str(out))
        with torch.no_grad():
            ref = pm.eval()(**inputs()).logits
        torch.testing.assert_close(mixed[t].logits, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed["h0"].logits, mixed["h1"].logits)  # own heads


def test_gpt2_conv1d_fan_in_fan_out_served(tmp_path):
    """GPT-2's Conv1D (``fan_in_fan_out``): the side path is PEFT's ``B (A x)`` on the input, whatever the
    base weight's layout; size N bit for bit, size 1 equal to the export."""
    torch.manual_seed(0)
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                                   n_positions=32)).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    tasks = save_random_adapters(
        tmp_path, lambda: transformers.GPT2Model.from_pretrained(base),
        [peft.LoraConfig(r=2 + i, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
         for i in range(2)], "lora_", 0.3, 50, "g")
    x = {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}

    def run(adapter_dir):
        pm = peft.PeftModel.from_pretrained(transformers.GPT2Model.from_pretrained(base), str(adapter_dir)).eval()
        with torch.no_grad():
            return pm(**x).last_hidden_state
    fm = AdapterMerge(cfg(base, tasks, method={"name": "task_arithmetic", "lambda": 1.0}))
    fm.merge(2, tmp_path / "full")
    mt = MultiTaskModel.from_bundle(tmp_path / "full")
    for t, path in tasks.items():
        assert torch.equal(served(mt, t, x), run(path))
    one = fm.merge(1, tmp_path / "one")
    mt1 = MultiTaskModel.from_bundle(tmp_path / "one")
    with torch.no_grad():
        mixed = mt1({t: x for t in tasks})
    ref = run(export_adapter(one, "g1", tmp_path / "exp"))
    for t in tasks:
        torch.testing.assert_close(mixed[t].last_hidden_state, ref, rtol=1e-5, atol=1e-5)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_plain_torch_model_with_model_factory(tmp_path):
    """A non-HF base: ``model_factory()`` builds it, the base checkpoint's tensors are assigned by name."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(_Tiny().state_dict(), str(tmp_path / "base.safetensors"))

    def base_model():
        m = _Tiny()
        from safetensors.torch import load_file
        m.load_state_dict(load_file(str(tmp_path / "base.safetensors")))
        return m.eval()
    tasks = {}
    for i in range(2):
        pm = peft.get_peft_model(base_model(), peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=["fc1", "fc2"],
                                                               init_lora_weights=False))
        pm.save_pretrained(tmp_path / f"p{i}")
        tasks[f"p{i}"] = tmp_path / f"p{i}"
    AdapterMerge(cfg(tmp_path / "base.safetensors", tasks)).merge(2, tmp_path / "full")
    mt = MultiTaskModel.from_bundle(tmp_path / "full", model_factory=_Tiny)
    x = {t: torch.randn(4 + i, 8, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(tasks)}
    with torch.no_grad():
        mixed = mt(x)
        for t, path in tasks.items():
            ref = peft.PeftModel.from_pretrained(base_model(), str(path)).eval()(x[t])
            assert torch.equal(mt({t: x[t]})[t], ref)
            torch.testing.assert_close(mixed[t], ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(FlexMergeError, match=r"model parameter 'extra.weight' is not in the base checkpoint"):
        MultiTaskModel.from_bundle(tmp_path / "full", model_factory=lambda: torch.nn.ModuleDict(
            {"fc1": torch.nn.Linear(8, 8), "fc2": torch.nn.Linear(8, 4), "extra": torch.nn.Linear(2, 2)}))


def test_excluded_modules_keep_each_tasks_own_factors(ranked, tmp_path):
    base, tasks = ranked
    fm = AdapterMerge(cfg(base, tasks, exclude=[r"layer\.1\.attention\.self\.value"]))
    bundle = fm.merge(1, tmp_path / "one")
    assert any("layer.1.attention.self.value.lora_A" in n for n in bundle.manifest["task_specific"]["b"]["names"])
    mt = MultiTaskModel.from_bundle(tmp_path / "one")
    side = mt.model.get_submodule("encoder.layer.1.attention.self.value")
    assert mt.variants("encoder.layer.1.attention.self.value") == 3 and side._scales[1] == 8 / 4 ** 0.5  # b: rslora
    for t in tasks:
        ref = peft_out(base, export_adapter(bundle, t, tmp_path / f"e-{t}"))
        torch.testing.assert_close(served(mt, t), ref, rtol=1e-5, atol=1e-5)


def test_http_serve_answers_an_adapter_bundle_like_multitaskmodel(ranked, tmp_path):
    """``flexmerge serve`` (its server, in-process) over an adapter bundle: per-task and batch routes
    give MultiTaskModel's outputs; token ids past the base's vocabulary are a 400."""
    import threading

    from flexmerge.serve import make_server

    base, tasks = ranked
    AdapterMerge(cfg(base, tasks)).merge(2, tmp_path / "bundle")
    mt = MultiTaskModel.from_bundle(tmp_path / "bundle")
    server = make_server(mt, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"

    def post(path, body):
        return post_json(url, path, body)

    try:
        x = {"input_ids": [[1, 5, 7, 2], [3, 3, 9, 4]], "attention_mask": [[1, 1, 1, 1], [1, 1, 1, 0]]}
        tensors = {k: torch.tensor(v) for k, v in x.items()}
        for t in tasks:
            status, body = post(f"/tasks/{t}", {"inputs": x})
            assert status == 200, body
            torch.testing.assert_close(torch.tensor(body["outputs"]["last_hidden_state"]),
                                       served(mt, t, tensors), rtol=1e-6, atol=1e-6)
        status, body = post("/batch", {"inputs": {t: x for t in tasks}})
        assert status == 200 and set(body["outputs"]) == set(tasks)
        vocab = mt.model.get_input_embeddings().weight.shape[0]
        status, body = post("/tasks/a", {"inputs": {"input_ids": [[vocab]]}})
        assert status == 400 and f"outside [0, {vocab})" in body["error"]
    finally:
        server.shutdown()
        server.server_close()
