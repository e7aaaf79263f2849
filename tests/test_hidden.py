"""Hidden-size pruning (--hidden-ratio, pipeline/hidden.py): the masked model is the cut one for every
decoder family it applies to, the scores are the first-order estimate they say, a run resumes across
a hidden cut bit for bit, and a uniform result loads in stock transformers and llama.cpp's loader."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraprune import PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.pipeline.export import save_pruned
from loraprune.pipeline.hidden import shrink_hidden
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.shrink import shrink
from loraprune.plan import check_compatible
from loraprune.runtime import checkpoint
from loraprune.tools.report import format_summary
from test_progressive import CORPUS, assert_same_run, run_on_corpus
from tiny import randomize_lora, tiny_encoder, tiny_model

SETTINGS = dict(ratio=0.25, hidden_ratio=0.25, steps=12, prune_freq=2, seq_len=16, batch_size=2, lr=1e-2,
                lora_dropout=0.0, seed=3)  # fmt: skip


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def masked_pruner(family: str, hidden_ratio: float = 0.25):
    model = tiny_model(family)
    arch = arch_for(model.config)
    config = PruneConfig(criterion="lora", ratio=0.5, hidden_ratio=hidden_ratio, lora_dropout=0.0)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    return peft_model, pruner, arch


FAMILIES = ["llama-gqa", "llama-mha", "mistral-gqa", "qwen2-gqa", "qwen3-gqa", "phi3-gqa", "gemma2-gqa", "gemma3-gqa"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_masked_model_is_the_cut_one(family):
    peft_model, pruner, arch = masked_pruner(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms that are not the identity (Gemma's start at weight 0, gain 1)
        for name, weight in peft_model.named_parameters():
            if "norm" in name:
                weight.uniform_(-0.5, 0.5, generator=g)
    for score in (pruner.head_score, pruner.channel_score, pruner.hidden.score):
        score.uniform_(generator=g)
    pruner.prune_to(0.5, 0.0, 0.25)
    peft_model.eval()
    epsilon = peft_model.config.rms_norm_eps
    with torch.no_grad():
        masked = peft_model(tokens()).logits
        with pruner.masks_lifted():  # the dense teacher has every channel
            assert not torch.allclose(peft_model(tokens()).logits, masked, atol=1e-3)
        pruner.close()
        base = peft_model.get_base_model()
        shrink(base, arch, *pruner.physical_masks())
        shrink_hidden(base, arch, pruner.hidden.alive)
        cut = peft_model.merge_and_unload()
        kept = int(pruner.hidden.alive.sum())
        assert kept == len(pruner.hidden.alive) * 3 // 4 == cut.config.hidden_size
        assert cut.get_input_embeddings().weight.shape[1] == kept
        # exact but for the per-head q/k norms, whose epsilon grows with the config's (Qwen3; Gemma's
        # stays, its embedding scale shrinking the stream instead)
        torch.testing.assert_close(cut(tokens()).logits, masked, rtol=0, atol=1e-5 if "qwen3" in family else 1e-6)
        if family.startswith("gemma"):
            assert cut.config.rms_norm_eps == epsilon


def test_hidden_scores_are_the_first_order_estimate():
    """One step with --ema 0: channel j scores |Σ ∂L/∂w · w| over the tokens and every write w of the
    residual stream: the embedding's output and each o and down projection's."""
    peft_model, pruner, arch = masked_pruner("llama-gqa")
    pruner.config.ema = 0.0
    pruner.hidden.ema = 0.0
    peft_model(tokens(), labels=tokens()).loss.backward()
    pruner.update_scores()
    pruner.close()
    writes = []

    def keep(module, args, output):
        output = output if output.requires_grad else output.detach().requires_grad_()
        output.retain_grad()
        writes.append(output)
        return output

    base = peft_model.get_base_model()
    modules = [base.get_input_embeddings()]
    modules += [arch.projections(layer)[role] for layer in arch.layers_of(base) for role in ("o", "down")]
    handles = [m.register_forward_hook(keep) for m in modules]
    peft_model(tokens(), labels=tokens()).loss.backward()
    for handle in handles:
        handle.remove()
    expected = sum((w.grad * w).sum((0, 1)) for w in writes).abs()
    torch.testing.assert_close(pruner.hidden.score, expected.detach(), rtol=1e-4, atol=1e-8)


def _run(tokenizer, shrink_mode, resume=None, checkpointer=None, family="llama-gqa", **settings):
    return run_on_corpus(tiny_model(family), tokenizer, {**SETTINGS, **settings}, shrink_mode, resume, checkpointer)


def test_a_run_resumes_across_a_hidden_cut(tiny_tokenizer, tmp_path):
    saver = checkpoint.Checkpointer(tmp_path / "run", {"model": "tiny"}, every=7)
    model, report = _run(tiny_tokenizer, "progressive", checkpointer=saver)
    assert model.config.hidden_size == 36 and report["removed"]["hidden"] == 0.25
    assert "hidden size removed" in format_summary(report) and "25.0%" in format_summary(report)
    kinds, counts = report["removed_parameters"], report["parameters"]
    assert kinds["hidden"] > 0 and kinds["heads_and_channels"] > 0 and kinds["layers"] == 0
    assert sum(kinds.values()) == counts["before"]["total"] - counts["after"]["total"]
    assert "  by hidden" in format_summary(report)
    saved = checkpoint._read(tmp_path / "run" / "step-000007")
    assert 0 < int((~saved.tensors["pruner/hidden_alive"]).sum()) <= 12  # taken after a hidden cut
    assert_same_run((model, report), _run(tiny_tokenizer, "progressive", resume=saved), atol=0)  # bit for bit
    assert_same_run((model, report), _run(tiny_tokenizer, "end"))


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-gqa", "phi3-gqa", "gemma3-gqa"])
def test_uniform_hidden_pruning_loads_in_stock_transformers_and_llamacpp(tiny_tokenizer, tmp_path, family):
    from llamacpp_rules import load_errors
    from loraprune.pipeline.gguf_export import export_gguf
    from tiny_gguf import bpe_tokenizer

    model, _ = _run(tiny_tokenizer, "progressive", family=family, uniform=True, ratio=0.5)
    folder = save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    assert stock.config.hidden_size == 36 and not hasattr(stock.config, "loraprune_layout")
    with torch.no_grad():
        torch.testing.assert_close(stock(tokens()).logits, model.eval()(tokens()).logits, rtol=0, atol=1e-10)
    if family in ("phi3-gqa", "gemma3-gqa"):  # no GGUF export for these families
        return
    folder = save_pruned(model.float(), bpe_tokenizer(), tmp_path / "gguf", {})
    export_gguf(folder, tmp_path / "m.gguf")
    assert load_errors(tmp_path / "m.gguf") == []


@pytest.mark.parametrize("shrink_mode", ["progressive", "end"])
def test_a_uniform_head_count_only_the_cut_hidden_size_admits_is_a_stock_model(tiny_tokenizer, tmp_path, shrink_mode):
    """3 heads of 8 do not divide LlamaConfig's hidden size 32, but they divide the 24 left by
    --hidden-ratio 0.25: the run is accepted and the result is a stock model, not a per-layer layout."""
    model, _ = _run(tiny_tokenizer, shrink_mode, family="llama-mha", uniform=True, ratio=0.25)
    assert (model.config.num_attention_heads, model.config.hidden_size) == (3, 24)
    assert not hasattr(model.config, "loraprune_layout")
    folder = save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(tokens()).logits, model.eval()(tokens()).logits, rtol=0, atol=1e-10)


def test_hidden_budgets_that_cannot_be_met_are_refused(tmp_path, tiny_folder, text_file, capsys):
    with pytest.raises(LoraPruneError, match="--hidden-ratio must be in"):
        PruneConfig(hidden_ratio=1.0)
    llama = tiny_model("llama-gqa").config
    with pytest.raises(LoraPruneError, match=r"leaves 43 hidden channels, which LlamaConfig rejects .*accepted: 0.125"):
        check_compatible(llama, PruneConfig(hidden_ratio=0.1, seq_len=16))
    with pytest.raises(LoraPruneError, match="causal LMs"):
        check_compatible(tiny_encoder("bert").config, PruneConfig(hidden_ratio=0.25, seq_len=16))
    out = tmp_path / "out"
    argv = ["prune", "--model", tiny_folder, "--data", text_file, "--output", out, "--hidden-ratio", "0.1"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rejects" in err[0] and not out.exists()


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa", "qwen2-gqa", "phi3-gqa"])
def test_target_params_counts_the_hidden_channels(tiny_tokenizer, family):
    """--target-params with --hidden-ratio (and --layer-ratio): the group ratio is chosen for what the
    hidden and layer cuts leave, and the run removes what the count predicts (at least)."""
    model = tiny_model(family, layers=6)
    settings = {**SETTINGS, "target_params": 0.45, "layer_ratio": 0.25}
    plan = check_compatible(model.config, PruneConfig(**settings))
    assert (
        plan.config.ratio < check_compatible(model.config, PruneConfig(**{**settings, "hidden_ratio": 0})).config.ratio
    )
    _, report = prune(model, tiny_tokenizer, CORPUS, plan, progress=False)
    # a lower bound: a k/v head goes when every query head reading it does, which the scores decide
    assert plan.target["predicted"] <= report["removed"]["total_parameters"] < plan.target["predicted"] + 0.02
    if family == "llama-mha":  # each k/v head goes with its query head: the count is exact
        assert report["removed"]["total_parameters"] == pytest.approx(plan.target["predicted"], abs=1e-12)
