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

**Normalisation statistics** (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``;
by name, or by module type with :func:`statistics_of` when a model is at hand) are not weights:
they are never in :attr:`Block.params` (so no Gram matrix, global pass or merge method sees them)
but in :attr:`Block.statistics` of the block they follow, the block of their module's ``weight``
(or, without one, the weight block before them). They never take part in the plan; their storage
rule is in :mod:`flexmerge.sizes`.

**Conv and its BatchNorm are one block** (``component``): a BatchNorm module joins the block of the
convolution right before it under the same parent module (in the checkpoint's key order when that
is the registration order, else by name: ``features.3.1`` after ``features.3.0``, ``bn2`` after
``conv2``). A BatchNorm is a per-channel affine map of its conv's output channels (inference
folds it into the conv), so merging one without the other pairs a conv of one group with the
scaling and statistics of another group's channels.

**Order** (the left-right / right-left ablations follow it): with ``key_order`` (a torch state
dict, whose keys are in module registration order) blocks come in the order of their first
tensor in the checkpoint, so a CNN's stem precedes its layers. Otherwise (safetensors files store
keys sorted by dtype and name, which says nothing about the model): embeddings, then layers in
index order, then the other top-level modules, blocks within a layer by name.
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


STATISTIC_NAMES = ("running_mean", "running_var", "num_batches_tracked")
"""Buffer names of normalisation statistics (``torch.nn`` BatchNorm/InstanceNorm with
``track_running_stats``)."""


def is_statistic(name: str) -> bool:
    """A normalisation statistic by name (the last name component)."""
    return name.rsplit(".", 1)[-1] in STATISTIC_NAMES


def is_variance(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "running_var"


def statistics_of(model) -> set[str]:
    """Names of the normalisation statistics of a torch ``model``, by module type: the buffers of
    every ``_NormBase`` module (BatchNorm, InstanceNorm, SyncBatchNorm and their subclasses)."""
    from torch.nn.modules.batchnorm import _NormBase

    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, _NormBase):
            out.update(_join(mname, b) for b, t in mod.named_buffers(recurse=False) if t is not None)
    return out


@dataclass
class Block:
    name: str
    params: list[str]
    numel: int = 0
    nbytes: int = 0
    statistics: list[str] = field(default_factory=list)
    """Normalisation statistics that follow this block (module docstring); not in ``params``."""
    stats_nbytes: int = 0


@dataclass
class BlockMap:
    """Blocks in model order (module docstring, "Order")."""

    blocks: list[Block]
    excluded: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.index = {b.name: i for i, b in enumerate(self.blocks)}
        self.block_of = {p: b.name for b in self.blocks for p in b.params}

    @property
    def mergeable_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def statistics_bytes(self) -> int:
        return sum(b.stats_nbytes for b in self.blocks)

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


def _module(name: str) -> str:
    return name.rpartition(".")[0]


_NORM_NAME_RX = re.compile(r"(?i)(bn|batchnorm|batch_norm|norm)(\d*)$")


def _conv_before(norm: str, names: list[str], infos: dict, key_order: bool) -> str | None:
    """The convolution module right before BatchNorm module ``norm`` under the same parent."""
    parent, _, last = norm.rpartition(".")
    if key_order:
        first = next(i for i, n in enumerate(names) if _module(n) == norm)
        candidates = [_module(names[first - 1])] if first > 0 else []
    else:
        candidates = []
        if last.isdigit() and int(last) > 0:
            candidates.append(_join(parent, str(int(last) - 1)))
        m = _NORM_NAME_RX.search(last)
        if m:
            candidates.append(_join(parent, last[:m.start()] + "conv" + m.group(2)))
    for c in candidates:
        w = infos.get(_join(c, "weight"))
        if _module(c) == parent and c != norm and w is not None and len(w.shape) >= 3:
            return c
    return None


def _pair_conv_norm(names: list[str], infos: dict, mapping: dict[str, str], stats: set[str],
                    key_order: bool) -> None:
    """``component``: move each BatchNorm module that is a block of its own into the block of the
    convolution right before it (module docstring)."""
    norms = list(dict.fromkeys(_module(s) for s in stats if s.rsplit(".", 1)[-1] != "num_batches_tracked"))
    for norm in norms:
        own = [n for n in names if _module(n) == norm]
        blocks = {mapping[n] for n in own}
        if len(blocks) != 1 or any(mapping[n] in blocks for n in names if _module(n) != norm):
            continue  # the norm already shares a block with other modules
        conv = _conv_before(norm, names, infos, key_order)
        if conv is not None:
            target = mapping[_join(conv, "weight")]
            for n in own:
                mapping[n] = target


def build_block_map(infos: dict, spec, excluded: Iterable[str] = (), *, key_order: bool = False,
                    statistics: Iterable[str] | None = None) -> BlockMap:
    """Group mergeable tensors (``infos``: name -> TensorInfo, in the checkpoint's key order) into
    ordered blocks; normalisation statistics (``statistics``, default: by name) are attached to
    the block they follow. ``key_order``: the key order is the model's registration order (a torch
    state dict), used for block order and conv-BatchNorm pairs (module docstring)."""
    names = list(infos)
    stats = set(statistics) & set(names) if statistics is not None else {n for n in names if is_statistic(n)}
    mapping = assign_blocks(names, spec)
    if spec == "component" and stats:
        _pair_conv_norm(names, infos, mapping, stats, key_order)
    grouped: dict[str, Block] = {}
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name not in stats:
            first.setdefault(mapping[name], i)
    for name in sorted((n for n in names if n not in stats), key=_natural_key):
        blk = grouped.setdefault(mapping[name], Block(mapping[name], []))
        blk.params.append(name)
        blk.numel += infos[name].numel
        blk.nbytes += infos[name].nbytes
    if key_order:
        ordered = sorted(grouped.values(), key=lambda b: first[b.name])
    else:
        ordered = sorted(grouped.values(), key=lambda b: _order_key(b.name, b.params[0]))
    if stats and not ordered:
        raise FlexMergeError("the checkpoints hold only normalisation statistics and no weights to merge; "
                             "check the 'exclude' patterns")
    position = {n: i for i, n in enumerate(names)}
    for name in sorted(stats, key=_natural_key):
        weight = _join(_module(name), "weight")
        owner = grouped.get(mapping[weight] if weight in infos and weight not in stats else mapping[name])
        if owner is None:  # no weight of its own module: the weight block before it in model order
            before = [b for b in ordered if first[b.name] < position[name]] if key_order else []
            owner = before[-1] if before else _nearest_by_name(ordered, name)
        owner.statistics.append(name)
        owner.stats_nbytes += infos[name].nbytes
    return BlockMap(ordered, excluded=sorted(excluded, key=_natural_key))


def _nearest_by_name(ordered: list[Block], name: str) -> Block:
    """The last block whose first tensor sorts (naturally) before ``name``, else the first block."""
    key = _natural_key(name)
    before = [b for b in ordered if _natural_key(b.params[0]) <= key]
    return before[-1] if before else ordered[0]
