"""Tiny random models for `make llamacpp-check` (scripts/llamacpp_check.py --tiny): the GGUF export's
q/k/v-bias and uneven-GQA paths, run in the real llama.cpp. The models are tests/tiny.py's, saved
with tests/tiny_gguf.py's 64-id byte-level BPE tokenizer, and pruned briefly by `loraprune prune`
on a small text, so that their shapes are what a run gives:

- qwen2 (q/k/v biases): dense (llama.cpp's qwen2), pruned per layer and --uniform (both deci: the
  pruned q is smaller than qwen2's hidden x hidden)
- qwen3 (per-head q/k norms, heads x head_dim != hidden): dense and --uniform (llama.cpp's qwen3; its
  per-layer shapes are refused)
- depth: a 6-layer GQA Llama with 2 of its layers removed (--layer-ratio), per layer and --uniform
- hidden: a GQA Llama with a quarter of its hidden size removed (--hidden-ratio), --uniform, and a
  Qwen3 likewise
- gemma3 (embedding scale, post-sublayer norms, sliding-window layers, GELU): dense, --uniform, and
  --uniform with a quarter of its hidden size and a third of its layers removed (llama.cpp's gemma3)
- bias: a GQA Llama with attention_bias=True (q/k/v/o biases), --uniform (llama) and per layer (deci)
- uneven-kv: a GQA Llama whose last layer keeps query heads 2, 4, 5 of 6 over 2 k/v heads (1 and 2
  readers), pruned by chosen scores (tiny.masked_then_pruned): its k/v head 1 is written twice.
"""

import contextlib
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loraprune.cli import main as loraprune  # noqa: E402
from loraprune.pipeline.export import save_pruned  # noqa: E402
from loraprune.pipeline.load import load_config  # noqa: E402
from tiny import masked_then_pruned, tiny_model  # noqa: E402
from tiny_gguf import bpe_tokenizer  # noqa: E402

WORDS = "the cat sat on the mat then it ate a rat and ran to its hat".split()
PRUNE = ["--ratio", "0.5", "--steps", "6", "--prune-freq", "2", "--seq-len", "16", "--batch-size", "2"]
PRUNE += ["--quiet", "--no-eval", "--overwrite"]
# the written k/v heads per layer of uneven-kv: layer 0 is skipped (6 heads on 2), layer 1 keeps the
# 3 heads of k/v head 1, layer 2 repeats k/v head 1 so that its 3 heads read one k/v head each
UNEVEN_KV_HEADS = [2, 1, 3]


def corpus(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = (" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(200))
    path.write_text("\n".join(lines))
    return path


def layer_heads(folder: Path) -> list[int]:
    """Query heads per layer of a model folder (per-layer layout or a stock config)."""
    config = load_config(str(folder))
    layout = getattr(config, "loraprune_layout", None)
    if layout is None:
        return [config.num_attention_heads] * config.num_hidden_layers
    return [len(layer["kv_index"]) for layer in layout["layers"]]


def pruned(base: Path, text: Path, out: Path, uniform: bool, *flags: str) -> Path:
    """`loraprune prune` of `base`; refuses a result whose shapes are not what the check is for."""
    argv = ["prune", "--model", base, "--data", text, "--output", out, *PRUNE, *(["--uniform"] if uniform else [])]
    argv += flags
    report = io.StringIO()  # the run's summary, shown only when it fails
    with contextlib.redirect_stdout(report):
        code = loraprune([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"loraprune prune {base} failed:\n{report.getvalue()}")
    heads, dense = layer_heads(out), layer_heads(base)
    shaped = len(set(heads)) == 1 and max(heads) < max(dense) if uniform else len(set(heads)) > 1
    shaped = shaped and (len(heads) < len(dense) if "--layer-ratio" in flags else len(heads) == len(dense))
    if not shaped:
        raise SystemExit(f"{out}: heads per layer {heads} are not {'uniform' if uniform else 'per-layer'}")
    return out


def uneven_kv(out: Path) -> Path:
    _, _, model, _ = masked_then_pruned("llama-gqa", 0.5, uniform=False, drop_kv_group=True)
    save_pruned(model, bpe_tokenizer(), out, {}, overwrite=True)
    kv_index = load_config(str(out)).loraprune_layout["layers"][2]["kv_index"]
    if kv_index != [0, 1, 1]:
        raise SystemExit(f"{out}: the last layer's heads read k/v heads {kv_index}, not [0, 1, 1]")
    return out


def build(work: Path) -> dict[str, tuple[Path, list[int] | None]]:
    """label -> (model folder, the k/v heads per layer the GGUF file must have, or None)."""
    work.mkdir(parents=True, exist_ok=True)
    text = corpus(work / "corpus.txt")
    qwen2 = save_pruned(tiny_model("qwen2-gqa"), bpe_tokenizer(), work / "qwen2", {}, overwrite=True)
    qwen3 = save_pruned(tiny_model("qwen3-gqa"), bpe_tokenizer(), work / "qwen3", {}, overwrite=True)
    deep = save_pruned(tiny_model("llama-gqa", layers=6), bpe_tokenizer(), work / "deep", {}, overwrite=True)
    gemma3 = tiny_model("gemma3-gqa", layers=6, layer_types=["sliding_attention", "full_attention"] * 3)
    gemma3 = save_pruned(gemma3, bpe_tokenizer(), work / "gemma3", {}, overwrite=True)
    bias = save_pruned(tiny_model("llama-gqa", attention_bias=True), bpe_tokenizer(), work / "bias", {}, overwrite=True)
    return {
        "qwen2": (qwen2, None),
        "qwen2-pl": (pruned(qwen2, text, work / "qwen2-pl", uniform=False), None),
        "qwen2-u": (pruned(qwen2, text, work / "qwen2-u", uniform=True), None),
        "qwen3": (qwen3, None),
        "qwen3-u": (pruned(qwen3, text, work / "qwen3-u", uniform=True), None),
        "depth-pl": (pruned(deep, text, work / "depth-pl", False, "--layer-ratio", "0.5"), None),
        "depth-u": (pruned(deep, text, work / "depth-u", True, "--layer-ratio", "0.34"), None),
        "hidden-u": (pruned(deep, text, work / "hidden-u", True, "--hidden-ratio", "0.25"), None),
        "hidden-qwen3-u": (pruned(qwen3, text, work / "hidden-qwen3-u", True, "--hidden-ratio", "0.25"), None),
        "gemma3": (gemma3, None),
        "gemma3-u": (pruned(gemma3, text, work / "gemma3-u", uniform=True), None),
        "gemma3-shape-u": (
            pruned(gemma3, text, work / "gemma3-shape-u", True, "--hidden-ratio", "0.25", "--layer-ratio", "0.34"),
            None,
        ),
        "bias-u": (pruned(bias, text, work / "bias-u", uniform=True), None),
        "bias-pl": (pruned(bias, text, work / "bias-pl", uniform=False), None),
        "uneven-kv": (uneven_kv(work / "uneven-kv"), UNEVEN_KV_HEADS),
    }
