import pytest
import torch

from loraprune.pipeline.export import save_pruned
from loraprune.pipeline.load import load_model
from loraprune.pipeline.modeling_pruned import LAYOUT_KEY
from tiny import FAMILIES, masked_then_pruned, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uniform", [False, True])
def test_masked_model_equals_pruned_model(family, uniform):
    masked, pruned, model, pruner = masked_then_pruned(family, ratio=0.5, uniform=uniform)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        alive = int(pruner.head_alive[i].sum())
        assert layer.self_attn.q_proj.out_features == alive * pruner.groups.head_dim
        assert layer.mlp.up_proj.out_features == int(pruner.channel_alive[i].sum())
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


def reloaded_output(model, folder, tokenizer, inputs):
    """Save `model`, load the folder back with loraprune's loader, return its logits on `inputs`."""
    save_pruned(model, tokenizer, folder, {})
    reloaded, _ = load_model(str(folder))
    with torch.no_grad():
        return reloaded(**inputs).logits


@pytest.mark.parametrize("uniform", [False, True])
def test_head_dim_other_than_hidden_over_heads(tmp_path, tiny_tokenizer, uniform):
    """head_dim 12 with hidden 48 and 6 heads (hidden / heads would be 8): rows are cut per 12, and the
    folder (stock config or layout) reloads to the same model."""
    model = tiny_model("llama-gqa", head_dim=12)
    masked, pruned, model, pruner = masked_then_pruned("llama-gqa", ratio=0.5, uniform=uniform, model=model)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert pruner.groups.head_dim == 12 and model.config.head_dim == 12
    for i, layer in enumerate(model.model.layers):
        heads = int(pruner.head_alive[i].sum())
        assert layer.self_attn.q_proj.out_features == layer.self_attn.o_proj.in_features == heads * 12
        assert layer.self_attn.k_proj.out_features % 12 == 0
    assert hasattr(model.config, LAYOUT_KEY) != uniform
    inputs = {"input_ids": torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(reloaded_output(model, tmp_path / "out", tiny_tokenizer, inputs), expected)


def test_a_whole_kv_group_removed_on_purpose(tmp_path, tiny_tokenizer):
    """Layer 1 loses the 3 query heads of k/v head 1, layer 2 those of k/v head 0: each keeps one k/v
    head (the right one), read evenly by 3 query heads, and still computes the masked model's function."""
    head_score = torch.tensor([[1.0] * 6, [5, 5, 5, 1, 1, 1], [1, 1, 1, 5, 5, 5]])
    masked, pruned, model, pruner = masked_then_pruned("llama-gqa", ratio=0.5, uniform=False, head_score=head_score)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert pruner.head_alive.tolist() == [[True] * 6, [True] * 3 + [False] * 3, [False] * 3 + [True] * 3]
    layout = getattr(model.config, LAYOUT_KEY)["layers"]
    assert [shape["kv_heads"] for shape in layout] == [2, 1, 1]
    assert layout[1]["kv_index"] == layout[2]["kv_index"] == [0, 0, 0]
    for i in (1, 2):
        attention = model.model.layers[i].self_attn
        assert attention.k_proj.out_features == attention.v_proj.out_features == 8
        assert attention.num_key_value_groups == 3 and not hasattr(attention, "kv_index")  # stock attention path
    inputs = {"input_ids": torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(reloaded_output(model, tmp_path / "out", tiny_tokenizer, inputs), expected)
