from flexmerge.blocks import assign_blocks, build_block_map, component_block, layer_block
from flexmerge.errors import FlexMergeError
from flexmerge.io import TensorInfo
import pytest
import torch

BERT = ["bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.output.dense.weight",
        "bert.encoder.layer.0.attention.output.LayerNorm.weight", "bert.encoder.layer.0.intermediate.dense.weight",
        "bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.0.output.LayerNorm.weight",
        "bert.encoder.layer.10.attention.self.query.weight", "bert.encoder.layer.2.attention.self.query.weight"]


@pytest.mark.parametrize("name,component,layer", [
    ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention", "bert.encoder.layer.0"),
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.0"),
    ("bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.mlp", "bert.encoder.layer.0"),
    ("bert.encoder.layer.0.output.dense.bias", "bert.encoder.layer.0.mlp", "bert.encoder.layer.0"),
    ("bert.embeddings.position_embeddings.weight", "bert.embeddings", "bert.embeddings"),
    ("encoder.block.3.layer.1.DenseReluDense.wi.weight", "encoder.block.3.layer.1.DenseReluDense", "encoder.block.3"),
    ("encoder.block.3.layer.0.layer_norm.weight", "encoder.block.3.layer.0.layer_norm", "encoder.block.3"),
    ("transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn", "transformer.h.1"),
    ("transformer.h.1.ln_2.weight", "transformer.h.1.ln_2", "transformer.h.1"),
    ("model.layers.5.post_attention_layernorm.weight", "model.layers.5.post_attention_layernorm", "model.layers.5"),
    ("model.layers.5.mlp.down_proj.weight", "model.layers.5.mlp", "model.layers.5"),
    ("visual.transformer.resblocks.2.attn.in_proj_weight", "visual.transformer.resblocks.2.attn", "visual.transformer.resblocks.2"),
    ("vit.encoder.layer.4.layernorm_before.bias", "vit.encoder.layer.4.layernorm_before", "vit.encoder.layer.4"),
    ("weird", "weird", "weird"),
])
def test_presets(name, component, layer):
    assert component_block(name) == component
    assert layer_block(name) == layer


def test_tensor_preset_and_rules():
    assert assign_blocks(BERT, "tensor") == {n: n for n in BERT}
    rules = [{"pattern": r"layer\.(\d+)\.", "block": r"L\1"}]
    out = assign_blocks(BERT, rules)
    assert out["bert.encoder.layer.10.attention.self.query.weight"] == "L10"
    # names no rule matches fall back to the component preset
    assert out["bert.embeddings.LayerNorm.weight"] == "bert.embeddings.LayerNorm"
    with pytest.raises(FlexMergeError, match="preset"):
        assign_blocks(BERT, "chunks")
    with pytest.raises(FlexMergeError, match="rule"):
        assign_blocks(BERT, [{"pattern": "layer", "block": r"\3"}])


def test_block_order_and_bytes():
    infos = {n: TensorInfo((4, 2), torch.float32) for n in BERT}
    bm = build_block_map(infos, "component")
    names = bm.names
    assert names[0] == "bert.embeddings"
    # layers in numeric order (2 before 10), embeddings first
    assert names.index("bert.encoder.layer.2.attention") < names.index("bert.encoder.layer.10.attention")
    assert bm.mergeable_bytes == len(BERT) * 32
    assert sum(len(b.params) for b in bm.blocks) == len(BERT)
