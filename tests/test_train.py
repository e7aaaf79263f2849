"""train.py: the activation-checkpointing helper on either transformers API."""

import warnings

from loraprune.train import is_activation_checkpointing, set_activation_checkpointing
from tiny import tiny_model


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
