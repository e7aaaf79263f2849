import pytest
import torch

from loraprune.pipeline.groups import LayerGroups
from loraprune.pipeline.modeling_pruned import LAYOUT_KEY
from tiny import FAMILIES, masked_then_pruned


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uniform", [False, True])
def test_masked_model_equals_pruned_model(family, uniform):
    masked, pruned, model, pruner = masked_then_pruned(family, ratio=0.5, uniform=uniform)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    for i, layer in enumerate(model.model.layers):
        heads, kv_heads = int(pruner.head_alive[i].sum()), len(pruner.groups.kv_of_head[pruner.head_alive[i]].unique())
        channels = int(pruner.channel_alive[i].sum())
        kept = LayerGroups(heads, kv_heads, pruner.groups.head_dim, channels)
        projections = pruner.arch.projections(layer)
        rows = {}  # each row-pruned projection's rows: its own part(s) at the kept sizes
        for name, _, size in kept.row_parts(projections).values():
            rows[name] = rows.get(name, 0) + size
        assert {name: projections[name].out_features for name in rows} == rows
        assert projections["o"].in_features == heads * kept.head_dim
        assert projections["down"].in_features == channels
    assert not pruner.head_alive[1:].all()  # something was pruned
    assert (pruner.head_alive[0].all() and pruner.channel_alive[0].all()) != uniform  # layer 0 skipped or not


def test_uniform_gqa_keeps_stock_config():
    *_, model, pruner = masked_then_pruned("llama-gqa", ratio=0.5, uniform=True)
    config = model.config
    assert not hasattr(config, LAYOUT_KEY)
    # 6 heads in 2 k/v groups of 3: half of each group (round half up: 2) goes, every layer alike
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 8)
    assert config.intermediate_size == 20


def test_per_layer_layout_is_recorded():
    *_, model, pruner = masked_then_pruned("llama-gqa", ratio=0.5, uniform=False)
    layout = getattr(model.config, LAYOUT_KEY)
    assert [len(s["kv_index"]) for s in layout["layers"]] == pruner.head_alive.sum(1).tolist()
    assert layout["layers"][0] == {"kv_heads": 2, "kv_index": [0, 0, 0, 1, 1, 1], "intermediate_size": 40}


def test_qwen2_biases_follow_their_rows():
    *_, model, pruner = masked_then_pruned("qwen2-gqa", ratio=0.5, uniform=False)
    attention = model.model.layers[1].self_attn
    assert attention.q_proj.bias.shape[0] == attention.q_proj.out_features
    assert attention.k_proj.bias.shape[0] == attention.k_proj.out_features
