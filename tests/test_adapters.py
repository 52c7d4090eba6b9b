"""PEFT adapters in and out: task vectors, Grams from factors, sizes in adapter
units, exact originals at size N, task arithmetic and TIES against PEFT's own merges, PEFT loads
every export, mixed batches from an adapter set."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from helpers import stored_bytes  # noqa: E402

from flexmerge.adapters import open_job  # noqa: E402
from flexmerge.adapters.engine import AdapterMerge, low_rank  # noqa: E402
from flexmerge.adapters.export import export_adapter, export_adapter_set, load_adapter_set  # noqa: E402
from flexmerge.errors import FlexMergeError  # noqa: E402
from flexmerge.plan import Grouping  # noqa: E402


def tiny_bert(layers: int = 2) -> "transformers.BertModel":
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def make_base(tmp_path, layers: int = 2):
    model = tiny_bert(layers)
    path = tmp_path / "base"
    model.save_pretrained(path)
    return path


def save_random_adapters(root, load_base, configs, marker: str, scale: float, seed: int, prefix: str,
                         add: bool = False) -> dict:
    """One PEFT adapter per config on ``load_base()``, its parameters named with ``marker`` set to
    (``add``: shifted by) seeded ``scale``·N(0, 1) draws, saved as ``root/<prefix><i>``."""
    tasks = {}
    for i, config in enumerate(configs):
        pm = peft.get_peft_model(load_base(), config)
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if marker in name:
                    noise = torch.randn(p.shape, generator=gen) * scale
                    p.add_(noise) if add else p.copy_(noise)
        pm.save_pretrained(root / f"{prefix}{i}")
        tasks[f"{prefix}{i}"] = root / f"{prefix}{i}"
    return tasks


def make_lora(base_dir, out, seed: int, shared_a: dict | None = None, **lora_kw):
    """A LoRA adapter of the base with random non-zero factors; ``shared_a``: module -> A to reuse."""
    model = transformers.BertModel.from_pretrained(base_dir)
    kw = dict(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    kw.update(lora_kw)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                if shared_a is not None and "lora_A" in name:
                    p.copy_(shared_a.setdefault(name, p.detach().clone()))
    pm.save_pretrained(out)
    return out


def inputs():
    gen = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(0, 50, (3, 9), generator=gen), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


def peft_out(base_dir, adapter_dir):
    model = transformers.BertModel.from_pretrained(base_dir).eval()
    pm = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(**inputs()).last_hidden_state


def delta_of(base_dir, adapter_dir, module_suffix):
    """PEFT's own dW (get_delta_weight) of the first module ending with ``module_suffix``."""
    pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base_dir), str(adapter_dir))
    for name, mod in pm.named_modules():
        if name.endswith(module_suffix) and hasattr(mod, "get_delta_weight"):
            return mod.get_delta_weight("default").detach()
    raise KeyError(module_suffix)


@pytest.fixture()
def lora_set(tmp_path):
    base = make_base(tmp_path)
    # alpha, rslora, alpha_pattern differ; every adapter has the same ranks (value: 3, query: 2)
    tasks = {"a": make_lora(base, tmp_path / "a", 1, rank_pattern={"value": 3}),
             "b": make_lora(base, tmp_path / "b", 2, lora_alpha=8, use_rslora=True, rank_pattern={"value": 3}),
             "c": make_lora(base, tmp_path / "c", 3, alpha_pattern={"value": 2.0}, rank_pattern={"value": 3})}
    return base, tasks


def cfg(base, tasks, **kw):
    return {"base": str(base), "tasks": {t: str(p) for t, p in tasks.items()}, **kw}


def test_task_vectors_equal_peft_delta_and_gram_from_factors_equals_dense(lora_set):
    base, tasks = lora_set
    fm = AdapterMerge(cfg(base, tasks))
    ms = fm.models
    w = "encoder.layer.1.attention.self.value.weight"
    for t, (name, path) in enumerate(tasks.items()):  # alpha, rslora, alpha_pattern, rank_pattern as PEFT
        ours = ms.delta(t, w)
        ref = delta_of(base, path, "layer.1.attention.self.value")
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    for w in ms.modules:
        rows = []
        for t in range(3):  # dW in float64 from the factors (the float32 dW is checked against PEFT above)
            a, b = (x.to(torch.float64) for x in ms.factors(t, w))
            rows.append((ms.modules[w].scales[t] * (b @ a)).reshape(-1))
        dense = torch.stack(rows)
        ref = dense @ dense.T  # products in float32 accumulated in float64, as flexmerge.similarity.gram
        tol = dict(rtol=1e-5, atol=1e-6 * float(ref.diagonal().max()))
        torch.testing.assert_close(torch.from_numpy(ms.factor_gram(w)), ref, **tol)
        torch.testing.assert_close(torch.from_numpy(ms._dense_gram(w)), ref, **tol)  # the large-N r path
    assert ms.modules[w].rank in (2, 3)


def test_blocks_and_sizes_in_adapter_units(lora_set, tmp_path):
    base, tasks = lora_set
    fm = AdapterMerge(cfg(base, tasks))
    names = [b.name for b in fm.blockmap.blocks]
    assert names == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    # one adapter unit = the bytes of one adapter's factors: query r=2, value r=3, 16 x 16 weights, fp32
    unit = 2 * ((2 * 16 + 16 * 2) + (3 * 16 + 16 * 3)) * 4
    assert fm.cost.unit_bytes == unit
    plan = fm.plan()
    assert plan.max_bytes == 3 * unit and plan.min_bytes == unit and plan.min_units == 1.0
    for size in (3, 2, 1):
        out = tmp_path / f"bundle{size}"
        bundle = fm.merge(size, out)
        assert stored_bytes(out, bundle.manifest) == bundle.size_bytes <= size * unit


def test_size_n_exports_reproduce_each_adapter_exactly(lora_set, tmp_path):
    base, tasks = lora_set
    fm = AdapterMerge(cfg(base, tasks))
    bundle = fm.merge(3, tmp_path / "bundle")
    for t, path in tasks.items():
        out = export_adapter(bundle, t, tmp_path / f"exp-{t}")
        assert torch.equal(peft_out(base, out), peft_out(base, path))


def test_size_one_task_arithmetic_equals_peft_svd_and_cat(tmp_path):
    base = make_base(tmp_path)
    shared: dict = {}
    tasks = {f"t{i}": make_lora(base, tmp_path / f"t{i}", 10 + i, shared_a=shared) for i in range(3)}
    fm = AdapterMerge(cfg(base, tasks, method={"name": "task_arithmetic", "lambda": 0.9}))
    bundle = fm.merge(1, tmp_path / "bundle")
    out = export_adapter(bundle, "t1", tmp_path / "merged")
    weight = 0.9 / 3  # flexmerge's lambda scales the mean: PEFT weight = lambda / N
    model = transformers.BertModel.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(model, str(tasks["t0"]), adapter_name="t0")
    for t in ("t1", "t2"):
        pm.load_adapter(str(tasks[t]), adapter_name=t)
    pm.add_weighted_adapter(list(tasks), [weight] * 3, "cat", combination_type="cat")
    pm.add_weighted_adapter(list(tasks), [weight] * 3, "svd", combination_type="svd", svd_rank=2)
    ours_pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base), str(out)).eval()
    pm.eval()
    with torch.no_grad():
        ours = ours_pm(**inputs()).last_hidden_state
        for name in ("cat", "svd"):  # shared A: the merged dW has rank 2 and both are exact
            pm.set_adapter(name)
            torch.testing.assert_close(ours, pm(**inputs()).last_hidden_state, rtol=1e-5, atol=1e-5)
    # without shared A: equal to PEFT's svd (the best rank-r dW), and to cat's dW truncated to rank r
    tasks = {f"u{i}": make_lora(base, tmp_path / f"u{i}", 20 + i) for i in range(3)}
    bundle = AdapterMerge(cfg(base, tasks, method={"name": "task_arithmetic", "lambda": 0.9})).merge(1)
    pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base), str(tasks["u0"]), adapter_name="u0")
    for t in ("u1", "u2"):
        pm.load_adapter(str(tasks[t]), adapter_name=t)
    pm.add_weighted_adapter(list(tasks), [weight] * 3, "cat", combination_type="cat")
    pm.add_weighted_adapter(list(tasks), [weight] * 3, "svd", combination_type="svd", svd_rank=2)
    sd = bundle.state_dict("u0")
    for name, mod in pm.named_modules():
        if not name.endswith(("query", "value")) or not hasattr(mod, "get_delta_weight"):
            continue
        key = name.removeprefix("base_model.model.")
        a = sd[f"base_model.model.{key}.lora_A.weight"]
        b = sd[f"base_model.model.{key}.lora_B.weight"]
        cat = mod.get_delta_weight("cat").detach()
        torch.testing.assert_close(b @ a, mod.get_delta_weight("svd").detach(), rtol=1e-5, atol=1e-6)
        u, s, vh = torch.linalg.svd(cat.double())
        torch.testing.assert_close((b @ a).double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-6)


def test_ties_equals_peft_ties_svd_on_one_module(tmp_path):
    """One adapted module: flexmerge's global top-k trim is PEFT's per-tensor ``density`` prune,
    and the disjoint mean x lambda is PEFT's ``ties`` with weight lambda (a mean, not a sum)."""
    base = make_base(tmp_path, layers=1)
    tasks = {f"t{i}": make_lora(base, tmp_path / f"t{i}", 30 + i, target_modules=["query"], r=3)
             for i in range(3)}
    fm = AdapterMerge(cfg(base, tasks, method={"name": "ties", "k": 0.3, "lambda": 0.7}))
    sd = fm.merge(1).state_dict("t0")
    pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base), str(tasks["t0"]), adapter_name="t0")
    for t in ("t1", "t2"):
        pm.load_adapter(str(tasks[t]), adapter_name=t)
    pm.add_weighted_adapter(list(tasks), [0.7] * 3, "ties", combination_type="ties_svd", density=0.3, svd_rank=3)
    mod = pm.base_model.model.encoder.layer[0].attention.self.query
    key = "base_model.model.encoder.layer.0.attention.self.query"
    ours = sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
    torch.testing.assert_close(ours, mod.get_delta_weight("ties").detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("crossed", [False, True])
def test_adapter_set_serves_mixed_batches_with_shared_tensors(lora_set, tmp_path, crossed):
    base, tasks = lora_set
    fm = AdapterMerge(cfg(base, tasks))
    if crossed:  # block 0 merges a+b, block 1 merges b+c: three adapters, each sharing a group
        groups = {"encoder.layer.0.attention": [(0, 1), (2,)], "encoder.layer.1.attention": [(0,), (1, 2)]}
        nbytes = fm.cost.block_cost(0, [2, 1]) + fm.cost.block_cost(1, [1, 2])
        bundle = fm.merge(grouping=Grouping(groups, 2, nbytes, fm.cost.units(nbytes)))
    else:  # the plan at 2 units: a and c share both blocks, so they share one adapter
        bundle = fm.merge(2, tmp_path / "bundle")
        assert [g["tasks"] for g in bundle.blocks[0].groups] == [["a", "c"], ["b"]] == \
            [g["tasks"] for g in bundle.blocks[1].groups]
    folder = export_adapter_set(bundle, tmp_path / "set")
    meta = json.loads((folder / "adapters.json").read_text())
    assert meta["tasks"] == ({"a": "a", "b": "b", "c": "c"} if crossed else {"a": "a", "b": "b", "c": "a"})
    pm, task_to_adapter = load_adapter_set(transformers.BertModel.from_pretrained(base), folder)
    pm.eval()
    x = inputs()
    rows = ["a", "b", "c"]
    with torch.no_grad():
        mixed = pm(**x, adapter_names=[task_to_adapter[t] for t in rows]).last_hidden_state
    for i, t in enumerate(rows):
        single = peft_out(base, export_adapter(bundle, t, tmp_path / f"one-{t}"))
        torch.testing.assert_close(mixed[i], single[i], rtol=1e-5, atol=1e-6)
    # a stored tensor used by several adapters is one parameter in memory
    params = dict(pm.named_parameters(remove_duplicate=False))
    by_src: dict = {}
    for name, srcs in meta["sources"].items():
        for key, src in srcs.items():
            for f in ("lora_A", "lora_B"):
                key = key.replace(f".{f}.weight", f".{f}.{name}.weight")
            by_src.setdefault(src, []).append(params[key])
    shared = [ps for ps in by_src.values() if len(ps) > 1]
    assert bool(shared) == crossed and all(p is ps[0] for ps in shared for p in ps)


def test_low_rank_is_exact_within_rank_and_pads():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 2, generator=gen) @ torch.randn(2, 5, generator=gen)
    a, b = low_rank(m, 3)
    assert a.shape == (3, 5) and b.shape == (6, 3)
    torch.testing.assert_close(b @ a, m, rtol=1e-5, atol=1e-5)
    a, b = low_rank(torch.randn(2, 4, generator=gen), 3)  # rank above min(out, in): zero rows
    assert a.shape == (3, 4) and torch.equal(a[2], torch.zeros(4))


def test_ia3_size_n_exact_and_size_one_mean(tmp_path):
    base = make_base(tmp_path)
    tasks = save_random_adapters(
        tmp_path, lambda: transformers.BertModel.from_pretrained(base),
        [peft.IA3Config(target_modules=["key", "intermediate.dense"], feedforward_modules=["intermediate.dense"])
         for _ in range(2)], "ia3_l", 0.2, 40, "i", add=True)
    fm = AdapterMerge(cfg(base, tasks, method={"name": "task_arithmetic", "lambda": 1.0}))
    assert fm.cost.unit_bytes == 2 * (16 + 16) * 4  # per layer: key's [16, 1] and intermediate's [1, 16], fp32
    full = fm.merge(2, tmp_path / "full")
    for t, path in tasks.items():
        assert torch.equal(peft_out(base, export_adapter(full, t, tmp_path / f"e{t}")), peft_out(base, path))
    one = fm.merge(1)
    from safetensors.torch import load_file
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in tasks.values())
    for k, v in one.state_dict("i0").items():
        torch.testing.assert_close(v, 1 + ((a[k] - 1) + (b[k] - 1)) / 2)


def test_mask_methods_are_refused(lora_set):
    base, tasks = lora_set
    with pytest.raises(FlexMergeError, match="emr.*plain method"):
        AdapterMerge(cfg(base, tasks, method="emr"))


def test_open_job_picks_adapters(lora_set):
    base, tasks = lora_set
    assert isinstance(open_job(cfg(base, tasks)), AdapterMerge)


def test_bad_adapter_sets_are_one_line_errors(lora_set, tmp_path):
    base, tasks = lora_set
    other = make_lora(base, tmp_path / "other", 5, rank_pattern={"value": 3}, target_modules=["query", "key", "value"])
    with pytest.raises(FlexMergeError, match=r"adapter 'x'.*target_modules"):
        AdapterMerge(cfg(base, {**tasks, "x": other}))
    moved = tmp_path / "moved"
    moved.mkdir()
    conf = json.loads((tasks["a"] / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "some/other-model"
    (moved / "adapter_config.json").write_text(json.dumps(conf))
    (moved / "adapter_model.safetensors").write_bytes((tasks["a"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(FlexMergeError, match=r"adapter 'x'.*base_model_name_or_path"):
        AdapterMerge(cfg(base, {**tasks, "x": moved}))
    (moved / "adapter_model.safetensors").unlink()
    with pytest.raises(FlexMergeError, match=r"adapter 'x'.*adapter_model.safetensors is missing"):
        AdapterMerge(cfg(base, {**tasks, "x": moved}))
    wide = make_base(tmp_path / "w", layers=1)
    with pytest.raises(FlexMergeError, match=r"base .* no weight of adapted module 'encoder.layer.1"):
        AdapterMerge(cfg(wide, tasks))


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D stores W as [in, out]: dW = (s B A)^T, merged factors of the transpose."""
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                                           n_positions=32)).eval()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tasks = save_random_adapters(
        tmp_path, lambda: transformers.GPT2Model.from_pretrained(base),
        [peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
         for _ in range(2)], "lora_", 0.3, 50, "g")
    fm = AdapterMerge(cfg(base, tasks, method={"name": "task_arithmetic", "lambda": 1.0}))
    assert [b.name for b in fm.blockmap.blocks] == ["h.0.attn", "h.1.attn"]
    x = {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}

    def run(adapter_dir, name="default", pm=None):
        pm = pm or peft.PeftModel.from_pretrained(transformers.GPT2Model.from_pretrained(base), str(adapter_dir)).eval()
        with torch.no_grad():
            return pm(**x).last_hidden_state
    full = fm.merge(2)
    for t, path in tasks.items():
        assert torch.equal(run(export_adapter(full, t, tmp_path / f"e{t}")), run(path))
    one = export_adapter(fm.merge(1), "g0", tmp_path / "one")
    pm = peft.PeftModel.from_pretrained(transformers.GPT2Model.from_pretrained(base), str(tasks["g0"]), adapter_name="g0")
    pm.load_adapter(str(tasks["g1"]), adapter_name="g1")
    pm.add_weighted_adapter(["g0", "g1"], [0.5, 0.5], "svd", combination_type="svd", svd_rank=2)
    pm.set_adapter("svd")
    torch.testing.assert_close(run(one), run(None, pm=pm.eval()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", __import__("flexmerge.methods", fromlist=["available_methods"]).available_methods())
def test_every_method_on_adapters(lora_set, tmp_path, name):
    """Every registered method runs on the dense dW stacks: stored bytes equal the plan at every size, a
    merged group's factors reproduce its method's merge truncated to the members' rank, and the export
    loads in PEFT; mask methods are refused in one line."""
    from flexmerge.methods import method_class

    base, tasks = lora_set
    if method_class(name).stores_masks or method_class(name).stores_scalars:
        with pytest.raises(FlexMergeError, match="plain method"):
            AdapterMerge(cfg(base, tasks, method=name))
        return
    from test_conformance import FEWER_STEPS

    fm = AdapterMerge(cfg(base, tasks, method={"name": name, **FEWER_STEPS.get(name, {})}))
    plan = fm.plan()
    for size in (plan.max_units, 2, 1):
        out = tmp_path / f"b{size}"
        bundle = fm.merge(size, out)
        assert stored_bytes(out, bundle.manifest) == bundle.size_bytes == plan.at(size).size_bytes
    got = peft_out(base, export_adapter(bundle, "a", tmp_path / "exp"))
    assert torch.isfinite(got).all()
    w = "encoder.layer.0.attention.self.query.weight"
    ms = fm.models
    taus = ms.deltas(w, range(3))
    from flexmerge.methods.base import GroupInput
    if fm.method.has_transform:
        taus = fm.method.transform(w, taus)
    block = fm.blockmap.blocks[0]
    tv = {p: (taus if p == w else fm.method.transform(p, ms.deltas(p, range(3))) if fm.method.has_transform
              else ms.deltas(p, range(3))) for p in block.params}
    merged = fm.method.merge(GroupInput(tv, {p: ms.base_tensor(p) for p in block.params}, [0, 1, 2],
                                        block=block.name, seed=fm.method.seed)).merged[w].double()
    s = torch.linalg.svdvals(merged)
    key = "base_model.model.encoder.layer.0.attention.self.query"
    sd = bundle.state_dict("a")
    ours = (sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]).double()
    # the best rank-2 approximation (Eckart-Young): its error is the tail of the spectrum (a value
    # unique even where the spectrum is flat, as Iso-C's, and the truncation is not)
    assert float(torch.linalg.matrix_norm(merged - ours) ** 2) == pytest.approx(float((s[2:] ** 2).sum()),
                                                                                 rel=1e-4, abs=1e-9)
