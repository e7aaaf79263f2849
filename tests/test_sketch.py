"""sketch.py: hooks collect exactly dL/dW0·Rᵀ, fresh R every step, and the criterion prunes."""

import pytest
import torch

from loraprune import PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.schedule import SparsitySchedule
from loraprune.pipeline.scoring import projection_scores, read_factors
from loraprune.pipeline.train import set_activation_checkpointing
from loraprune.tasks.causal_lm import causal_lm_loss
from tiny import tiny_model


def _setup(checkpointing: bool = False, seed: int = 0):
    model = tiny_model("llama-gqa", seed=3)
    if checkpointing:
        set_activation_checkpointing(model, True)
    arch = arch_for(model.config)
    config = PruneConfig(criterion="sketch", lora_r=4, lora_dropout=0.1, skip_layers="none", seed=seed)
    peft_model = attach_lora(model, arch, config)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    modules = [m for i in pruner.prunable for m in pruner.projections(i).values()]
    peft_model.train()
    return peft_model, pruner, modules


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_hooks_collect_the_true_gradient_times_R(checkpointing):
    """Two micro-batches (accumulated), LoRA dropout on, a head masked: the collected product is
    dL/dW0·Rᵀ of every scored projection, with dL/dW0 from autograd for comparison."""
    peft_model, pruner, modules = _setup(checkpointing)
    pruner.head_alive[1, 2] = False
    pruner.head_masks[1].copy_(pruner.head_alive[1].repeat_interleave(pruner.groups.head_dim))
    for m in modules:
        m.base_layer.weight.requires_grad_(True)
    torch.manual_seed(0)
    for batch in _batches():
        causal_lm_loss(peft_model, batch).backward()
    for m in modules:
        sketch = m.loraprune_gradient_sketch
        expected = m.base_layer.weight.grad @ sketch.basis.T
        torch.testing.assert_close(sketch.product, expected, rtol=1e-4, atol=1e-6)
    o = pruner.projections(1)["o"]  # the masked head's input columns got no gradient
    assert o.base_layer.weight.grad[:, 2 * 8 : 3 * 8].abs().max() == 0


def test_scores_fresh_directions_each_step_reproducibly():
    def run():
        peft_model, pruner, modules = _setup()
        bases, scores = [], []
        torch.manual_seed(0)
        for batch in _batches(3):
            causal_lm_loss(peft_model, batch).backward()
            bases.append(modules[0].loraprune_gradient_sketch.basis.clone())
            f = read_factors(modules[0], slice(None), lora_grads=False)
            merged = f.weight + f.scaling * f.B @ f.A
            element = (f.sketch_product @ f.sketch_basis * merged).abs()
            torch.testing.assert_close(projection_scores(modules[0], pruner.criterion, dim=1), element.sum(1))
            assert pruner.update_scores()
            assert modules[0].loraprune_gradient_sketch.product is None  # reset for the next step
            scores.append(pruner.channel_score.clone())
            peft_model.zero_grad(set_to_none=True)
        with torch.no_grad():  # evaluation collects nothing
            peft_model(input_ids=_batches(1)[0])
        assert modules[0].loraprune_gradient_sketch.product is None
        pruner.close()
        assert not any(hasattr(m, "loraprune_gradient_sketch") for m in modules)
        return bases, scores

    bases, scores = run()
    assert not torch.equal(bases[0], bases[1])  # a new R every step
    again_bases, again_scores = run()  # the same seed draws the same directions
    assert all(torch.equal(a, b) for a, b in zip(bases, again_bases, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(scores, again_scores, strict=True))


def test_prune_with_the_sketch_criterion(tiny_tokenizer):
    corpus = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)
    config = PruneConfig(ratio=0.5, steps=8, prune_freq=2, seq_len=16, batch_size=2, criterion="sketch")
    pruned, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, corpus, config, progress=False)
    assert report["score_updates"] == SparsitySchedule.of(config).end and report["removed"]["heads"] == 0.5
    assert not any(hasattr(m, "loraprune_gradient_sketch") for m in pruned.modules())
