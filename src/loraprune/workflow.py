"""The command-line jobs as functions: load → prune → evaluate → save → reload, and eval."""

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .api import check_compatible, prune
from .config import PruneConfig
from .data import load_text, tokenize, windows
from .evaluate import count_parameters, count_prunable, greedy_generate, perplexity
from .export import check_output, save_pruned
from .load import load_model
from .modeling_pruned import LAYOUT_KEY
from .report import format_summary

PROMPT = "the company said it expects"


def prune_and_save(
    model: str,
    data: str,
    output: Path,
    config: PruneConfig,
    overwrite: bool = False,
    evaluate: bool = True,
    eval_batch_size: int = 8,
    eval_windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Prune `model` on `data`'s train split, compare perplexity on its test split, save to `output`,
    then reload the folder with stock transformers and print a greedy sample from it."""
    started = time.perf_counter()
    check_output(output, overwrite)  # every check that needs no model comes first
    train_text = load_text(data, "train")
    eval_text = load_text(data, "test") if evaluate else None
    dense_model, tokenizer = load_model(model)
    check_compatible(dense_model.config, config)

    evaluation = None
    if evaluate:
        eval_set = windows(tokenize(tokenizer, eval_text), config.seq_len)[:eval_windows]
        evaluation = {"data": data, "split": "test", "seq_len": config.seq_len}
        evaluation["dense"] = perplexity(dense_model, eval_set, eval_batch_size, progress=progress)

    pruned, report = prune(dense_model, tokenizer, train_text, config, progress=progress)
    if evaluate:
        evaluation["pruned"] = perplexity(pruned, eval_set, eval_batch_size, progress=progress)
    report.update(model=model, data=data, evaluation=evaluation)
    report["wall_seconds"] = time.perf_counter() - started
    save_pruned(pruned, tokenizer, output, report, overwrite=overwrite)

    # Prove the folder stands alone: stock transformers, remote code only for per-layer shapes.
    per_layer = hasattr(pruned.config, LAYOUT_KEY)
    reloaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=per_layer, local_files_only=True)
    probe = torch.randint(0, pruned.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        drift = (reloaded(input_ids=probe).logits - pruned(input_ids=probe).logits).abs().max().item()
    print(format_summary(report))
    how = (
        "AutoModelForCausalLM.from_pretrained("
        + repr(str(output))
        + (", trust_remote_code=True)" if per_layer else ")")
    )
    print(f"\nreloaded with {how}: max |logit difference| vs in-memory model {drift:.2e}")
    print(f"greedy sample: {PROMPT!r} -> {greedy_generate(reloaded, tokenizer, PROMPT, max_new_tokens=20)!r}")
    return report


def evaluate_model(model: str, data: str, seq_len: int, batch_size: int = 8, max_windows: int | None = None) -> dict:
    """Perplexity on `data`'s test split and parameter counts of a model."""
    text = load_text(data, "test")
    loaded, tokenizer = load_model(model)
    result = perplexity(loaded, windows(tokenize(tokenizer, text), seq_len)[:max_windows], batch_size, progress=True)
    result.update(model=model, data=data, split="test", parameters=count_parameters(loaded))
    result["prunable_parameters"] = count_prunable(loaded)
    return result
