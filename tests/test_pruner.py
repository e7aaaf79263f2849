"""pruner.py: the moving average of the group scores and which groups a pruning step removes."""

import torch

from loraprune.archs import arch_for
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.prune_config import PruneConfig
from tiny import randomize_lora, tiny_model


def make_pruner(family: str = "llama-gqa", **settings):
    model = tiny_model(family)
    arch = arch_for(model.config)
    config = PruneConfig(**{"criterion": "lora", "lora_dropout": 0.0} | settings)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    return peft_model, Pruner(peft_model.get_base_model(), arch, config)


def test_moving_average_starts_at_zero_and_folds_in_each_step():
    """Ī_t = λ·Ī_{t−1} + (1 − λ)·Î_t from Ī_0 = 0 (no bias correction), per prunable layer; skipped
    layers keep 0. Each step's Î is read from the same gradients just before the update."""
    lam = 0.75
    peft_model, pruner = make_pruner(ema=lam, skip_layers="0")
    assert pruner.prunable == [1, 2]
    g = torch.Generator().manual_seed(7)
    fresh = []  # this step's (heads, channels) per prunable layer
    for step in range(3):
        tokens = torch.randint(0, 64, (2, 12), generator=g)
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        fresh.append([pruner.layer_scores(i) for i in pruner.prunable])
        assert pruner.update_scores()
        peft_model.zero_grad(set_to_none=True)
        if step == 0:  # zero start: the first average is (1 − λ) times the first scores
            for j, i in enumerate(pruner.prunable):
                torch.testing.assert_close(pruner.head_score[i], (1 - lam) * fresh[0][j][0], rtol=1e-6, atol=0)
    for j, i in enumerate(pruner.prunable):
        for kind, average in enumerate((pruner.head_score[i], pruner.channel_score[i])):
            expected = sum((1 - lam) * lam ** (2 - t) * fresh[t][j][kind] for t in range(3))
            torch.testing.assert_close(average, expected, rtol=1e-5, atol=0)
    assert not torch.equal(fresh[0][0][0], fresh[1][0][0])  # the steps' scores differ: the weights matter
    assert (pruner.head_score[0] == 0).all() and (pruner.channel_score[0] == 0).all()
    assert pruner.score_updates == 3


def dead(alive: torch.Tensor) -> set[int]:
    return set((~alive).nonzero().flatten().tolist())


def lowest(scores: torch.Tensor, among, count: int) -> set[int]:
    among = list(among)
    order = sorted(among, key=lambda k: scores[k].item())
    return set(order[:count])


def test_the_lowest_scored_live_groups_are_removed():
    """Per layer: the k lowest heads and channels go; at the next step the lowest *live* ones join them,
    whatever the scores of the groups already removed (they never come back)."""
    _, pruner = make_pruner(skip_layers="none")
    g = torch.Generator().manual_seed(3)
    pruner.head_score.copy_(torch.randn(pruner.head_score.shape, generator=g))
    pruner.channel_score.copy_(torch.randn(pruner.channel_score.shape, generator=g))
    first_heads, first_channels = pruner.head_score.clone(), pruner.channel_score.clone()
    pruner.prune_to(0.3)  # 6 heads: round_half_up(1.8) = 2; 40 channels: 12
    for i in range(3):
        assert dead(pruner.head_alive[i]) == lowest(first_heads[i], range(6), 2)
        assert dead(pruner.channel_alive[i]) == lowest(first_channels[i], range(40), 12)

    # the removed groups now score lowest of all (or highest): either way exactly the next lowest live
    # groups go, never fewer because dead ones are counted again, and the dead stay dead
    before_heads, before_channels = pruner.head_alive.clone(), pruner.channel_alive.clone()
    pruner.head_score.copy_(torch.randn(pruner.head_score.shape, generator=g))
    pruner.channel_score.copy_(torch.randn(pruner.channel_score.shape, generator=g))
    pruner.head_score[0][~before_heads[0]] = -100.0
    pruner.head_score[1][~before_heads[1]] = 100.0
    pruner.channel_score[~before_channels] = -100.0
    pruner.prune_to(0.5)  # 3 heads, 20 channels
    for i in range(3):
        live_heads = before_heads[i].nonzero().flatten().tolist()
        live_channels = before_channels[i].nonzero().flatten().tolist()
        expected_heads = dead(before_heads[i]) | lowest(pruner.head_score[i], live_heads, 1)
        assert dead(pruner.head_alive[i]) == expected_heads
        expected_channels = dead(before_channels[i]) | lowest(pruner.channel_score[i], live_channels, 8)
        assert dead(pruner.channel_alive[i]) == expected_channels
        assert torch.equal(pruner.head_masks[i], pruner.head_alive[i].float().repeat_interleave(8))
        assert torch.equal(pruner.channel_masks[i], pruner.channel_alive[i].float())


def test_uniform_gqa_removes_the_lowest_heads_within_each_kv_group():
    """--uniform: each k/v group of 3 query heads loses its own 2 lowest (round_half_up(1.5)), even when
    every head of one group scores below every head of the other."""
    _, pruner = make_pruner(uniform=True)
    pruner.head_score.copy_(torch.tensor([[0.1, 0.3, 0.2, 5.0, 4.0, 6.0]] * 3))
    pruner.prune_to(0.5)
    assert all(dead(alive) == {0, 2, 3, 4} for alive in pruner.head_alive)


def test_multiple_of_keeps_aligned_widths_nearest_the_ratio_chosen_by_score():
    """40 channels, --ratio 0.3 (12 removed, 28 kept), --multiple-of 8: a layer keeps 32 or 24. Two of the
    three layers keep 32 (36 removed in all is the goal; 40 and 32 are as near, and more is kept), and
    the one that keeps 24 is the layer whose 8 extra groups score lowest. Along the schedule the counts
    grow in proportion and are aligned exactly at the end."""
    _, pruner = make_pruner(ratio=0.3, multiple_of=8, skip_layers="none")
    ranks = torch.arange(40, dtype=torch.float32)
    pruner.channel_score[:] = torch.stack([ranks, ranks * 0.5, ranks * 2.0])  # layer 1's groups score lowest
    lost = []
    for sparsity in (0.1, 0.2, 0.3):
        pruner.prune_to(sparsity)
        lost.append([int((~alive).sum()) for alive in pruner.channel_alive])
    assert lost[-1] == [8, 16, 8] and all((40 - n) % 8 == 0 for n in lost[-1])
    assert lost[0] == [3, 5, 3] and lost[1] == [5, 11, 5]  # 1/3 and 2/3 of the way, rounded half up
    assert not pruner.channel_alive[1, :16].any() and pruner.channel_alive[1, 16:].all()  # its lowest-scored


def test_multiple_of_under_uniform_keeps_one_width_and_a_layer_never_regains_groups():
    _, pruner = make_pruner(ratio=0.3, multiple_of=8, uniform=True, skip_layers="none")
    pruner.channel_score[:] = torch.rand(3, 40, generator=torch.Generator().manual_seed(0))
    pruner.prune_to(0.3)
    assert [int(alive.sum()) for alive in pruner.channel_alive] == [32, 32, 32]  # 28 is nearer 32 than 24 (a tie)
    _, pruner = make_pruner(ratio=0.3, multiple_of=8, skip_layers="none")
    pruner.channel_alive[0, :10] = False  # already lost more than 8: it must end at 16 lost
    pruner.prune_to(0.3)
    assert int((~pruner.channel_alive[0]).sum()) == 16
