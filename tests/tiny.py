"""Tiny random models of each supported family, for fast exact tests."""

import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    ViTConfig,
    ViTForImageClassification,
)

from loraprune.archs import arch_for
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.shrink import shrink
from loraprune.prune_config import PruneConfig

# a head size of its own (hidden 48 = 6 × 8 but heads of 12), as in Mistral-Nemo, Qwen3, Gemma
OWN_HEAD_DIM = {"head_dim": 12}
# sliding-window layers mixed with global ones; a window of 4 tokens, so that tests' prompts exceed it
SLIDING = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
GEMMA = {
    **OWN_HEAD_DIM,
    **SLIDING,
    "query_pre_attn_scalar": 12,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}

# name -> (config class, heads, kv heads, other config fields): with and without grouped-query attention
FAMILIES = {
    "llama-mha": (LlamaConfig, 4, 4, {}),
    "llama-gqa": (LlamaConfig, 6, 2, {}),
    "mistral-gqa": (MistralConfig, 6, 3, {}),
    "qwen2-gqa": (Qwen2Config, 6, 2, {}),  # q/k/v biases
    # Llama 3.1/3.2-style rope scaling, carried through export unchanged
    "llama-head-dim": (
        LlamaConfig,
        6,
        2,
        {
            **OWN_HEAD_DIM,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "qwen3-gqa": (Qwen3Config, 6, 2, OWN_HEAD_DIM),  # per-head q/k norms
    # soft-capped attention and final logits, pre/post feed-forward norms, embedding scale
    "gemma2-gqa": (Gemma2Config, 6, 2, {**GEMMA, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "gemma3-gqa": (Gemma3TextConfig, 6, 2, GEMMA),  # per-head q/k norms, local/global rope
    "phi3-gqa": (Phi3Config, 6, 2, {"pad_token_id": 0, "eos_token_id": 1}),  # fused qkv_proj, gate_up_proj
}


def tiny_config(family: str = "llama-gqa", layers: int = 3, **overrides):
    """`overrides`: other config values, e.g. head_dim (default hidden / heads = 8) or sliding_window."""
    config_class, heads, kv_heads, extra = FAMILIES[family]
    if "layer_types" in extra:
        extra = {**extra, "layer_types": extra["layer_types"][:layers]}
    sizes = dict(
        vocab_size=64,
        hidden_size=heads * 8,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        **extra,
    )
    return config_class(**{**sizes, **overrides})


def tiny_model(family: str = "llama-gqa", layers: int = 3, seed: int = 0, **overrides):
    config = tiny_config(family, layers, **overrides)
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
    family: str,
    ratio: float,
    uniform: bool,
    seed: int = 0,
    model=None,
    head_score=None,
    skip_layers: str = "0",
    drop_kv_group: bool = False,
):
    """Logits of the masked LoRA model and of the shrunk, merged model on the same input.
    `model`: a tiny model of `family` made by the caller (other config values); `head_score`: the
    head scores to prune by ([layers, heads]; random by default); `skip_layers` unless uniform.
    `drop_kv_group` (6 heads sharing 2 k/v heads, ratio 0.5): the first pruned layer's lowest scores
    are the 3 query heads of k/v head 0, so it loses that k/v head entirely; the last layer's are heads
    0, 1 and 3, so its k/v heads keep 1 and 2 readers (uneven sharing)."""
    if model is None:
        model = tiny_encoder(family, seed=seed) if family in ENCODERS else tiny_model(family, seed=seed)
    arch = arch_for(model.config)
    skip_layers = "none" if uniform else skip_layers
    config = PruneConfig(criterion="lora", ratio=ratio, skip_layers=skip_layers, uniform=uniform, lora_dropout=0.0)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    g = torch.Generator().manual_seed(seed)
    pruner.head_score.uniform_(generator=g)
    pruner.channel_score.uniform_(generator=g)
    if head_score is not None:
        pruner.head_score.copy_(head_score)
    if drop_kv_group:
        pruner.head_score[pruner.prunable[0], pruner.groups.kv_of_head == 0] -= 10
        pruner.head_score[pruner.prunable[-1], [0, 1, 3]] -= 10
    pruner.prune_to(ratio)
    inputs = tiny_inputs(family, g)
    peft_model.eval()
    with torch.no_grad():
        masked = model_output(peft_model, inputs)
        pruner.remove_hooks()
        shrink(peft_model.get_base_model(), arch, pruner.head_alive, pruner.channel_alive)
        pruned = peft_model.merge_and_unload()
        return masked, model_output(pruned, inputs), pruned, pruner


# Loads saved folders in a fresh interpreter where `import loraprune` fails, as on a machine without
# it: argv is the root folder, then NAME:remote|stock per folder under it; writes their logits on
# the root's tokens.safetensors to logits.safetensors.
RELOAD = """
import sys
sys.modules["loraprune"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
root = sys.argv[1]
tokens = load_file(root + "/tokens.safetensors")["tokens"]
logits = {}
for entry in sys.argv[2:]:
    name, how = entry.split(":")
    model = AutoModelForCausalLM.from_pretrained(root + "/" + name, trust_remote_code=how == "remote")
    with torch.no_grad():
        logits[name] = model(input_ids=tokens).logits
save_file(logits, root + "/logits.safetensors")
"""


def reload_logits(root, tokens: torch.Tensor, folders: dict[str, bool]) -> dict[str, torch.Tensor]:
    """Logits of the folders under `root` (name -> load with remote code or not), loaded in one
    subprocess without loraprune."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    save_file({"tokens": tokens.contiguous()}, str(root / "tokens.safetensors"))
    entries = [f"{name}:{'remote' if remote else 'stock'}" for name, remote in folders.items()]
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(root), *entries], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(root / "logits.safetensors"))


def assert_cached_generation_matches_recompute(model, prompt: torch.Tensor, new_tokens: int = 6, tol: float = 1e-4):
    """Greedy decoding with the KV cache gives, token by token, the logits of one full forward over
    the final sequence (sliding-window layers included when the prompt is longer than the window)."""
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model(input_ids=out.sequences, use_cache=False).logits
    cached = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(cached, full[:, prompt.shape[1] - 1 : -1], atol=tol, rtol=tol)
