"""Depth pruning (--layer-ratio, pipeline/depth.py): a removed layer computes exactly as if it were cut
out (KV cache included), its scores are what they say, a run resumes across a layer cut bit for bit,
and a uniform result loads in stock transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraprune import PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.pipeline.depth import drop_layers
from loraprune.pipeline.export import save_pruned
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.plan import check_compatible
from loraprune.runtime import checkpoint
from loraprune.tools.report import format_summary
from test_progressive import CORPUS, assert_same_run, run_on_corpus
from tiny import randomize_lora, tiny_encoder, tiny_model

LAYERS = 6  # layers 0 and 5 are skipped by default: 4 prunable
SETTINGS = dict(ratio=0.25, layer_ratio=0.5, steps=12, prune_freq=2, seq_len=16, batch_size=2, lr=1e-2,
                lora_dropout=0.0, seed=3)  # fmt: skip


def deep_model(family: str, seed: int = 0):
    sliding = {"layer_types": ["sliding_attention", "full_attention"] * (LAYERS // 2)} if "gemma" in family else {}
    return tiny_model(family, layers=LAYERS, seed=seed, **sliding)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-gqa", "gemma3-gqa", "phi3-gqa"])
def test_a_removed_layer_computes_as_if_cut_out(family):
    model = deep_model(family)
    arch = arch_for(model.config)
    config = PruneConfig(criterion="lora", ratio=0.0, layer_ratio=0.5, lora_dropout=0.0)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    pruner.depth.score.uniform_(generator=torch.Generator().manual_seed(1))
    pruner.prune_to(0.0, layers=0.5)
    kept = pruner.depth.kept()
    assert len(kept) == LAYERS - 2 and {0, LAYERS - 1} <= set(kept)  # skipped layers stay
    peft_model.eval()
    prompt = tokens()[:1, :5]
    with torch.no_grad():
        bypassed = peft_model(tokens()).logits
        bypassed_text = peft_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        with pruner.masks_lifted():  # the dense teacher sees every layer
            assert not torch.allclose(peft_model(tokens()).logits, bypassed, atol=1e-3)
        pruner.close()
        drop_layers(peft_model.get_base_model(), arch, kept)
        torch.testing.assert_close(peft_model(tokens()).logits, bypassed, rtol=0, atol=1e-5)
        cut_text = peft_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(cut_text, bypassed_text)  # the KV cache indexes the remaining layers
    config = peft_model.get_base_model().config
    assert config.num_hidden_layers == len(kept) == len(arch.layers_of(peft_model.get_base_model()))
    if "gemma" in family:  # each kept layer keeps its own attention type
        assert config.layer_types == [["sliding_attention", "full_attention"][i % 2] for i in kept]


def test_a_removed_layer_stops_computing_under_progressive_shrinking():
    model = deep_model("llama-gqa")
    arch = arch_for(model.config)
    config = PruneConfig(criterion="lora", ratio=0.0, layer_ratio=0.5, shrink="progressive")
    pruner = Pruner(attach_lora(model, arch, config).get_base_model(), arch, config)
    pruner.prune_to(0.0, layers=0.5)
    layers = arch.layers_of(model)
    dead = [i for i in pruner.prunable if not pruner.depth.alive[i]]
    calls = []
    for i in dead:
        layers[i].mlp.register_forward_hook(lambda *_: calls.append(1))
    model(tokens())
    assert len(dead) == 2 and calls == []
    pruner.close()  # the caller's model gets its layers' own forward back
    model(tokens())
    assert len(calls) == 2


@pytest.mark.parametrize("score", ["similarity", "taylor"])
def test_layer_scores_are_what_they_say(score):
    """One step with --ema 0: similarity is 1 - cos(input, output) of each prunable layer's hidden
    states averaged over tokens; taylor is |Σ ∂L/∂output · (output - input)|."""
    model = deep_model("llama-gqa")
    arch = arch_for(model.config)
    config = PruneConfig(criterion="lora", ratio=0.5, layer_ratio=0.5, layer_score=score, ema=0.0, lora_dropout=0.0)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    peft_model(tokens(), labels=tokens()).loss.backward()
    pruner.update_scores()
    pruner.close()
    out = peft_model(tokens(), labels=tokens(), output_hidden_states=True)
    states = out.hidden_states  # states[i]: layer i's input; states[i + 1] its output (before the final norm)
    for state in states[1:]:  # the embeddings' output needs no gradient (frozen)
        state.retain_grad()
    out.loss.backward()
    for i in pruner.prunable:
        given, output = states[i], states[i + 1]
        if score == "similarity":
            expected = (1 - torch.cosine_similarity(given, output, dim=-1)).mean()
        else:
            expected = (output.grad * (output - given)).sum().abs()
        torch.testing.assert_close(pruner.depth.score[i], expected.detach().float(), rtol=1e-4, atol=1e-6)
    assert pruner.depth.score[0] == 0 and pruner.depth.score[LAYERS - 1] == 0  # skipped: not scored


def _run(tokenizer, shrink, resume=None, checkpointer=None, family="llama-gqa", **settings):
    return run_on_corpus(deep_model(family), tokenizer, {**SETTINGS, **settings}, shrink, resume, checkpointer)


def test_layers_go_on_the_schedule_and_a_run_resumes_across_a_cut(tiny_tokenizer, tmp_path):
    saver = checkpoint.Checkpointer(tmp_path / "run", {"model": "tiny"}, every=7)
    model, report = _run(tiny_tokenizer, "progressive", checkpointer=saver)
    removed = [layer["index"] for layer in report["layers"] if layer["removed"]]
    assert len(removed) == 2 and report["removed"]["layers"] == 0.5
    assert "layers removed whole (of the pruned ones)" in format_summary(report)
    dense_layer = sum(p.numel() for p in deep_model("llama-gqa").model.layers[1].parameters())
    assert report["removed_parameters"]["layers"] == 2 * dense_layer
    assert model.config.num_hidden_layers == LAYERS - 2 and len(model.model.layers) == LAYERS - 2
    saved = checkpoint._read(tmp_path / "run" / "step-000007")
    alive = saved.tensors["pruner/layer_alive"]
    assert 0 < int((~alive).sum()) <= 2  # the checkpoint is taken after a layer cut
    resumed = _run(tiny_tokenizer, "progressive", resume=saved)
    assert_same_run((model, report), resumed, atol=0)  # bit for bit
    assert_same_run((model, report), _run(tiny_tokenizer, "end"))  # masked until the end: the same model


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-gqa", "gemma3-gqa", "phi3-gqa"])
def test_uniform_depth_pruning_loads_in_stock_transformers(tiny_tokenizer, tmp_path, family):
    model, _ = _run(tiny_tokenizer, "progressive", family=family, uniform=True, ratio=0.5, layer_ratio=0.34)
    folder = save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    assert stock.config.num_hidden_layers == LAYERS - 2 and not hasattr(stock.config, "loraprune_layout")
    with torch.no_grad():
        # float64, but Gemma's embedding scale is kept in float32 in memory and made anew on loading
        torch.testing.assert_close(stock(tokens()).logits, model.eval()(tokens()).logits, rtol=0, atol=1e-6)


def test_layer_budgets_that_cannot_be_met_are_refused(tmp_path, tiny_folder, text_file, capsys):
    with pytest.raises(LoraPruneError, match="--layer-ratio must be in"):
        PruneConfig(layer_ratio=1.0)
    with pytest.raises(LoraPruneError, match="would remove all 3 layers"):
        check_compatible(tiny_model("llama-gqa").config, PruneConfig(uniform=True, layer_ratio=0.9))
    with pytest.raises(LoraPruneError, match="decoder layers of causal LMs"):
        check_compatible(tiny_encoder("bert").config, PruneConfig(layer_ratio=0.5, seq_len=16))
    with pytest.raises(LoraPruneError, match="--layer-score must be one of"):
        PruneConfig(layer_score="cosine")
    out = tmp_path / "out"
    argv = ["prune", "--model", tiny_folder, "--data", text_file, "--output", out, "--uniform", "--layer-ratio", "0.9"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would remove all" in err[0] and not out.exists()


def test_target_params_counts_the_removed_layers(tiny_tokenizer):
    """--target-params with --layer-ratio: the group ratio is chosen for the layers that stay, and the
    run removes what the count predicts (at least)."""
    model = deep_model("llama-gqa")
    plan = check_compatible(model.config, PruneConfig(**{**SETTINGS, "target_params": 0.45}))
    width_only = check_compatible(model.config, PruneConfig(**{**SETTINGS, "target_params": 0.45, "layer_ratio": 0}))
    assert plan.config.ratio < width_only.config.ratio  # two whole layers already take part of the budget
    _, report = prune(model, tiny_tokenizer, CORPUS, plan, progress=False)
    # a lower bound: a k/v head goes when every query head reading it does, which the scores decide
    assert plan.target["predicted"] <= report["removed"]["total_parameters"] < plan.target["predicted"] + 0.02
    assert abs(plan.target["predicted"] - 0.45) < 0.05


def test_depth_pruned_models_export_to_gguf(tiny_tokenizer, tmp_path):
    """Fewer layers of one shape: llama.cpp's own architecture (checked against its loader's rules; `make
    llamacpp-check` runs one in llama.cpp), read back by transformers' GGUF loader with the same logits."""
    from llamacpp_rules import load_errors
    from loraprune.pipeline.gguf_export import export_gguf
    from tiny_gguf import bpe_tokenizer

    model, _ = _run(tiny_tokenizer, "progressive", uniform=True, ratio=0.5, layer_ratio=0.34)
    folder = save_pruned(model.float(), bpe_tokenizer(), tmp_path / "out", {})
    result = export_gguf(folder, tmp_path / "m.gguf")
    assert result["architecture"] == "llama" and len(result["layers"]) == LAYERS - 2
    assert load_errors(tmp_path / "m.gguf") == []
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, model(tokens()).logits, rtol=0, atol=1e-5)
