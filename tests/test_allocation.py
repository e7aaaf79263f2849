"""Where the groups go (--allocation layer|global, --min-keep), how element scores add up
(--aggregation), and no scoring in the cooldown."""

import torch

from loraprune import PruneConfig, prune, save_pruned
from loraprune.archs import arch_for
from loraprune.pipeline.groups import LayerGroups
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner, group_scores
from loraprune.pipeline.schedule import SparsitySchedule
from loraprune.pipeline.scoring import make_criterion
from tiny import randomize_lora, tiny_model

CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)


def pruner_with_scores(allocation: str, min_keep: float = 0.1, layers: int = 4) -> Pruner:
    model = tiny_model("llama-gqa", layers=layers)  # 6 heads, 40 channels a layer
    config = PruneConfig(criterion="lora", skip_layers="none", allocation=allocation, min_keep=min_keep)
    pruner = Pruner(attach_lora(model, arch_for(model.config), config).get_base_model(), arch_for(model.config), config)
    g = torch.Generator().manual_seed(0)
    pruner.head_score.uniform_(generator=g)
    pruner.channel_score.uniform_(generator=g)
    pruner.head_score[0] *= 0.01  # layer 0 is the least important by far
    pruner.channel_score[0] *= 0.01
    return pruner


def test_global_removes_as_many_as_per_layer_but_the_lowest_anywhere():
    layer, anywhere = pruner_with_scores("layer"), pruner_with_scores("global", min_keep=0.2)
    layer.prune_to(0.5)
    anywhere.prune_to(0.5)
    for name in ("head_alive", "channel_alive"):
        per_layer, global_ = getattr(layer, name), getattr(anywhere, name)
        assert (~per_layer).sum() == (~global_).sum()  # the same size, so rows compare
        score = getattr(anywhere, name.replace("alive", "score"))
        kept = global_.sum(1)
        floor = torch.ceil(torch.tensor(0.2 * global_.shape[1]))
        assert kept[0] == floor and (kept >= floor).all()  # layer 0 emptied down to its floor
        # every removed group scores below every kept one of a layer above its floor
        open_rows = kept > floor
        assert score[~global_].max() <= score[open_rows][global_[open_rows]].min()


def test_global_masks_only_ever_remove():
    pruner = pruner_with_scores("global")
    pruner.prune_to(0.3)
    first = pruner.channel_alive.clone()
    pruner.channel_score = -pruner.channel_score  # the opposite ranking must not bring any back
    pruner.prune_to(0.5)
    assert not (pruner.channel_alive & ~first).any() and (~pruner.channel_alive).sum() == 4 * 20


def test_global_run_saves_uneven_layers_that_reload(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    config = PruneConfig(ratio=0.5, steps=6, prune_freq=2, seq_len=16, batch_size=2, allocation="global",
                         skip_layers="none")  # fmt: skip
    pruned, report = prune(tiny_model("llama-gqa", layers=4), tiny_tokenizer, CORPUS, config, progress=False)
    channels = [layer["channels"] for layer in report["layers"]]
    assert sum(channels) == 4 * 20 and min(channels) >= 4  # half of 4 x 40, each layer >= 10%
    save_pruned(pruned, tiny_tokenizer, tmp_path / "out", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    ids = torch.randint(0, 19, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits)


def test_square_aggregation_sums_squared_element_scores():
    model = tiny_model("llama-gqa")
    arch = arch_for(model.config)
    peft_model = attach_lora(model, arch, PruneConfig(lora_dropout=0.0))
    randomize_lora(peft_model)
    layer = arch.projections(arch.layers_of(peft_model.get_base_model())[1])
    magnitude = make_criterion("magnitude")
    heads = torch.ones(6, dtype=torch.bool)
    groups = LayerGroups.from_config(model.config, arch)
    _, channels = group_scores(layer, groups, magnitude, heads, normalize=False, square=True)

    def merged(m):
        A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        return (m.base_layer.weight + m.scaling["default"] * B @ A).detach()

    expected = sum(merged(layer[r]).square().sum(1) for r in ("gate", "up")) + merged(layer["down"]).square().sum(0)
    torch.testing.assert_close(channels, expected)


def test_no_score_updates_after_the_last_pruning_step(tiny_tokenizer):
    config = PruneConfig(ratio=0.5, steps=10, prune_freq=2, seq_len=16, batch_size=2, cooldown=0.3)
    _, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, config, progress=False)
    last = SparsitySchedule.of(config).end
    assert last < config.steps and report["history"]["pruning_steps"][-1] == last
    assert report["score_updates"] == last  # steps 1..last, none in the cooldown
