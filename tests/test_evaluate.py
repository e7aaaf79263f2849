import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loraprune.archs import arch_for
from loraprune.errors import LoraPruneError
from loraprune.pipeline.evaluate import count_parameters, count_prunable, greedy_generate, perplexity

SIZES = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def tiny_llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SIZES, **overrides})).eval()


def brute_force_nll(model, windows):
    """Mean NLL, one prefix at a time in float64: shares nothing with perplexity()'s batching."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            for t in range(1, len(window)):
                logits = model(window[None, :t]).logits[0, -1].double()
                total -= torch.log_softmax(logits, -1)[window[t]].item()
                count += 1
    return total / count, count


def test_perplexity_matches_brute_force():
    model = tiny_llama()
    torch.manual_seed(1)
    windows = torch.randint(0, 64, (5, 12))
    model.train()  # perplexity must switch to eval and switch back
    result = perplexity(model, windows, batch_size=2)  # 2 + 2 + 1: an uneven last batch
    assert model.training
    expected, count = brute_force_nll(model.eval(), windows)
    assert result["tokens"] == count == 5 * 11
    assert result["windows"] == 5 and result["seq_len"] == 12
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert perplexity(model, windows, batch_size=8)["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_perplexity_rejects_no_windows():
    with pytest.raises(LoraPruneError, match="expected a non-empty"):
        perplexity(tiny_llama(), torch.zeros(0, 8, dtype=torch.long))


def test_count_parameters_counts_tied_weights_once():
    tied, untied = tiny_llama(tie_word_embeddings=True), tiny_llama(tie_word_embeddings=False)
    assert count_parameters(untied) - count_parameters(tied) == 64 * 32
    assert count_parameters(untied) == sum(p.numel() for p in untied.state_dict().values())


def test_count_prunable_llama():
    model = tiny_llama()
    head_dim = 32 // 4
    attention = 32 * head_dim * (4 + 2 + 2) + 4 * head_dim * 32  # q, k, v rows; o columns
    mlp = 3 * 32 * 64
    assert count_prunable(model, arch_for(model.config)) == 2 * (attention + mlp)
    assert count_prunable(model) == 2 * (attention + mlp)  # arch looked up from the config


def test_count_prunable_includes_biases_and_ignores_lora():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES))
    head_dim = 32 // 4
    weights = 32 * head_dim * (4 + 2 + 2) + 4 * head_dim * 32 + 3 * 32 * 64
    biases = head_dim * (4 + 2 + 2)  # qwen2: q/k/v biases
    assert count_prunable(model) == 2 * (weights + biases)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=arch_for(model.config).lora_targets))
    assert count_prunable(lora.base_model.model, arch_for(model.config)) == 2 * (weights + biases)


def test_greedy_generate(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    model = tiny_llama(vocab_size=len(tiny_tokenizer), eos_token_id=eos, bos_token_id=None, pad_token_id=eos)
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    prompt = "the cat sat on"
    ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):  # manual argmax loop, stopping at eos like generate
            token = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax().item()
            if token == eos:
                break
            new.append(token)
    text = greedy_generate(model, tiny_tokenizer, prompt, max_new_tokens=6)
    assert isinstance(text, str)
    assert text == tiny_tokenizer.decode(new, skip_special_tokens=True)
    assert text == greedy_generate(model, tiny_tokenizer, prompt, max_new_tokens=6)
