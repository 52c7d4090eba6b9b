"""How a model is cut into blocks: parameter name -> block name, from names alone.

Presets:

* ``component`` (default, FlexMerge Sec. 4 "block granularity"): within each layer the attention
  module, the MLP and each norm are separate blocks; embeddings and other top-level modules are
  their own blocks.
* ``layer``: one block per layer index (top-level modules as in ``component``).
* ``tensor``: one block per tensor.
* ``model``: one block for the whole model: plain whole-model merging (sizes N, N-1, ..., 1), where
  block-level statistics (PCB's normalisation, EMR's rescalers) become the papers' whole-model ones.
* user rules: ordered ``{pattern, block}`` regexes; the first match wins and ``block`` may use the
  pattern's groups. Names no rule matches fall back to ``component``.

A layer is recognised generically as the prefix up to the first all-digit name component
(``encoder.layer.3``, ``model.layers.3``, ``transformer.h.3``, ``encoder.block.3``,
``visual.transformer.resblocks.3``), so BERT, RoBERTa, ViT/CLIP, T5, GPT-2 and Llama-style names
work without per-model code; an unrecognised name gets its own block instead of an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .config import BlockRule
from .errors import FlexMergeError

_MLP_SIBLINGS = {"intermediate", "output", "fc1", "fc2", "c_fc", "wi", "wi_0", "wi_1", "wo", "w1",
                 "w2", "w3", "gate_proj", "up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h"}
_EMBED_NAMES = {"wte", "wpe", "shared", "tok_embeddings", "embed", "pos_embed", "cls_token"}


def _is_norm(comp: str) -> bool:
    c = comp.lower()
    return "norm" in c or re.fullmatch(r"ln(_?[a-z0-9]+)?", c) is not None


def _is_attention(comp: str) -> bool:
    c = comp.lower()
    return "attn" in c or "attention" in c


def _is_mlp(comp: str) -> bool:
    c = comp.lower()
    return (any(k in c for k in ("mlp", "ffn", "feed_forward", "feedforward", "densereludense",
                                 "experts", "moe")) or c in _MLP_SIBLINGS)


def _is_embedding(comp: str) -> bool:
    c = comp.lower()
    return "embed" in c or c in _EMBED_NAMES


def split_layer(name: str) -> tuple[str | None, list[str]]:
    """``"encoder.layer.3.attention.self.query.weight"`` -> ``("encoder.layer.3", [rest...])``."""
    comps = name.split(".")
    for i, c in enumerate(comps[:-1]):
        if i > 0 and c.isdigit():
            return ".".join(comps[: i + 1]), comps[i + 1:]
    return None, comps


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _top_level_block(comps: list[str]) -> str:
    module = comps[:-1]
    for i, c in enumerate(module):
        if _is_norm(c):
            return ".".join(module[: i + 1])
    for i, c in enumerate(comps):
        if _is_embedding(c):
            return ".".join(comps[: i + 1])
    return ".".join(module) if module else comps[-1]


def component_block(name: str) -> str:
    """The ``component`` preset for one parameter name."""
    prefix, rest = split_layer(name)
    if prefix is None:
        return _top_level_block(rest)
    module = rest[:-1]
    for i, c in enumerate(module):
        if _is_norm(c):
            return _join(prefix, *module[: i + 1])
    for i, c in enumerate(module):
        if _is_attention(c):
            return _join(prefix, *module[: i + 1])
    for i, c in enumerate(module):
        if _is_mlp(c):
            if c.lower() in _MLP_SIBLINGS:  # e.g. BERT intermediate + output: one MLP
                return _join(prefix, *module[:i], "mlp")
            return _join(prefix, *module[: i + 1])
    if not module and (_is_attention(rest[-1])):  # e.g. CLIP "attn.in_proj_weight" handled above
        return _join(prefix, "attn")
    return _join(prefix, *module) if module else _join(prefix, rest[-1])


def layer_block(name: str) -> str:
    prefix, rest = split_layer(name)
    return prefix if prefix is not None else _top_level_block(rest)


def _natural_key(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def _order_key(block: str, first_param: str):
    prefix, rest = split_layer(first_param)
    if prefix is None:
        rank = 0 if any(_is_embedding(c) for c in rest) else 2
    else:
        rank = 1
    return (rank, _natural_key(prefix or ""), _natural_key(block))


@dataclass
class Block:
    name: str
    params: list[str]
    numel: int = 0
    nbytes: int = 0


@dataclass
class BlockMap:
    """Blocks in model order (embeddings, then layers in index order, then the rest)."""

    blocks: list[Block]
    excluded: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.index = {b.name: i for i, b in enumerate(self.blocks)}
        self.block_of = {p: b.name for b in self.blocks for p in b.params}

    @property
    def mergeable_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)


def assign_blocks(names: Iterable[str], spec: str | Sequence[BlockRule | dict] = "component") -> dict[str, str]:
    """Map every parameter name to its block name."""
    names = list(names)
    if isinstance(spec, str):
        fn = {"component": component_block, "layer": layer_block, "tensor": lambda n: n,
              "model": lambda n: "model"}.get(spec)
        if fn is None:
            raise FlexMergeError(f"unknown blocks preset '{spec}'; use component, layer, tensor, model or a "
                                 "list of {pattern, block} rules")
        return {n: fn(n) for n in names}
    rules = [r if isinstance(r, BlockRule) else BlockRule(**r) for r in spec]
    compiled = [(re.compile(r.pattern), r.block) for r in rules]
    out = {}
    for n in names:
        for rx, template in compiled:
            m = rx.search(n)
            if m:
                try:
                    out[n] = m.expand(template)
                except (re.error, IndexError) as exc:
                    raise FlexMergeError(f"block rule {rx.pattern!r} -> {template!r}: {exc}; use "
                                         "\\1 or \\g<name> for groups the pattern has") from None
                break
        else:
            out[n] = component_block(n)
    return out


def build_block_map(infos: dict, spec, excluded: Iterable[str] = ()) -> BlockMap:
    """Group mergeable parameters (``infos``: name -> TensorInfo, in any order) into ordered blocks."""
    mapping = assign_blocks(infos, spec)
    grouped: dict[str, Block] = {}
    for name in sorted(infos, key=_natural_key):
        blk = grouped.setdefault(mapping[name], Block(mapping[name], []))
        blk.params.append(name)
        blk.numel += infos[name].numel
        blk.nbytes += infos[name].nbytes
    ordered = sorted(grouped.values(), key=lambda b: _order_key(b.name, b.params[0]))
    return BlockMap(ordered, excluded=sorted(excluded, key=_natural_key))
