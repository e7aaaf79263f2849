"""--shrink progressive (dead groups cut out at every pruning step) against --shrink end (masked
until the end): with LoRA dropout 0 both must give the same masks, scores and merged weights,
for decoders with GQA, qwen2's biases, BERT and ViT, and a run resumed from a checkpoint taken
after a shrink must too. The runs are in float64: in float32 the two modes round differently
(shrunk and masked products sum different numbers of terms) and 12 AdamW steps at lr 1e-2 amplify
that up to 5e-5 on some seeds, which would hide a real difference of that size."""

import pytest
import torch

from loraprune import PruneConfig, prune
from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.plan import resolve_shrink
from loraprune.runtime import checkpoint
from tiny import ENCODERS, tiny_encoder, tiny_model

CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park it was big small red blue"] * 40)
SENTENCES = ["the cat sat on a mat", "a dog ran to the park", "it was big and red", "the small blue cat"] * 4
SETTINGS = dict(ratio=0.5, steps=12, prune_freq=2, seq_len=16, batch_size=2, lr=1e-2, lora_dropout=0.0, seed=3)


def _model(family):
    if family not in ENCODERS:
        return tiny_model(family)
    model = tiny_encoder(family)
    for name, module in model.named_modules():
        # BERT's dropout on the attention probabilities draws one number per head and position: with it
        # the two modes draw different random numbers (the same in distribution); on the hidden states
        # (the same shape in both) it may stay
        if name.endswith("attention.self.dropout"):
            module.p = 0.0
    return model


def _data(family, tokenizer):
    if family == "bert":
        tokenizer.pad_token = "</s>"
        return SENTENCES
    if family == "vit":
        g = torch.Generator().manual_seed(0)
        return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    return CORPUS


def run_on_corpus(model, tokenizer, settings: dict, shrink, resume=None, checkpointer=None):
    """prune() of a tiny decoder in float64 on CORPUS, as the depth and hidden-size tests run it."""
    return prune(model.double(), tokenizer, CORPUS, PruneConfig(**settings, shrink=shrink), progress=False,
                 checkpointer=checkpointer, resume=resume)  # fmt: skip


def _run(family, tokenizer, shrink, resume=None, checkpointer=None, **settings):
    config = PruneConfig(**{**SETTINGS, **settings}, shrink=shrink)
    tokenizer = None if family == "vit" else tokenizer
    return prune(_model(family).double(), tokenizer, _data(family, tokenizer), config, progress=False,
                 checkpointer=checkpointer, resume=resume)  # fmt: skip


def assert_same_run(a, b, atol=1e-10):
    (model_a, report_a), (model_b, report_b) = a, b
    for name in ("head_alive", "channel_alive"):
        assert torch.equal(report_a["scores"][name], report_b["scores"][name]), name
    for name in ("head_score", "channel_score"):
        torch.testing.assert_close(
            report_a["scores"][name], report_b["scores"][name], atol=atol, rtol=1e-6
        )  # float32 averages
    weights_a, weights_b = model_a.state_dict(), model_b.state_dict()
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert weights_a[name].shape == weights_b[name].shape, name
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=atol, rtol=0, msg=name)
    assert report_a["layers"] == report_b["layers"]
    assert report_a["parameters"]["after"] == report_b["parameters"]["after"]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-gqa", "phi3-gqa", "bert", "vit"])
def test_progressive_equals_end(family, tiny_tokenizer):
    end = _run(family, tiny_tokenizer, "end")
    progressive = _run(family, tiny_tokenizer, "progressive")
    assert_same_run(end, progressive)
    assert not end[1]["scores"]["head_alive"].all()  # something was pruned
    # the model shrank while training: the parameter count falls at the pruning steps, and the
    # steps after the last one run on the final model; the masked run stays dense throughout
    history, dense = progressive[1]["history"], progressive[1]["parameters"]["before"]["total"]
    assert end[1]["history"]["parameters"] == [dense] * SETTINGS["steps"]
    counts = history["parameters"]
    assert counts[0] == dense and counts[-1] == progressive[1]["parameters"]["after"]["total"]
    assert all(b <= a for a, b in zip(counts, counts[1:], strict=False)) and counts[-1] < dense
    assert len(history["step_seconds"]) == SETTINGS["steps"]
    assert progressive[1]["config"]["shrink"] == "progressive" and end[1]["config"]["shrink"] == "end"


@pytest.mark.parametrize("family", ["llama-gqa", "vit"])  # BERT cannot be --uniform
def test_global_allocation_and_uniform_progressive_equal_end(family, tiny_tokenizer):
    for settings in (dict(allocation="global", skip_layers="none"), dict(uniform=True)):
        assert_same_run(_run(family, tiny_tokenizer, "end", **settings),
                        _run(family, tiny_tokenizer, "progressive", **settings))  # fmt: skip


@pytest.mark.parametrize("family", ["llama-gqa", "vit"])
def test_resume_across_a_shrink(family, tiny_tokenizer, tmp_path):
    """Checkpoint at step 7 (after the shrinks of steps 3 and 5), resume a fresh dense model from it:
    it is shrunk to the checkpoint's masks, its LoRA factors and AdamW moments fit, and the result
    is the uninterrupted run's."""
    saver = checkpoint.Checkpointer(tmp_path / "run", {"model": "tiny"}, every=7)
    uninterrupted = _run(family, tiny_tokenizer, "progressive", checkpointer=saver)
    saved = checkpoint._read(tmp_path / "run" / "step-000007")
    assert saved.state["history"]["pruning_steps"][:2] and saved.tensors["pruner/shapes"].min() > 0
    assert not saved.tensors["pruner/head_alive"].all()  # the checkpoint is of a shrunk model
    resumed = _run(family, tiny_tokenizer, "progressive", resume=saved)
    assert_same_run(uninterrupted, resumed, atol=0)  # bit for bit
    assert_same_run(_run(family, tiny_tokenizer, "end"), resumed)


def test_progressive_default_and_refusals(tiny_tokenizer):
    assert PruneConfig().shrink is None
    _, report = _run("llama-gqa", tiny_tokenizer, None, steps=6)
    assert report["config"]["shrink"] == "progressive"
    _, report = _run("llama-gqa", tiny_tokenizer, None, steps=6, distill=0.5, distill_top_k=0)
    assert report["config"]["shrink"] == "end"  # the teacher is the dense model inside
    with pytest.raises(LoraPruneError, match="--shrink progressive cannot be combined with --distill"):
        _run("llama-gqa", tiny_tokenizer, "progressive", steps=6, distill=0.5, distill_top_k=0)
    with pytest.raises(LoraPruneError, match="--shrink must be one of progressive, end"):
        PruneConfig(shrink="sometimes")
    assert resolve_shrink(PruneConfig(), sharded=True).shrink == "end"
    assert resolve_shrink(PruneConfig(), sharded=False, quantized=True).shrink == "end"
    with pytest.raises(LoraPruneError, match="with 8-/4-bit weights: quantized weights are sliced only"):
        resolve_shrink(PruneConfig(shrink="progressive"), sharded=False, quantized=True)


def test_fsdp_refuses_progressive_before_loading(tmp_path, tiny_folder, text_file, capsys):
    argv = ["prune", "--model", tiny_folder, "--data", text_file, "--output", tmp_path / "out", "--fsdp"]
    assert main([*map(str, argv), "--shrink", "progressive"]) == 2
    err = capsys.readouterr().err
    assert "--shrink progressive cannot be combined with --fsdp: FSDP shards the layers once" in err


def test_gradient_checkpointing_and_bfloat16(tiny_tokenizer):
    """Recomputed activations see the shrunk layers like the first forward did; bfloat16 weights are
    sliced as they are (the factors and moments keep their own dtype)."""
    assert_same_run(_run("llama-gqa", tiny_tokenizer, "end"),
                    _run("llama-gqa", tiny_tokenizer, "progressive", gradient_checkpointing=True))  # fmt: skip
    config = PruneConfig(**SETTINGS, shrink="progressive")
    model = tiny_model("mistral-gqa").to(torch.bfloat16)
    pruned, report = prune(model, tiny_tokenizer, CORPUS, config, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())
    assert all(torch.isfinite(torch.tensor(report["history"]["loss"])))
    assert report["history"]["parameters"][-1] == report["parameters"]["after"]["total"]
