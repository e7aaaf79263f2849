"""Tiny random models of each supported family, for fast exact tests."""

import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    ViTConfig,
    ViTForImageClassification,
)

from loraprune.archs import arch_for
from loraprune.config import PruneConfig
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.shrink import shrink

# name -> (config class, heads, kv heads): with and without grouped-query attention
FAMILIES = {
    "llama-mha": (LlamaConfig, 4, 4),
    "llama-gqa": (LlamaConfig, 6, 2),
    "mistral-gqa": (MistralConfig, 6, 3),
    "qwen2-gqa": (Qwen2Config, 6, 2),  # q/k/v biases
}


def tiny_model(family: str = "llama-gqa", layers: int = 3, seed: int = 0, **overrides):
    """`overrides`: other config values, e.g. head_dim (default hidden / heads = 8) or sliding_window."""
    config_class, heads, kv_heads = FAMILIES[family]
    sizes = dict(
        vocab_size=64,
        hidden_size=heads * 8,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    config = config_class(**{**sizes, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("bias"):  # random biases, so that slicing them is tested
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


# encoders (BERT embedding model, ViT classifier): plain multi-head attention, fc1/fc2-style MLP
ENCODERS = ("bert", "vit")


def tiny_encoder(family: str = "bert", layers: int = 3, seed: int = 0):
    common = dict(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=40, hidden_act="gelu"
    )
    torch.manual_seed(seed)
    if family == "bert":
        model = BertModel(BertConfig(vocab_size=64, max_position_embeddings=64, **common))
    else:
        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10, qkv_bias=True, **common)
        model = ViTForImageClassification(config)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def tiny_inputs(family: str, generator: torch.Generator) -> dict:
    """A batch for the family: token ids (BERT: with padding and its mask), or 8×8 images (ViT)."""
    if family == "vit":
        return {"pixel_values": torch.randn(2, 1, 8, 8, generator=generator)}
    tokens = torch.randint(0, 64, (2, 16), generator=generator)
    if family != "bert":
        return {"input_ids": tokens}
    mask = torch.ones_like(tokens)
    mask[1, 10:] = 0  # the second sentence is shorter: padding must not matter
    return {"input_ids": tokens, "attention_mask": mask}


def model_output(model, inputs: dict) -> torch.Tensor:
    """What a family's model computes: logits, or BERT's last hidden states."""
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize_lora(model, std: float = 0.05, seed: int = 1):
    """peft initialises B = 0; give both factors values so merging is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def masked_then_pruned(
    family: str, ratio: float, uniform: bool, seed: int = 0, model=None, head_score=None, skip_layers: str = "0"
):
    """Logits of the masked LoRA model and of the shrunk, merged model on the same input.
    `model`: a tiny model of `family` made by the caller (other config values); `head_score`: the
    head scores to prune by ([layers, heads]; random by default); `skip_layers` unless uniform."""
    if model is None:
        model = tiny_encoder(family, seed=seed) if family in ENCODERS else tiny_model(family, seed=seed)
    arch = arch_for(model.config)
    skip_layers = "none" if uniform else skip_layers
    config = PruneConfig(ratio=ratio, skip_layers=skip_layers, uniform=uniform, lora_dropout=0.0)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    g = torch.Generator().manual_seed(seed)
    pruner.head_score.uniform_(generator=g)
    pruner.channel_score.uniform_(generator=g)
    if head_score is not None:
        pruner.head_score.copy_(head_score)
    pruner.prune_to(ratio)
    inputs = tiny_inputs(family, g)
    peft_model.eval()
    with torch.no_grad():
        masked = model_output(peft_model, inputs)
        pruner.remove_hooks()
        shrink(peft_model.get_base_model(), arch, pruner.head_alive, pruner.channel_alive)
        pruned = peft_model.merge_and_unload()
        return masked, model_output(pruned, inputs), pruned, pruner
