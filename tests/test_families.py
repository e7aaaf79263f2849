"""The modern decoder families (issue 15): Qwen3, Gemma 2, Gemma 3 (text), Phi-3 (fused qkv and
gate_up), and a llama with its own head_dim and Llama 3.1-style rope scaling. For each: masked ≡
pruned with a whole k/v group removed, reload where loraprune cannot be imported (per-layer: the
bundled remote code; uniform: stock transformers), and cached generation ≡ full recompute with
prompts longer than the sliding window. The shared parametrized tests (test_shrink.py) also run them.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Olmo2Config

from loraprune import PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.pipeline.data import bos_token_id, tokenize, windows
from loraprune.pipeline.export import MODELING_FILE, save_pruned
from loraprune.pipeline.groups import LayerGroups
from loraprune.pipeline.importance import magnitude
from loraprune.pipeline.load import load_config, load_model
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.modeling_pruned import LAYOUT_KEY, is_grouped_evenly
from loraprune.pipeline.pruner import group_scores
from loraprune.pipeline.schedule import SparsitySchedule
from loraprune.pipeline.target import ParameterCounts
from loraprune.tasks import TASKS
from loraprune.tools.diagnose import diagnose, format_diagnosis
from loraprune.tools.estimate import estimate
from loraprune.tools.inspect_model import describe
from tiny import (
    FAMILIES,
    assert_cached_generation_matches_recompute,
    masked_then_pruned,
    reload_logits,
    tiny_config,
    tiny_model,
)
from tiny_gguf import write_gguf

MODERN = ["llama-head-dim", "qwen3-gqa", "gemma2-gqa", "gemma3-gqa", "phi3-gqa"]


def prompt_tokens(length: int = 10) -> torch.Tensor:
    return torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def pruned_families(tmp_path_factory, tiny_tokenizer_module):
    """Every modern family pruned per layer (a whole k/v group removed in one layer, uneven sharing in
    another) and uniformly, saved, and reloaded in one subprocess without loraprune (per-layer: the
    bundled remote code; uniform: stock transformers): family -> {layout: (masked, pruned, model,
    expected logits, reloaded logits)}."""
    root = tmp_path_factory.mktemp("families")
    tokens, built, folders = prompt_tokens(), {}, {}
    for family in MODERN:
        for layout, uniform in (("per-layer", False), ("uniform", True)):
            masked, pruned, model, _ = masked_then_pruned(family, 0.5, uniform=uniform, drop_kv_group=not uniform)
            name = f"{family}-{layout}"
            save_pruned(model, tiny_tokenizer_module, root / name, {})
            with torch.no_grad():
                expected = model(input_ids=tokens).logits
            built[name] = (masked, pruned, model, expected)
            folders[name] = not uniform
    reloaded = reload_logits(root, tokens, folders)
    return root, {name: (*entry, reloaded[name]) for name, entry in built.items()}


@pytest.mark.parametrize("family", MODERN)
def test_modern_family_prunes_reloads_and_generates(pruned_families, family):
    root, built = pruned_families
    for layout in ("per-layer", "uniform"):
        masked, pruned, model, expected, reloaded = built[f"{family}-{layout}"]
        torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)  # masked ≡ pruned
        torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)  # reload without loraprune
        # the cache past a sliding window of 4 tokens
        assert_cached_generation_matches_recompute(model, prompt_tokens(7))

    # per-layer: the first pruned layer lost k/v head 0 with its 3 query heads, the last shares unevenly
    layout = getattr(built[f"{family}-per-layer"][2].config, LAYOUT_KEY)["layers"]
    assert layout[1]["kv_heads"] == 1 and layout[1]["kv_index"] == [0, 0, 0]
    assert not is_grouped_evenly(layout[2]["kv_index"], layout[2]["kv_heads"])
    assert (root / f"{family}-per-layer" / MODELING_FILE).exists()
    # uniform: the family's own config fields (6 heads in 2 k/v groups: 1 head of each kept), no remote code
    config = built[f"{family}-uniform"][2].config
    assert not hasattr(config, LAYOUT_KEY) and not (root / f"{family}-uniform" / MODELING_FILE).exists()
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 2, 20)

    dense = tiny_config(family).to_dict()
    for layout in ("per-layer", "uniform"):  # all but the pruned sizes carried over unchanged (rope scaling, windows)
        saved = json.loads((root / f"{family}-{layout}" / "config.json").read_text())
        for key in ("rope_parameters", "sliding_window", "layer_types", "head_dim", "attn_logit_softcapping"):
            if key in dense:  # (Phi3Config has no head_dim field: the pruned config states it, 8)
                assert saved[key] == dense[key], key


def test_whole_width_qk_norm_is_refused():
    with pytest.raises(LoraPruneError, match="cannot prune 'olmo2' models: its q/k RMSNorm normalises over all heads"):
        arch_for(Olmo2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=40))


CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)


@pytest.mark.parametrize(
    "family, criterion",
    [(family, c) for family in MODERN for c in ("lora", "streamed")]
    + [("phi3-gqa", "sketch"), ("phi3-gqa", "gradient")],
)
def test_modern_family_trains_prunes_and_inspects(tiny_tokenizer, family, criterion):
    """The whole method (LoRA on every projection, fused ones included, scores, masks, shrink), and
    the config-only and diagnostic tools: inspect, estimate, diagnose."""
    config = PruneConfig(ratio=0.5, steps=6, prune_freq=2, seq_len=16, batch_size=2, criterion=criterion)
    pruned, report = prune(tiny_model(family), tiny_tokenizer, CORPUS, config, progress=False)
    assert report["skipped_score_updates"] == 0 and report["score_updates"] == SparsitySchedule.of(config).end
    assert [(layer["heads"], layer["channels"]) for layer in report["layers"]][1] == (3, 20)
    assert report["parameters"]["after"]["total"] == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=prompt_tokens()).logits).all()

    model_config = tiny_config(family)
    info = describe(model_config)
    assert (info["heads"], info["kv_heads"], info["mlp_width"]) == (6, 2, 40)
    assert info["head_dim"] == FAMILIES[family][3].get("head_dim", 8)
    row = next(r for r in info["ratios"] if r["ratio"] == 0.5 and r["uniform"])
    assert row["possible"] and (row["heads"], row["channels"]) == (2, 20)
    assert info["prunable_parameters"] == report["parameters"]["before"]["prunable"]
    assert estimate(model_config, batch_size=2, seq_len=16).peak > 0

    if criterion == "lora":
        windows = torch.randint(3, 64, (8, 16), generator=torch.Generator().manual_seed(0))
        result = diagnose(tiny_model(family), windows, config, TASKS["causal-lm"], [0, 2], 1, 3, progress=False)
        summary = result["points"][-1]["summary"]
        assert all(-1 <= value <= 1 for key, value in summary.items() if "spearman" in key or "cosine" in key)
        roles = set(arch_for(model_config).projections(tiny_model(family).model.layers[0]))
        assert {key.split("/")[1] for key in summary if key.startswith("cosine/")} == roles
        assert all(f"cos {role}" in format_diagnosis(result) for role in roles)  # phi3: qkv, gate_up


def test_phi3_fused_projections_are_an_unfused_llama():
    """A Phi-3 whose qkv_proj is [q; k; v] and gate_up_proj [gate; up] of a llama computes the llama's
    function, and the fused row ranges give the llama's group scores and parameter counts."""
    phi3 = tiny_model("phi3-gqa")
    llama_config = tiny_config("llama-gqa")
    llama_config.rms_norm_eps = phi3.config.rms_norm_eps  # 1e-5 (llama's default: 1e-6)
    llama = LlamaForCausalLM(llama_config).eval()
    state = {}
    for name, tensor in phi3.state_dict().items():
        if "qkv_proj" in name:
            for part, rows in zip(("q", "k", "v"), tensor.split([48, 16, 16]), strict=True):
                state[name.replace("qkv_proj", f"{part}_proj")] = rows
        elif "gate_up_proj" in name:
            for part, rows in zip(("gate", "up"), tensor.chunk(2), strict=True):
                state[name.replace("gate_up_proj", f"{part}_proj")] = rows
        else:
            state[name] = tensor
    llama.load_state_dict(state, strict=False)
    tokens = prompt_tokens()
    with torch.no_grad():
        torch.testing.assert_close(phi3(input_ids=tokens).logits, llama(input_ids=tokens).logits)

    scores = []
    for model in (phi3, llama):
        arch = arch_for(model.config)
        peft_model = attach_lora(model, arch, PruneConfig(lora_dropout=0.0))  # B = 0: scores are |W0|'s
        projections = arch.projections(arch.layers_of(peft_model.get_base_model())[1])
        groups = LayerGroups.from_config(model.config, arch)
        scores.append(group_scores(projections, groups, magnitude, torch.ones(6, dtype=torch.bool), True))
    for fused, plain in zip(*scores, strict=True):
        torch.testing.assert_close(fused, plain)
    counts = [ParameterCounts.of(tiny_config(family), PruneConfig()) for family in ("phi3-gqa", "llama-gqa")]
    assert (counts[0].head, counts[0].kv_head, counts[0].channel) == (
        counts[1].head,
        counts[1].kv_head,
        counts[1].channel,
    )


def bos_tokenizer():
    """The tests' word-level tokenizer, with a <bos> (id 2, as the tiny Gemmas' bos_token_id) put
    before every text, as Gemma's and Llama 3's tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from conftest import WORDS

    vocab = {word: i for i, word in enumerate(["<unk>", "</s>", "<bos>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", bos_token="<bos>")


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tmp_path, capsys, tiny_tokenizer, text_file):
    assert bos_token_id(tiny_tokenizer) is None
    tokenizer = bos_tokenizer()
    assert bos_token_id(tokenizer) == 2
    text = text_file.read_text()
    tokens = tokenize(tokenizer, text)
    assert 2 not in tokens  # the text's tokens carry no BOS ...
    cut = windows(tokens, 16, bos=2)  # ... each window gets one, then the next 15 text tokens
    assert (cut[:, 0] == 2).all() and torch.equal(cut[:, 1:].flatten(), tokens[: cut.shape[0] * 15])
    assert torch.equal(windows(tokens, 16), tokens[: len(tokens) // 16 * 16].view(-1, 16))  # no BOS: as before

    folder = tmp_path / "gemma"
    tiny_model("gemma3-gqa").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["eval", "--model", str(folder), "--data", str(text_file), "--seq-len", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bos"] and result["tokens"] == cut.numel() - len(cut)  # every text token after a BOS is scored
    assert main(["eval", "--model", str(folder), "--data", str(text_file), "--seq-len", "16"]) == 0
    assert "perplexity (16-token windows, each starting with BOS)" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen3-gqa", "gemma2-gqa", "gemma3-gqa", "phi3-gqa"])
def test_gguf_input(tmp_path, family):
    """A .gguf file of each family (written here as llama.cpp would) loads with the weights it holds
    and prunes. transformers' GGUF reader keeps only what llama.cpp writes: Gemma's
    query_pre_attn_scalar, soft-capping and sliding pattern fall back to the config class's
    defaults (the reference below is built from the config read from the file); Qwen3's head size
    is restored from attention.key_length by our loader (transformers would use 128)."""
    original = tiny_model(family)
    path = tmp_path / f"{family}.gguf"
    write_gguf(original, path)
    model, tokenizer = load_model(str(path))
    assert type(model) is type(original)
    reference = AutoModelForCausalLM.from_config(load_config(str(path))).eval()
    reference.load_state_dict(original.state_dict())
    tokens = prompt_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, reference(input_ids=tokens).logits)
    text = " ".join(["ABC abc DEF def"] * 60)
    config = PruneConfig(ratio=0.5, steps=4, prune_freq=2, warmup=0, cooldown=0, seq_len=16, batch_size=2)
    pruned, report = prune(model, tokenizer, text, config, progress=False)
    assert report["layers"][1]["heads"] == 3 and report["skipped_score_updates"] == 0
