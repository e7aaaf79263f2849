"""Tiny random models of each supported family, for fast exact tests."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

# name -> (config class, heads, kv heads): with and without grouped-query attention
FAMILIES = {
    "llama-mha": (LlamaConfig, 4, 4),
    "llama-gqa": (LlamaConfig, 6, 2),
    "mistral-gqa": (MistralConfig, 6, 3),
    "qwen2-gqa": (Qwen2Config, 6, 2),  # q/k/v biases
}


def tiny_model(family: str = "llama-gqa", layers: int = 3, seed: int = 0):
    config_class, heads, kv_heads = FAMILIES[family]
    config = config_class(
        vocab_size=64,
        hidden_size=heads * 8,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name.endswith("bias"):  # random biases, so that slicing them is tested
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def randomize_lora(model, std: float = 0.05, seed: int = 1):
    """peft initialises B = 0; give both factors values so merging is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
