"""Write a (pruned) llama / mistral / qwen2 / qwen3 / gemma3 model as a GGUF file that llama.cpp runs.

What llama.cpp loads, read from its source (src/llama-model.cpp, src/models/*.cpp):
- Its loader reads `head_count`, `head_count_kv` and `feed_forward_length` either as one number
  or as one per layer, for every architecture. But the `llama` and `qwen2` architectures create
  every layer's tensors with layer 0's sizes (and `qwen2` even assumes heads x head_dim = hidden),
  so they only run layers of one shape. `deci` (NVIDIA's Nemotron-NAS, llama-shaped) creates and
  runs each layer with its own head count, k/v head count and MLP width, and accepts the optional
  q/k/v/o and MLP biases. So: layers of one shape are written as the family's own architecture
  (`llama` for llama and mistral, as llama.cpp's converter does, `qwen2`), everything else as `deci`.
- `qwen3` (per-head q/k norms, which `deci` lacks) also creates every layer with layer 0's sizes, but
  its q is heads x head_dim: a Qwen3 model of one shape is written as `qwen3`, per-layer shapes are
  refused (prune with --uniform).
- `gemma3` (src/models/gemma3.cpp) likewise builds every layer in layer 0's shape: uniform only. It
  multiplies the embedding by sqrt(hidden) as transformers does (so a hidden-size cut agrees), rotates
  halves, reads which layers attend within the sliding window as one flag per layer (a model with
  layers removed keeps its own pattern), and scales queries by 1/sqrt(head_dim) (by hidden / heads at
  62 layers, its 27B): a config whose query_pre_attn_scalar says otherwise is refused. Its norms
  multiply by the weight where Gemma's multiply by 1 + weight: written shifted, as the converter does.
- The optional q/k/v biases (Qwen2, Llama with attention_bias) are created by create_tensor_qkv
  (src/llama-model.cpp) with the sizes of the layer's q/k/v projections. Builds from before that
  helper (llama.cpp PR #21245, April 2026) create the `llama` and `deci` attn_q.bias hidden-sized
  and refuse a pruned layer's ("wrong shape"): the export warns when it writes one. The llama.cpp
  that `make llamacpp` builds (llama-cpp-python 0.3.36) loads them; `make llamacpp-check` runs
  pruned Qwen2 and a Llama with biases in it.
- llama.cpp's attention lets query head h read k/v head h // (heads / kv_heads). A pruned layer
  whose query heads share k/v heads unevenly (3, 1 of 4) is written with its k/v heads repeated
  so that the groups are even: exact, and larger only in that layer's k/v projections.
- `llama` and `deci` apply "normal" RoPE to consecutive pairs; Hugging Face's llama-style models
  rotate halves. The q and k rows are permuted as the converter's LlamaModel.permute does. `qwen2`
  and `qwen3` rotate halves themselves (no permutation).
- The tokenizer is built from the Hugging Face tokenizer as convert_hf_to_gguf.py's gpt2 vocab
  does (byte-level BPE: SmolLM2, Llama 3, Qwen2); merges and special ids come from gguf.SpecialVocab.
  A SentencePiece vocabulary (Gemma) needs each piece's score, which a Hugging Face tokenizer does
  not keep: it is copied from the GGUF file the model was loaded from (pruning keeps the vocabulary),
  that is the model itself or the `model` a loraprune output's loraprune.json names.

gguf_read.py reads a `deci` file written here back into a per-layer model.
"""

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import LoraPruneError, write_error
from .gguf_read import FAMILIES, PER_LAYER_ARCH, SOURCE_KEY
from .llamacpp_tools import QUANTIZED, llama_tool, quantize

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

# convert_hf_to_gguf.py's get_vocab_base_pre: the hash of this text's token ids names llama.cpp's
# pre-tokenizer. A few byte-level BPE families; an unknown hash gets "default" and a warning.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}

# families whose llama.cpp architecture runs layers of one shape only and has no per-layer stand-in,
# and that architecture's name
UNIFORM_ONLY = {"qwen3": "qwen3", "gemma3_text": "gemma3"}
EXPORTED = (*FAMILIES, *UNIFORM_ONLY)
HALF_ROTATING = ("qwen2", "qwen3", "gemma3")  # llama.cpp architectures that rotate halves, as Hugging Face does
# gguf-py's name map by architecture; the rest: LLAMA's
TENSOR_NAMES = {"qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3": gguf.MODEL_ARCH.GEMMA3}
ACTIVATIONS = {"gemma3_text": "gelu_pytorch_tanh"}  # the MLP activation of llama.cpp's graph; the rest: SiLU
SLIDING_WINDOW_RUN = ("gemma3_text",)  # families whose llama.cpp graph attends within the sliding window

UNKNOWN_PRE_TOKENIZER = "pre-tokenizer not recognised: wrote 'default'; llama.cpp may split text differently"
SHORT_Q_BIAS = (
    "attn_q.bias is smaller than the hidden size in pruned layers: llama.cpp from PR #21245 (April 2026) "
    "loads the file, older builds refuse it ('wrong shape')"
)


@dataclass
class LayerShape:
    heads: int
    kv_source: list[int]  # for each k/v head written, the model's k/v head it copies
    channels: int

    @property
    def kv_heads(self) -> int:
        return len(self.kv_source)


def layer_shapes(config) -> tuple[list[LayerShape], int]:
    """Each layer's shape as llama.cpp runs it (even k/v groups), and the head size."""
    from .modeling_pruned import LAYOUT_KEY

    layout = getattr(config, LAYOUT_KEY, None)
    if layout is not None:
        head_dim = layout["head_dim"]
        layers = [(shape["kv_index"], shape["intermediate_size"]) for shape in layout["layers"]]
    else:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = [([i * kv_heads // heads for i in range(heads)], config.intermediate_size)]
        layers *= config.num_hidden_layers
    return [LayerShape(len(kv), even_groups(kv), channels) for kv, channels in layers], head_dim


def even_groups(kv_index: list[int]) -> list[int]:
    """The k/v heads to write so that query heads read them in equal contiguous groups: the
    largest group size g dividing the head count with every block of g heads on one k/v head."""
    heads = len(kv_index)
    for g in range(heads, 0, -1):
        blocks = [kv_index[i : i + g] for i in range(0, heads, g)]
        if heads % g == 0 and all(len(set(block)) == 1 for block in blocks):
            return [block[0] for block in blocks]
    return list(kv_index)  # no heads


def choose_arch(config, shapes: list[LayerShape], head_dim: int) -> str:
    """The family's own llama.cpp architecture when it runs these shapes, else deci."""
    one_shape = all(
        (s.heads, s.channels) == (shapes[0].heads, shapes[0].channels) and s.kv_source == list(range(s.kv_heads))
        for s in shapes
    )
    if not one_shape and config.model_type in UNIFORM_ONLY:
        raise LoraPruneError(
            f"llama.cpp's {config.model_type} builds every layer in layer 0's shape and this model's layers "
            "differ (or share k/v heads unevenly): prune with --uniform to export it to GGUF"
        )
    if not one_shape:
        return PER_LAYER_ARCH
    if config.model_type in UNIFORM_ONLY:
        return UNIFORM_ONLY[config.model_type]
    if config.model_type == "qwen2":
        # llama.cpp's qwen2 sizes q and o as hidden x hidden
        return "qwen2" if shapes[0].heads * head_dim == config.hidden_size else PER_LAYER_ARCH
    return "llama"


def check_supported(config) -> list[str]:
    """Refuse what the written file could not reproduce; return warnings for what it approximates."""
    if config.model_type not in EXPORTED:
        raise LoraPruneError(f"GGUF export supports {', '.join(EXPORTED)} models, not {config.model_type!r}")
    for rope in rope_parameters(config).values():
        if rope.get("rope_type", "default") != "default":
            raise LoraPruneError(f"GGUF export does not write rope scaling {rope.get('rope_type')!r} yet")
    activation = ACTIVATIONS.get(config.model_type, "silu")
    if getattr(config, "hidden_act", activation) != activation:
        raise LoraPruneError(f"llama.cpp's {config.model_type} graph uses {activation}, not {config.hidden_act!r}")
    if config.model_type == "gemma3_text":
        check_gemma3(config)
    window = getattr(config, "sliding_window", None)
    if config.model_type in SLIDING_WINDOW_RUN:  # llama.cpp's graph attends within the window too
        window = None
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        window = None
    if window is not None and window < config.max_position_embeddings:
        return [
            f"the model attends within a sliding window of {window} tokens; llama.cpp's llama graph attends "
            f"to the whole context, so outputs differ beyond {window} tokens"
        ]
    return []


def rope_parameters(config) -> dict[str, dict]:
    """The config's rope settings by kind of layer: {'full_attention': ..., 'sliding_attention': ...}
    for Gemma 3, {'all': ...} for the rest."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope if rope and all(isinstance(v, dict) for v in rope.values()) else {"all": rope}


def check_gemma3(config) -> None:
    """What llama.cpp's gemma3 graph computes differently from this config, refused."""
    head_dim = config.head_dim
    used = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
    if config.query_pre_attn_scalar != used:
        raise LoraPruneError(
            f"llama.cpp's gemma3 scales queries by 1/sqrt({used:g}) for this model, the model by "
            f"1/sqrt({config.query_pre_attn_scalar}): it cannot be exported to GGUF"
        )
    if config.attn_logit_softcapping is not None:
        raise LoraPruneError("llama.cpp's gemma3 does not soft-cap attention logits; this model does")


def permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order -> llama.cpp's pairwise one (convert_hf_to_gguf's
    LlamaModel.permute), for q or k rows (weights or biases) of `heads` heads."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _select_heads(weight: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    rows = torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)
    return weight.index_select(0, rows)


def gguf_tensors(model, shapes: list[LayerShape], head_dim: int, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, k/v heads repeated, q/k permuted and norms
    shifted (Gemma's 1 + weight) as needed."""
    from ..archs import arch_for

    norm_offset = arch_for(model.config).norm_offset
    names = gguf.get_tensor_name_map(TENSOR_NAMES.get(arch, gguf.MODEL_ARCH.LLAMA), len(shapes))
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    out = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        stem, _, suffix = name.rpartition(".")
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise LoraPruneError(f"GGUF export: no llama.cpp name for the weight {name}")
        tensor = tensor.detach().to(torch.float32)
        if ".self_attn." in name and stem.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
            shape = shapes[int(name.split(".layers.")[1].split(".")[0])]
            role = stem.rsplit(".", 1)[-1]
            if role in ("k_proj", "v_proj"):
                tensor = _select_heads(tensor, shape.kv_source, head_dim)
            if arch not in HALF_ROTATING and role in ("q_proj", "k_proj"):
                tensor = permute_rope(tensor, shape.heads if role == "q_proj" else shape.kv_heads)
        if name.endswith("norm.weight"):
            tensor = tensor + norm_offset
        out[f"{gguf_name}.{suffix}"] = tensor
    return out


def short_q_bias_warnings(tensors: dict[str, torch.Tensor], hidden_size: int) -> list[str]:
    """The warning for llama.cpp builds that need attn_q.bias hidden-sized, when a layer's is not."""
    short = any(name.endswith("attn_q.bias") and t.numel() != hidden_size for name, t in tensors.items())
    return [SHORT_Q_BIAS] if short else []


def _encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Norms and biases stay float32 (as in the converter); matrices in `qtype`."""
    data = tensor.contiguous().numpy()
    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    return gguf.quants.quantize(data, qtype), qtype


def source_gguf(model: str | Path) -> Path | None:
    """The GGUF file `model` was loaded from: itself, or the source its loraprune.json names."""
    import json

    from .load import _resolve

    try:
        kind, path = _resolve(str(model))
        if kind == "folder" and (Path(path) / "loraprune.json").is_file():
            kind, path = _resolve(json.loads((Path(path) / "loraprune.json").read_text()).get("model") or "")
    except LoraPruneError:
        return None
    return Path(path) if kind == "gguf" else None


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """Every tokenizer.ggml.* field of the GGUF file `source`, whose vocabulary must be the model's."""
    fields = gguf.GGUFReader(source).fields
    if len(fields["tokenizer.ggml.tokens"].contents()) != vocab_size:
        raise LoraPruneError(f"{source}'s vocabulary is not this model's ({vocab_size} ids)")
    for name, field in fields.items():
        if name.startswith("tokenizer.ggml."):
            kind = field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                writer.add_array(name, field.contents())
            else:
                writer.add_key_value(name, field.contents(), kind)


def tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, source: Path | None) -> list[str]:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, as convert_hf_to_gguf.py's _set_vocab_gpt2;
    for another kind, copied from the GGUF file `source` the model came from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_kind = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    if model_kind != "BPE" or "ByteLevel" not in backend.to_str():
        if source is None:
            raise LoraPruneError(
                f"GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2), or copies a {model_kind} "
                "vocabulary from the GGUF file the model was loaded from; this model came from none"
            )
        copy_tokenizer(writer, source, vocab_size)
        return []
    warnings = []
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise LoraPruneError(f"the tokenizer has ids beyond the model's vocab_size {vocab_size}")
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        pre = "default"
        warnings.append(UNKNOWN_PRE_TOKENIZER)
    reverse = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            kind = gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads merges and ids from files
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return warnings


def check_gguf_output(output: Path, overwrite: bool) -> None:
    """Refuse a GGUF output path that is a folder, or an existing file unless overwriting."""
    if output.is_dir():
        raise LoraPruneError(f"GGUF output {output} is a folder; give a file name such as model.gguf")
    if output.exists() and not overwrite:
        raise LoraPruneError(f"{output} exists; pass --overwrite or choose another file")


def describe_export(result: dict) -> str:
    """The line printed after an export (warnings go to stderr)."""
    import sys

    for warning in result["warnings"]:
        print(f"loraprune: warning: {warning}", file=sys.stderr)
    kind = "per-layer shapes" if result["per_layer"] else "one shape for all layers"
    return (
        f"wrote {result['output']}: {result['architecture']} ({kind}), {result['outtype']}, {result['bytes']:,} bytes"
    )


def export_gguf(model: str | Path, output: Path, outtype: str = "f32", overwrite: bool = False) -> dict:
    """Write `model` (a loraprune output folder, any llama/mistral/qwen2/qwen3/gemma3 folder, a .gguf or 'smollm2')
    to the GGUF file `output`, atomically. Returns what was written: architecture, per-layer
    shapes, tensor count, bytes, warnings."""
    from .load import load_model

    output = Path(output)
    if outtype not in OUTTYPES and outtype not in QUANTIZED:
        raise LoraPruneError(f"--outtype must be one of {', '.join([*OUTTYPES, *QUANTIZED])} (got {outtype!r})")
    check_gguf_output(output, overwrite)
    if outtype in QUANTIZED:
        llama_tool("llama-quantize")  # before any work
    hf_model, tokenizer = load_model(str(model))
    config = hf_model.config
    warnings = check_supported(config)
    if tokenizer is None:
        raise LoraPruneError(f"{model} has no tokenizer; llama.cpp needs one in the GGUF file")
    shapes, head_dim = layer_shapes(config)
    arch = choose_arch(config, shapes, head_dim)
    qtype, file_type = OUTTYPES[outtype if outtype in OUTTYPES else "f16"]  # llama-quantize reads f16
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{output.name}.partial-", dir=output.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from a server's user
    try:
        writer = gguf.GGUFWriter(partial, arch)
        _write_metadata(writer, config, shapes, head_dim, arch, file_type)
        warnings += tokenizer_metadata(writer, tokenizer, config.vocab_size, source_gguf(model))
        tensors = gguf_tensors(hf_model, shapes, head_dim, arch)
        warnings += short_q_bias_warnings(tensors, config.hidden_size)
        for name, tensor in tensors.items():
            data, kind = _encode(tensor, qtype)
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if outtype in QUANTIZED:
            quantized = f"{partial}.{outtype}"
            try:
                warnings += quantize(Path(partial), Path(quantized), QUANTIZED[outtype])
                os.replace(quantized, partial)
            finally:
                Path(quantized).unlink(missing_ok=True)
        os.replace(partial, output)
    except OSError as error:
        Path(partial).unlink(missing_ok=True)
        raise write_error(error, f"writing {output}", f"nothing was written to {output}") from error
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return {
        "output": str(output),
        "architecture": arch,
        "outtype": outtype,
        "per_layer": arch == PER_LAYER_ARCH,
        "layers": [{"heads": s.heads, "kv_heads": s.kv_heads, "channels": s.channels} for s in shapes],
        "repeated_kv_heads": sum(s.kv_heads - len(set(s.kv_source)) for s in shapes),
        "tensors": len(tensors),
        "bytes": output.stat().st_size,
        "warnings": warnings,
    }


def _write_metadata(writer, config, shapes: list[LayerShape], head_dim: int, arch: str, file_type) -> None:
    per_layer = arch == PER_LAYER_ARCH
    name = getattr(config, "_name_or_path", "") or config.model_type
    # not "mistral": transformers' GGUF loader would then ask gguf-py for a mistral map it lacks
    writer.add_name(Path(name).name or config.model_type)
    writer.add_string(SOURCE_KEY, config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(shapes))
    writer.add_feed_forward_length([s.channels for s in shapes] if per_layer else shapes[0].channels)
    writer.add_head_count([s.heads for s in shapes] if per_layer else shapes[0].heads)
    writer.add_head_count_kv([s.kv_heads for s in shapes] if per_layer else shapes[0].kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("full_attention", rope.get("all"))["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.model_type in SLIDING_WINDOW_RUN:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        writer.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
