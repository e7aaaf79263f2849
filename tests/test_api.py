import math

import torch
from peft import LoraConfig, get_peft_model

from loraprune import PruneConfig, prune
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.schedule import SparsitySchedule
from tiny import tiny_model

CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)


def test_prune_returns_a_smaller_model_and_an_honest_report(tiny_tokenizer):
    model = tiny_model("llama-gqa")
    config = PruneConfig(ratio=0.5, steps=8, prune_freq=2, seq_len=16, batch_size=2, skip_layers="none")
    pruned, report = prune(model, tiny_tokenizer, CORPUS, config, progress=False)
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    assert after["total"] == sum(p.numel() for p in pruned.parameters())
    assert report["removed"]["total_parameters"] == 1 - after["total"] / before["total"]
    # half of the 6 heads and 40 channels of every layer (round half up)
    assert [(layer["heads"], layer["channels"]) for layer in report["layers"]] == [(3, 20)] * 3
    assert report["removed"]["heads"] == 0.5 and report["removed"]["channels"] == 0.5
    assert not any("lora" in name for name, _ in pruned.named_parameters())  # merged
    # a score update every step up to the last pruning step; none in the cooldown
    assert report["score_updates"] == SparsitySchedule.of(config).end == 7 and report["skipped_score_updates"] == 0
    assert len(report["history"]["loss"]) == 8


def test_on_pruning_step_sees_each_pruning_step(tiny_tokenizer):
    seen = []

    def watch(step, pruner):
        seen.append((step, pruner.sparsity(), pruner.head_alive.clone()))

    config = PruneConfig(ratio=0.5, steps=10, prune_freq=2, seq_len=16, batch_size=2, schedule="linear")
    _, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, config, progress=False, on_pruning_step=watch)
    history = report["history"]
    assert [step for step, _, _ in seen] == history["pruning_steps"] == [3, 5, 7, 9]
    assert [sparsity for _, sparsity, _ in seen] == [
        (history["head_sparsity"][step - 1], history["channel_sparsity"][step - 1]) for step in history["pruning_steps"]
    ]
    assert torch.equal(seen[-1][2], report["scores"]["head_alive"])


def test_pruned_model_accepts_a_fresh_lora_and_trains(tiny_tokenizer):
    """The paper's 'LoRA compatibility after pruning': a pruned model is an ordinary model. peft wraps
    every pruned projection at its new shape, every adapter gets a gradient and moves, the loss on
    the batch trained on goes down, and merging gives the model the adapters compute."""
    config = PruneConfig(ratio=0.5, steps=6, prune_freq=2, seq_len=16, batch_size=2)
    pruned, _ = prune(tiny_model("qwen2-gqa"), tiny_tokenizer, CORPUS, config, progress=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(pruned, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    adapted = [m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapted) == len(targets) * pruned.config.num_hidden_layers
    for m in adapted:  # the adapters have the pruned shapes
        base = m.base_layer
        assert m.lora_A["default"].weight.shape == (4, base.in_features) and base.in_features == base.weight.shape[1]
        assert m.lora_B["default"].weight.shape == (base.out_features, 4) and base.out_features == base.weight.shape[0]
    layer0 = peft_model.get_base_model().model.layers[0]
    assert layer0.mlp.up_proj.lora_B["default"].weight.shape[0] == 20  # half of the 40 channels
    assert layer0.self_attn.o_proj.lora_A["default"].weight.shape[1] == 3 * 8  # 3 of 6 heads of 8
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 19, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert all(m.lora_B["default"].weight.grad is not None for m in adapted)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in adapted)  # B starts at 0: every one moved
    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=batch).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=batch).logits, adapted_logits, rtol=1e-4, atol=1e-5)


def test_non_finite_scores_are_skipped_and_counted():
    from loraprune.archs import arch_for
    from loraprune.pipeline.lora import attach_lora

    model = tiny_model("llama-mha")
    config = PruneConfig(criterion="lora", ema=0.5)
    peft_model = attach_lora(model, arch_for(model.config), config)
    pruner = Pruner(peft_model.get_base_model(), arch_for(model.config), config)
    tokens = torch.randint(0, 64, (2, 8))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    assert pruner.update_scores()
    good = pruner.head_score.clone()
    lora_B = peft_model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    lora_B.grad[0, 0] = float("nan")
    assert not pruner.update_scores()
    assert torch.equal(pruner.head_score, good) and pruner.skipped_updates == 1


def test_pruned_groups_never_come_back():
    from loraprune.archs import arch_for
    from loraprune.pipeline.lora import attach_lora

    model = tiny_model("llama-gqa")
    config = PruneConfig(criterion="lora", skip_layers="none")
    peft_model = attach_lora(model, arch_for(model.config), config)
    pruner = Pruner(peft_model.get_base_model(), arch_for(model.config), config)
    g = torch.Generator().manual_seed(0)
    dead_before = None
    for sparsity in (0.2, 0.35, 0.5):
        pruner.head_score.uniform_(generator=g)  # rankings change completely between steps
        pruner.channel_score.uniform_(generator=g)
        pruner.prune_to(sparsity)
        dead = ~pruner.head_alive
        if dead_before is not None:
            assert (dead | dead_before).equal(dead)  # everything dead before is still dead
        dead_before = dead.clone()
    assert (pruner.head_alive.sum(1) == 3).all() and (pruner.channel_alive.sum(1) == 20).all()
