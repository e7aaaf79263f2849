"""Perplexity and a greedy sample: how good a causal LM is (counts.py: how big)."""

import math

import torch
from tqdm import tqdm

from ..errors import LoraPruneError
from .lm_loss import causal_lm_loss


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity over all predicted tokens of [n, seq_len] windows (seq_len - 1 per window)."""
    if windows.ndim != 2 or len(windows) == 0:
        raise LoraPruneError(f"expected a non-empty [n, seq_len] tensor of windows, got shape {tuple(windows.shape)}")
    n, seq_len = windows.shape
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress):
                batch = windows[start : start + batch_size].to(device)
                predicted = batch[:, 1:].numel()
                # the batch's sum (mean x tokens): the last batch may be smaller, and every token
                # weighs the same; chunked (lm_loss.py): a batch's whole logits never exist
                total += causal_lm_loss(model, batch, use_cache=False).item() * predicted  # float64 on the host
                count += predicted
    finally:
        model.train(was_training)
    mean = total / count
    # windows that all start with the model's BOS were laid out for a tokenizer that adds one (data.windows)
    bos = getattr(model.config, "bos_token_id", None)
    starts_with_bos = isinstance(bos, int) and bool((windows[:, 0] == bos).all())
    return {
        "perplexity": math.exp(mean),
        "loss": mean,
        "tokens": count,
        "windows": n,
        "seq_len": seq_len,
        "bos": starts_with_bos,
    }


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of a prompt (the new text only)."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt")
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)  # no token_type_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
