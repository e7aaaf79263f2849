"""Read a GGUF file that export_gguf (gguf_export.py) wrote as `deci` (per-layer shapes) back into a
per-layer Hugging Face model: transformers' GGUF loader does not know `deci` (`load.load_model`
uses this for such files)."""

import os

import gguf
import numpy as np
import torch

from ..errors import LoraPruneError

FAMILIES = ("llama", "mistral", "qwen2")  # the families written to GGUF, and read back
PER_LAYER_ARCH = "deci"
SOURCE_KEY = "loraprune.model_type"  # the Hugging Face model_type, for reading a deci file back


def unpermute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's pairwise RoPE row order -> Hugging Face's rotate-half one (gguf_export.permute_rope undone)."""
    return (
        weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_architecture(path: str) -> str | None:
    """general.architecture of a GGUF file, or None when it cannot be read."""
    try:
        return gguf.GGUFReader(path).fields["general.architecture"].contents()
    except Exception:  # a corrupt file: the caller's loader reports it
        return None


def read_gguf_config(path: str, reader: gguf.GGUFReader | None = None):
    """The per-layer Hugging Face config of a `deci` GGUF written by export_gguf (k/v heads as
    written: evenly grouped, repeated where the pruned layer shared them unevenly)."""
    from transformers import AutoConfig

    from ..archs import arch_for
    from .modeling_pruned import LAYOUT_KEY

    reader = reader or gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    prefix = f"{PER_LAYER_ARCH}."
    model_type = fields.get(SOURCE_KEY)
    if model_type not in FAMILIES:
        raise LoraPruneError(f"{path}: a deci GGUF not written by loraprune (no {SOURCE_KEY}); it cannot be loaded")
    heads, kv_heads = fields[prefix + "attention.head_count"], fields[prefix + "attention.head_count_kv"]
    channels, head_dim = fields[prefix + "feed_forward_length"], fields[prefix + "attention.key_length"]
    tensors = {t.name for t in reader.tensors}
    llama_biases = {}
    if model_type == "llama":
        llama_biases = {"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=fields[prefix + "vocab_size"],
        hidden_size=fields[prefix + "embedding_length"],
        intermediate_size=max(channels),
        num_hidden_layers=fields[prefix + "block_count"],
        num_attention_heads=max(heads),
        num_key_value_heads=max(kv_heads),
        head_dim=head_dim,
        max_position_embeddings=fields[prefix + "context_length"],
        rms_norm_eps=fields[prefix + "attention.layer_norm_rms_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": fields[prefix + "rope.freq_base"]},
        tie_word_embeddings="output.weight" not in tensors,
        **llama_biases,
    )
    layers = [
        {"kv_heads": kv, "kv_index": [i * kv // h for i in range(h)], "intermediate_size": c}
        for h, kv, c in zip(heads, kv_heads, channels, strict=True)
    ]
    arch = arch_for(config)
    names = ("layers", "attention", "q", "k", "v", "o", "mlp", "gate", "up", "down")
    modules = {name: getattr(arch, name) for name in names}
    setattr(config, LAYOUT_KEY, {"modules": modules, "head_dim": head_dim, "layers": layers})
    return config


def read_gguf(path: str, dtype: torch.dtype = torch.float32):
    """A `deci` GGUF written by export_gguf as a per-layer Hugging Face model (and its tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from . import modeling_pruned

    reader = gguf.GGUFReader(path)
    config = read_gguf_config(path, reader)
    tensors = {t.name: t for t in reader.tensors}
    shapes = config.loraprune_layout["layers"]
    heads = [len(shape["kv_index"]) for shape in shapes]
    kv_heads = [shape["kv_heads"] for shape in shapes]
    model_type = config.model_type
    model_class = getattr(modeling_pruned, f"Pruned{_causal_lm_class(model_type)}")
    model = model_class(config).to(dtype)
    hf_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, len(heads))
    state = {}
    for name in model.state_dict():
        stem, _, suffix = name.rpartition(".")
        gguf_name = f"{hf_names.get_name(stem)}.{suffix}"
        if gguf_name not in tensors:
            continue  # the tied lm_head
        data = torch.from_numpy(np.array(gguf.dequantize(tensors[gguf_name].data, tensors[gguf_name].tensor_type)))
        data = data.reshape(list(reversed([int(n) for n in tensors[gguf_name].shape])))
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        if stem.endswith("q_proj"):
            data = unpermute_rope(data, heads[layer])
        elif stem.endswith("k_proj"):
            data = unpermute_rope(data, kv_heads[layer])
        state[name] = data.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise LoraPruneError(f"{path}: tensors do not match the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()

    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model.eval(), tokenizer


def _causal_lm_class(model_type: str) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
