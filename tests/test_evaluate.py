import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loraprune.archs import arch_for
from loraprune.errors import LoraPruneError
from loraprune.pipeline.counts import count_parameters, count_prunable
from loraprune.pipeline.evaluate import greedy_generate, perplexity

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


def bigram_folder(folder, words: list[str], successor_probability: dict[str, float]):
    """A saved 1-layer llama whose next-token distribution depends on the current token alone and is
    known exactly: P(successor of x | x) = successor_probability[x], the rest spread evenly; the
    successor of each word is the next one in `words`. Its tokenizer splits on spaces, keeps "\\n\\n"
    as a token, and adds a BOS token by default (so every evaluation window starts with one)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>", *words]
    V, H, eps = len(vocab), 16, 1e-12
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split(Regex("\\n\\n"), "isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer("the cat")["input_ids"][0] == 1  # a BOS by default

    config = LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=eps, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    log_p = torch.full((V, V), 0.0, dtype=torch.float64)  # log P(next | current), column = current
    for x in range(V):
        succ = vocab.index(words[words.index(vocab[x]) + 1]) if vocab[x] in words[:-1] else None
        p = successor_probability.get(vocab[x], 0.5) if succ is not None else 1 / V
        rest = (1 - p) / (V - 1) if succ is not None else 1 / V
        log_p[:, x] = math.log(rest)
        if succ is not None:
            log_p[succ, x] = math.log(p)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # attention and MLP add nothing: the last hidden state is the token's embedding
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)  # one-hot
        model.model.norm.weight.fill_(1.0)  # RMSNorm turns a one-hot into scale * one-hot
        scale = 1 / math.sqrt(1 / H + eps)
        model.lm_head.weight[:, :V] = (log_p / scale).float()
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluation_protocol_against_a_hand_computed_perplexity(tmp_path, capsys):
    """`loraprune eval` on a .jsonl of two texts with --seq-len 4: the texts are joined with "\\n\\n",
    tokenized without BOS, cut into non-overlapping windows of 4 from the first token (the remainder
    dropped), and each window scores its last 3 tokens. With P(successor | x) = p[x] known, the
    perplexity is exp(mean of -log p[x]) over exactly the scored pairs, written out below."""
    from loraprune.cli import main

    words = ["the", "cat", "sat", "\n\n", "on", "a", "mat", "dog", "ran"]
    p = {"the": 0.5, "cat": 0.4, "sat": 0.3, "\n\n": 0.2, "on": 0.6, "a": 0.7, "mat": 0.8, "dog": 0.1}
    folder = bigram_folder(tmp_path / "model", words, p)
    data = tmp_path / "two.jsonl"
    data.write_text('{"text": "the cat sat"}\n{"text": "on a mat dog ran"}\n')
    assert main(["eval", "--model", str(folder), "--data", str(data), "--seq-len", "4", "--json"]) in (0, None)
    result = json.loads(capsys.readouterr().out)
    # the tokenizer adds a BOS, so every window does (issue 15): BOS + 3 text tokens each.
    # tokens: the cat sat | \n\n on a | mat dog ran; windows 3; scored pairs: BOS->the, the->cat,
    # cat->sat, BOS->\n\n, \n\n->on, on->a, BOS->mat, mat->dog, dog->ran (BOS: uniform over the vocabulary)
    uniform = 1 / (len(words) + 3)
    probabilities = [uniform, p["the"], p["cat"], uniform, p["\n\n"], p["on"], uniform, p["mat"], p["dog"]]
    expected_loss = sum(-math.log(q) for q in probabilities) / len(probabilities)
    assert (result["windows"], result["tokens"], result["seq_len"], result["bos"]) == (3, 9, 4, True)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-5)
