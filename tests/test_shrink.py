import pytest
import torch

from loraprune.archs import arch_for
from loraprune.config import PruneConfig
from loraprune.lora import attach_lora
from loraprune.modeling_pruned import LAYOUT_KEY
from loraprune.pruner import Pruner
from loraprune.shrink import shrink
from tiny import FAMILIES, randomize_lora, tiny_model


def masked_then_pruned(family: str, ratio: float, uniform: bool, seed: int = 0):
    """Logits of the masked LoRA model and of the shrunk, merged model on the same input."""
    model = tiny_model(family, seed=seed)
    arch = arch_for(model.config)
    config = PruneConfig(ratio=ratio, skip_layers="none" if uniform else "0", uniform=uniform, lora_dropout=0.0)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    g = torch.Generator().manual_seed(seed)
    pruner.head_score.uniform_(generator=g)
    pruner.channel_score.uniform_(generator=g)
    pruner.prune_to(ratio)
    tokens = torch.randint(0, 64, (2, 16), generator=g)
    with torch.no_grad():
        masked = peft_model(input_ids=tokens).logits
        pruner.remove_hooks()
        shrink(peft_model.get_base_model(), arch, pruner.head_alive, pruner.channel_alive)
        pruned = peft_model.merge_and_unload()
        return masked, pruned(input_ids=tokens).logits, pruned, pruner


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
