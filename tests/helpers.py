"""Helpers shared by the test files (pytest puts ``tests/`` on ``sys.path`` for ``conftest.py``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flexmerge.methods import GroupInput


def group(**stacks) -> GroupInput:
    """A :class:`GroupInput` over zero pretrained tensors: each keyword is a parameter name, its
    value the stacked task vectors ``[g, *shape]`` (a tensor, used as is) or the ``g`` rows
    (lists or tensors, stacked as float32). Task ids are ``0..g-1``."""
    tvs = {n: x if isinstance(x, torch.Tensor)
           else torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in x])
           for n, x in stacks.items()}
    g = next(iter(tvs.values())).shape[0]
    return GroupInput(task_vectors=tvs, base={n: torch.zeros(t.shape[1:]) for n, t in tvs.items()},
                      task_ids=list(range(g)))


DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}


def stored_bytes(root: Path, manifest: dict) -> int:
    """Bytes of the tensors in a bundle's block files on disk, from the safetensors headers."""
    total = 0
    for rel in manifest["files"]:
        if "block-" in rel:
            with safe_open(str(Path(root) / rel), "pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    total += math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
    return total


def save_hf_bert_tasks(root: Path, labels: dict[str, int], config, vocab: list[str] | None = None,
                       scale: float = 0.05) -> dict:
    """A pretrained ``BertForSequenceClassification`` (seed 0) and one fine-tuned copy per task
    (base + ``scale``·N(0, 1) from generator seed 100 + i, the task's own head of ``labels[t]``
    classes), each saved as an HF directory under ``root``; with ``vocab``, a WordPiece tokenizer
    beside each task. ``config(num_labels)`` gives the ``BertConfig``. Returns the merge config."""
    import inspect

    import transformers

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config(2))
    base.save_pretrained(root / "base")
    tasks = {}
    for i, (t, n) in enumerate(labels.items()):
        model = transformers.BertForSequenceClassification(config(n))
        g = torch.Generator().manual_seed(100 + i)
        head = model.state_dict()
        model.load_state_dict({k: (head[k] if k.startswith("classifier.") else
                                   v + scale * torch.randn(v.shape, generator=g))
                               for k, v in base.state_dict().items()})
        model.save_pretrained(root / t)
        if vocab is not None:
            (root / t / "vocab.txt").write_text("\n".join(vocab) + "\n")
            path = str(root / t / "vocab.txt")
            params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
            tok = (transformers.BertTokenizerFast(vocab=path) if "vocab" in params
                   else transformers.BertTokenizerFast(vocab_file=path))
            tok.save_pretrained(str(root / t))
        tasks[t] = str(root / t)
    return {"base": str(root / "base"), "tasks": tasks, "exclude": [r"classifier\..*"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one torch thread avoids OpenMP start-up and spinning on a shared 2-core machine.
    Import it into a test module (``from helpers import one_thread``) to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def module_like(sd):
    """An nn.Module whose parameters have exactly the names of ``sd``."""
    root = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(t), requires_grad=False))
    return root


def post_json(url: str, path: str, body, timeout: float = 30) -> tuple[int, dict]:
    """POST ``body`` as JSON to ``url + path``; ``(status, decoded JSON answer)``, errors included."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def install_text_data(root: Path, files: dict[str, bytes], monkeypatch) -> Path:
    """Write ``files`` (paths relative to the shared data directory -> bytes) under ``root`` and
    make ``flexmerge.bench.datasets`` check them against a manifest of exactly these files."""
    import copy
    import hashlib

    from flexmerge.bench import datasets as ds
    from flexmerge.bench._manifest import MANIFEST

    m = copy.deepcopy(MANIFEST)
    for g in m.values():
        g["files"] = {}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        name = next(k for k, g in MANIFEST.items() if rel in g["files"])
        m[name]["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    monkeypatch.setattr(ds, "MANIFEST", m)
    return root
