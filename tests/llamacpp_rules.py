"""What llama.cpp's loader accepts from the GGUF files export_gguf writes, so that unit tests apply
llama.cpp's rules without a llama.cpp build (`make llamacpp-check` runs the real one).

Read from the llama.cpp that `make llamacpp` builds (llama-cpp-python 0.3.36's vendored tree):
- src/models/{llama,qwen2,qwen3,gemma3,deci}.cpp, load_arch_tensors: the shapes each architecture creates.
  `llama`, `qwen2`, `qwen3` and `gemma3` size every layer with layer 0's head counts and MLP width (LLAMA_LOAD_LOCALS:
  hparams.n_head(), n_ff(), ...), `qwen2` its q and o projections as hidden x hidden, `qwen3` adds
  head-sized q and k norms and no biases but q/k/v's, `gemma3` those norms and one after the attention
  and one after the MLP, and no biases but q/k/v's; `deci` each
  layer with its own (hparams.n_head(i), n_embd_k_gqa(i), n_ff(i)).
- src/llama-model.cpp, create_tensor_qkv: the optional q/k/v biases have the q/k/v projections'
  output sizes; `qwen2` creates no attn_output or MLP biases.
- src/llama-model-loader.cpp: a tensor present with another shape aborts the load ("wrong shape"),
  one in the file that nothing created too ("wrong number of tensors"), a required one missing too.
- src/llama-model.cpp's load_hparams and the three graphs: n_rot, the key and the value head size
  must be equal; ggml's broadcast in the attention needs each layer's head count divisible by its
  k/v head count.
Shapes are ggml's, fastest dimension first, as gguf.GGUFReader reports them.
"""

import gguf

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "deci")
HEAD_NORMS = ("qwen3", "gemma3")  # per-head q/k norms
ONLY_QKV_BIASES = ("qwen2", "qwen3", "gemma3")


def _per_layer(value, n_layer: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layer


def expected_tensors(fields: dict, arch: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, required) for every tensor llama.cpp's `arch` loader creates."""

    def key(name):
        return fields[f"{arch}.{name}"]

    n_layer, n_embd, head_dim = key("block_count"), key("embedding_length"), key("attention.key_length")
    n_vocab = len(fields["tokenizer.ggml.tokens"])
    heads, kv_heads, ff = (
        _per_layer(key(name), n_layer)
        for name in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
    )
    if arch != "deci":  # layer 0's sizes for every layer
        heads, kv_heads, ff = ([values[0]] * n_layer for values in (heads, kv_heads, ff))
    out = {
        "token_embd.weight": ((n_embd, n_vocab), True),
        "output_norm.weight": ((n_embd,), True),
        "output.weight": ((n_embd, n_vocab), False),
    }
    for i in range(n_layer):
        q = n_embd if arch == "qwen2" else head_dim * heads[i]
        kv = head_dim * kv_heads[i]
        required = {
            "attn_norm.weight": (n_embd,),
            "attn_q.weight": (n_embd, q),
            "attn_k.weight": (n_embd, kv),
            "attn_v.weight": (n_embd, kv),
            "attn_output.weight": (q, n_embd),
            "ffn_norm.weight": (n_embd,),
            "ffn_gate.weight": (n_embd, ff[i]),
            "ffn_up.weight": (n_embd, ff[i]),
            "ffn_down.weight": (ff[i], n_embd),
        }
        if arch in HEAD_NORMS:
            required |= {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
        if arch == "gemma3":
            required |= {"post_attention_norm.weight": (n_embd,), "post_ffw_norm.weight": (n_embd,)}
        optional = {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
        if arch not in ONLY_QKV_BIASES:
            optional |= {
                "attn_output.bias": (n_embd,),
                "ffn_gate.bias": (ff[i],),
                "ffn_up.bias": (ff[i],),
                "ffn_down.bias": (n_embd,),
            }
        out |= {f"blk.{i}.{name}": (shape, True) for name, shape in required.items()}
        out |= {f"blk.{i}.{name}": (shape, False) for name, shape in optional.items()}
    return out


def hparam_errors(fields: dict, arch: str) -> list[str]:
    """llama.cpp's checks of the head sizes and counts (load_hparams, the graphs, ggml's broadcast)."""

    def key(name):
        return fields[f"{arch}.{name}"]

    n_layer, head_dim = key("block_count"), key("attention.key_length")
    errors = []
    if not key("rope.dimension_count") == key("attention.value_length") == head_dim:
        errors.append(f"n_rot, key and value head sizes differ (the {arch} graph asserts them equal)")
    heads = _per_layer(key("attention.head_count"), n_layer)
    kv_heads = _per_layer(key("attention.head_count_kv"), n_layer)
    if arch == "qwen2" and heads[0] * head_dim != key("embedding_length"):
        errors.append(f"qwen2 reshapes its hidden-sized q into {heads[0]} heads of {head_dim}")
    shared = enumerate(zip(heads, kv_heads, strict=True))
    errors += [f"layer {i}: {h} heads on {kv} k/v heads" for i, (h, kv) in shared if h % kv]
    return errors


def load_errors(path) -> list[str]:
    """Why llama.cpp would refuse the GGUF file at `path` (nothing when it loads it)."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields["general.architecture"]
    if arch not in ARCHS:
        return [f"architecture {arch!r} is none of {ARCHS}"]
    expected = expected_tensors(fields, arch)
    present = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    errors = hparam_errors(fields, arch)
    for name, shape in present.items():
        if name not in expected:
            errors.append(f"{name}: not created by {arch} (wrong number of tensors)")
        elif shape != expected[name][0]:
            errors.append(f"{name} has wrong shape; expected {expected[name][0]}, got {shape}")
    errors += [f"{name} not found" for name, (_, required) in expected.items() if required and name not in present]
    return errors
