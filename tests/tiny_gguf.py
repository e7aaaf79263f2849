"""Write a tiny random model of a family as a float32 GGUF file, as llama.cpp's converter would, so
that loading .gguf input is tested without downloading one: tensor names from gguf's own name map,
each family's stored conventions (Gemma's norms as 1 + w, llama's rotary row order), and a
byte-level BPE ("gpt2") vocabulary of the tiny models' 64 ids; and `bpe_tokenizer`, a Hugging Face
tokenizer of 64 ids for saving tiny models as folders that GGUF export accepts."""

import gguf
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# our family -> (gguf architecture, does llama.cpp store q/k rows in its rotary order)
ARCHS = {
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
    "gemma2": (gguf.MODEL_ARCH.GEMMA2, False),
    "gemma3_text": (gguf.MODEL_ARCH.GEMMA3, False),
    "phi3": (gguf.MODEL_ARCH.PHI3, False),
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
}
# 64 single-character tokens (byte-level BPE spells bytes as printable characters) and no merges
TOKENS = [chr(ord("A") + i) if i < 26 else chr(ord("a") + i - 26) if i < 52 else str(i - 52) for i in range(64)]


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf's permute), which transformers undoes on load."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path) -> None:
    config = model.config
    arch, permuted = ARCHS[config.model_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base((rope["full_attention"] if "full_attention" in rope else rope)["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(TOKENS))
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_merges([])
    writer.add_bos_token_id(config.bos_token_id if config.bos_token_id is not None else 2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, _, suffix = name.rpartition(".")
        gguf_name = names.get_name(base)
        assert gguf_name is not None, name
        tensor = tensor.detach().float().clone()
        if permuted and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            tensor = _permute(tensor, heads)
        if config.model_type.startswith("gemma") and base.endswith("norm"):
            tensor = tensor + 1  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w
        writer.add_tensor(f"{gguf_name}.{suffix}", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly 64 ids, the tiny models' vocab_size."""
    specials = ["<|endoftext|>", "<|im_start|>"]
    chars = [*"abcdefghijklmnopqrstuvwxyz", "Ġ", ".", ","]
    pairs = "th Ġt Ġa he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve".split()
    vocab = {token: i for i, token in enumerate(specials + chars + pairs)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(p[:-1], p[-1]) for p in pairs]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0], eos_token=specials[0])
