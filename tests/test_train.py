"""train.py: gradient accumulation, and the activation-checkpointing helper on either transformers API."""

import warnings

import torch

from loraprune import PruneConfig, prune
from loraprune.pipeline.train import is_activation_checkpointing, set_activation_checkpointing
from tiny import tiny_model

CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)


def test_gradient_accumulation_equals_one_batch_of_the_same_windows(tiny_tokenizer):
    """2 micro-batches of 2 windows per step are the 4 windows of one batch (the sampler draws them in
    order): the mean of the two halves' mean losses is the batch's, so the gradients, scores, masks
    and weights agree up to float summation order. The lora criterion: streamed adds |...| per micro-batch
    (README, --criterion streamed), so its scores depend on how a step's windows are split."""
    common = dict(criterion="lora", ratio=0.5, steps=8, prune_freq=2, seq_len=16, lora_dropout=0.0, lr=1e-2)
    common["skip_layers"] = "none"
    one, report_one = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, PruneConfig(**common, batch_size=4), False)
    accumulated, report_acc = prune(
        tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, PruneConfig(**common, batch_size=2, grad_accum=2), False
    )
    for mask in ("head_alive", "channel_alive"):
        assert report_one["scores"][mask].equal(report_acc["scores"][mask]), mask
    assert not report_one["scores"]["head_alive"].all()  # something was pruned
    for score in ("head_score", "channel_score"):
        torch.testing.assert_close(report_acc["scores"][score], report_one["scores"][score], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(report_acc["history"]["loss"], report_one["history"]["loss"], rtol=1e-5, atol=1e-6)
    one_state, acc_state = one.state_dict(), accumulated.state_dict()
    assert one_state.keys() == acc_state.keys()
    for name in one_state:
        torch.testing.assert_close(acc_state[name], one_state[name], rtol=0, atol=1e-5, msg=name)
    # and a different batch really gives other weights: the comparison can fail
    other, _ = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, PruneConfig(**common, batch_size=2), False)
    assert any(
        p.shape != q.shape or not torch.allclose(p, q, atol=1e-5)
        for p, q in zip(other.parameters(), one.parameters(), strict=True)
    )


def test_activation_checkpointing_on_and_off_without_deprecation_warnings():
    model = tiny_model("llama-gqa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_activation_checkpointing(model, True)
        assert is_activation_checkpointing(model)
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        set_activation_checkpointing(model, False)
        assert not is_activation_checkpointing(model)
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]


class OldModel:
    """A transformers 5.0-style model: only gradient_checkpointing_enable/_disable exist."""

    def __init__(self):
        self.calls = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("enable", gradient_checkpointing_kwargs))

    def gradient_checkpointing_disable(self):
        self.calls.append(("disable", None))

    @property
    def is_gradient_checkpointing(self):
        return bool(self.calls) and self.calls[-1][0] == "enable"


def test_activation_checkpointing_falls_back_to_the_old_names():
    model = OldModel()
    set_activation_checkpointing(model, True)
    assert is_activation_checkpointing(model)
    set_activation_checkpointing(model, False)
    assert not is_activation_checkpointing(model)
    assert model.calls == [("enable", {"use_reentrant": False}), ("disable", None)]
