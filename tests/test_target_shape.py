"""--target-shape mix (pipeline/target.py): --target-params alone chooses whole layers, then the hidden
size, then heads and channels, within the shares it documents, at sizes the family's config accepts;
the run removes what the plan predicts; settings that would contradict it are refused before any work."""

from dataclasses import replace

import pytest

from loraprune import PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.pipeline.hidden import hidden_config_error
from loraprune.pipeline.target import (
    MIX_DEPTH_HIDDEN_SHARE,
    MIX_DEPTH_SHARE,
    MIX_HIDDEN_MULTIPLE,
    MIX_MOST_LAYERS,
    ParameterCounts,
)
from loraprune.plan import check_compatible
from test_hidden import SETTINGS
from test_progressive import CORPUS
from tiny import tiny_encoder, tiny_model

MIX = {**SETTINGS, "ratio": 0.5, "hidden_ratio": 0.0, "target_shape": "mix"}


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-gqa", "mistral-gqa", "phi3-gqa"])
@pytest.mark.parametrize("target", [0.25, 0.4])
def test_mix_takes_layers_then_hidden_size_within_their_shares(family, target):
    config = tiny_model(family, layers=8).config
    plan = check_compatible(config, PruneConfig(**MIX, target_params=target))
    counts = ParameterCounts.of(config, plan.config)
    budget = target * counts.total
    layers, cut = counts.removed_layers, counts.removed_hidden
    assert layers >= 1 and (cut >= 1 or target < 0.4)  # 40% of these models has room for both
    # the most whole layers within their share; one more would pass it
    assert layers * counts.layer <= MIX_DEPTH_SHARE * budget < (layers + 1) * counts.layer
    assert layers <= MIX_MOST_LAYERS * counts.prunable_layers
    # the largest accepted hidden cut that keeps layers and hidden size within theirs
    kept = counts.hidden - cut
    assert hidden_config_error(config, arch_for(config), kept) is None
    assert counts.removed(0.0, False) <= MIX_DEPTH_HIDDEN_SHARE * budget
    larger = next(k for k in range(kept - 1, 0, -1) if hidden_config_error(config, arch_for(config), k) is None)
    assert replace(counts, removed_hidden=counts.hidden - larger).removed(0.0, False) > MIX_DEPTH_HIDDEN_SHARE * budget
    # heads and channels fill the rest: the prediction lands near the target
    assert plan.config.ratio > 0 and plan.target["predicted"] == pytest.approx(target, abs=0.03)


def test_mix_leaves_most_layers_where_the_embedding_dominates():
    """With a large vocabulary half the target would be most of the layers: a third of them go."""
    config = tiny_model("llama-gqa", layers=8, vocab_size=2048).config
    plan = check_compatible(config, PruneConfig(**MIX, target_params=0.4))
    counts = ParameterCounts.of(config, plan.config)
    assert MIX_DEPTH_SHARE * 0.4 * counts.total >= (counts.removed_layers + 1) * counts.layer  # the share allows more
    assert counts.removed_layers == int(MIX_MOST_LAYERS * counts.prunable_layers) == 2
    assert counts.removed_hidden > 0 and plan.target["predicted"] == pytest.approx(0.4, abs=0.03)


def test_mix_keeps_a_hidden_size_of_64s_where_the_model_has_one():
    """llama.cpp's kernels slow down on other sizes: a 256-wide model keeps 192 or 128, never 200."""
    config = tiny_model("llama-mha", layers=8, hidden_size=256, num_attention_heads=4, num_key_value_heads=4).config
    plan = check_compatible(config, PruneConfig(**MIX, target_params=0.4))
    cut = plan.config.removed_hidden(256)
    assert cut > 0 and cut % MIX_HIDDEN_MULTIPLE == 0
    # alignment decided it: four more channels fit the share, at a size the config accepts
    counts = ParameterCounts.of(config, plan.config)
    assert replace(counts, removed_hidden=cut + 4).removed(0.0, False) <= MIX_DEPTH_HIDDEN_SHARE * 0.4 * counts.total
    assert hidden_config_error(config, arch_for(config), 256 - cut - 4) is None


def test_a_mix_run_removes_what_its_plan_predicts(tiny_tokenizer):
    model = tiny_model("llama-mha", layers=8)  # plain attention: every removed query head takes its k/v head
    plan = check_compatible(model.config, PruneConfig(**MIX, target_params=0.4))
    _, report = prune(model, tiny_tokenizer, CORPUS, plan, progress=False)
    went = report["removed_parameters"]
    assert went["layers"] > 0 and went["hidden"] > 0
    assert report["removed"]["total_parameters"] == pytest.approx(plan.target["predicted"], abs=1e-12)
    assert report["config"]["target_shape"] == "mix" and report["config"]["layer_ratio"] > 0


def test_mix_settings_that_contradict_it_are_refused(tmp_path, tiny_folder, text_file, capsys):
    llama = tiny_model("llama-gqa", layers=8).config
    for given in ({}, {"target_params": 0.3, "layer_ratio": 0.25}, {"target_params": 0.3, "hidden_ratio": 0.125}):
        with pytest.raises(LoraPruneError, match="give --target-params and neither ratio"):
            check_compatible(llama, PruneConfig(**{**MIX, **given}))
    with pytest.raises(LoraPruneError, match="causal LMs"):
        check_compatible(tiny_encoder("bert").config, PruneConfig(**MIX, target_params=0.3))
    with pytest.raises(LoraPruneError, match="--target-shape must be one of width, mix"):
        PruneConfig(target_shape="depth")
    out = tmp_path / "out"
    argv = ["prune", "--model", tiny_folder, "--data", text_file, "--output", out, "--target-shape", "mix"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target-params" in err[0] and not out.exists()
