"""Tiny models built in-process (several families) and checkpoints written in each format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def bert_like(seed: int = 0, hidden: int = 8, layers: int = 2, vocab: int = 16, labels: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"bert.embeddings.word_embeddings.weight": r(vocab, hidden),
          "bert.embeddings.position_embeddings.weight": r(6, hidden),
          "bert.embeddings.LayerNorm.weight": r(hidden), "bert.embeddings.LayerNorm.bias": r(hidden)}
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + m + ".weight"] = r(hidden, hidden)
            sd[p + m + ".bias"] = r(hidden)
        sd[p + "attention.output.LayerNorm.weight"] = r(hidden)
        sd[p + "attention.output.LayerNorm.bias"] = r(hidden)
        sd[p + "intermediate.dense.weight"] = r(2 * hidden, hidden)
        sd[p + "intermediate.dense.bias"] = r(2 * hidden)
        sd[p + "output.dense.weight"] = r(hidden, 2 * hidden)
        sd[p + "output.dense.bias"] = r(hidden)
        sd[p + "output.LayerNorm.weight"] = r(hidden)
        sd[p + "output.LayerNorm.bias"] = r(hidden)
    sd["classifier.weight"] = r(labels, hidden)
    sd["classifier.bias"] = r(labels)
    return sd


def gpt2_like(seed: int = 0, hidden: int = 8, layers: int = 2, vocab: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": r(vocab, hidden), "transformer.wpe.weight": r(6, hidden)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = r(hidden)
        sd[p + "attn.c_attn.weight"] = r(hidden, 3 * hidden)
        sd[p + "attn.c_proj.weight"] = r(hidden, hidden)
        sd[p + "ln_2.weight"] = r(hidden)
        sd[p + "mlp.c_fc.weight"] = r(hidden, 4 * hidden)
        sd[p + "mlp.c_proj.weight"] = r(4 * hidden, hidden)
    sd["transformer.ln_f.weight"] = r(hidden)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, as in GPT-2
    return sd


def llama_like(seed: int = 0, hidden: int = 8, layers: int = 2, vocab: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"model.embed_tokens.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{m}.weight"] = r(hidden, hidden)
        for m, shape in (("gate_proj", (16, hidden)), ("up_proj", (16, hidden)), ("down_proj", (hidden, 16))):
            sd[p + f"mlp.{m}.weight"] = r(*shape)
        sd[p + "input_layernorm.weight"] = r(hidden)
        sd[p + "post_attention_layernorm.weight"] = r(hidden)
    sd["model.norm.weight"] = r(hidden)
    sd["lm_head.weight"] = r(vocab, hidden)
    return sd


def finetune(base: dict, seed: int, scale: float = 0.1, heads: dict | None = None) -> dict:
    """A 'fine-tuned' copy: base + small random task vector; ties of the base are kept."""
    g = torch.Generator().manual_seed(1000 + seed)
    out, seen = {}, {}
    for k, v in base.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            out[k] = out[seen[ptr]]
            continue
        seen[ptr] = k
        out[k] = v + scale * torch.randn(v.shape, generator=g)
    for k, v in (heads or {}).items():
        out[k] = v
    return out


def write_checkpoint(sd: dict, path: Path, kind: str) -> Path:
    """Write ``sd`` as an HF dir, a .safetensors file or a .pt file; return the path."""
    if kind == "hf_dir":
        path.mkdir(parents=True, exist_ok=True)
        seen, clean = set(), {}
        for k, v in sd.items():
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen:
                continue  # HF drops tied duplicates
            seen.add(ptr)
            clean[k] = v.contiguous()
        save_file(clean, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({"model_type": "tiny", "name": path.name}))
        (path / "vocab.txt").write_text("a\nb\n")
        return path
    if kind == "safetensors":
        p = path.with_suffix(".safetensors")
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(p))
        return p
    p = path.with_suffix(".pt")
    torch.save(sd, p)
    return p


@pytest.fixture
def bert_set(tmp_path):
    """A base and three tasks (different head sizes), as a config dict with safetensors files."""
    def make(kind="safetensors", n=3, dtype=torch.float32):
        base = bert_like(0)
        base = {k: v.to(dtype) for k, v in base.items()}
        tasks = {}
        for i in range(n):
            heads = {"classifier.weight": torch.randn(2 + i, 8).to(dtype), "classifier.bias": torch.randn(2 + i).to(dtype)}
            ft = {k: v.to(dtype) for k, v in finetune(base, i, heads=heads).items()}
            tasks[f"t{i}"] = write_checkpoint(ft, tmp_path / f"t{i}", kind)
        bpath = write_checkpoint(base, tmp_path / "base", kind)
        return {"base": str(bpath), "tasks": {k: str(v) for k, v in tasks.items()},
                "exclude": [r"classifier\..*"]}
    return make
