"""The baseline criteria (gradient, magnitude, random) and --target-params, on tiny models."""

import copy

import pytest
import torch

from loraprune import PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.errors import LoraPruneError
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.schedule import SparsitySchedule
from loraprune.pipeline.scoring import make_criterion, projection_scores, read_factors
from loraprune.pipeline.target import resolve_ratio
from loraprune.pipeline.train import train
from loraprune.plan import check_compatible
from loraprune.tasks.causal_lm import causal_lm_loss
from tiny import randomize_lora, tiny_model

CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_model(criterion: str, family: str = "llama-gqa", seed: int = 0, normalize: bool = False):
    model = tiny_model(family)
    arch = arch_for(model.config)
    config = PruneConfig(criterion=criterion, normalize=normalize, lora_dropout=0.0, skip_layers="none", seed=seed)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)
    return peft_model, arch, config


def tokens(seed: int = 3):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def projection(layer, name: str):
    return getattr(layer.self_attn if name in "qkvo" else layer.mlp, f"{name}_proj")


def group_sums_by_loops(element: dict, model_config, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and channel scores summed member by member (all heads alive); with `normalize`, each
    module's vector of group sums is divided by its Euclidean length before the modules are added."""
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    d, per_kv = model_config.hidden_size // heads, heads // kv_heads

    def unit_sums(name: str, units: int, columns: bool = False) -> list[torch.Tensor]:
        matrix = element[name].T if columns else element[name]  # a unit's rows, or its columns
        size = matrix.shape[0] // units
        sums = [matrix[u * size : (u + 1) * size].sum() for u in range(units)]
        length = sum(x * x for x in sums) ** 0.5 if normalize else 1
        return [x / length for x in sums]

    q, o = unit_sums("q", heads), unit_sums("o", heads, columns=True)
    k, v = unit_sums("k", kv_heads), unit_sums("v", kv_heads)
    head_scores = [q[h] + o[h] + (k[h // per_kv] + v[h // per_kv]) / per_kv for h in range(heads)]
    channels = model_config.intermediate_size
    gate, up, down = unit_sums("gate", channels), unit_sums("up", channels), unit_sums("down", channels, columns=True)
    channel_scores = [gate[c] + up[c] + down[c] for c in range(channels)]
    assert d * heads == element["q"].shape[0]
    return torch.stack(head_scores), torch.stack(channel_scores)


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
@pytest.mark.parametrize("normalize", [True, False])
def test_lora_equals_brute_force_group_sums(family, normalize):
    """The method's criterion through the Pruner (normalize=True is the default) against element scores
    written out term by term from peft's LoRA gradients and summed member by member."""
    peft_model, arch, config = lora_model("lora", family, normalize=normalize)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    peft_model(input_ids=tokens(), labels=tokens()).loss.backward()
    heads, channels = pruner.layer_scores(1)

    layer = peft_model.get_base_model().model.layers[1]
    element = {}
    for n in PROJECTIONS:
        m = projection(layer, n)
        A, B, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        G_W = B.grad @ A + B @ A.grad - B.grad @ A.grad
        element[n] = (G_W * (m.base_layer.weight + s * B @ A)).abs().detach()
    expected_heads, expected_channels = group_sums_by_loops(element, peft_model.config, normalize)
    torch.testing.assert_close(heads, expected_heads, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(channels, expected_channels, rtol=1e-4, atol=1e-10)
    if normalize:  # 4 modules of unit length feed a head, 3 a channel: both sums are of order 1
        assert 0.1 < heads.sum() and 0.1 < channels.sum()


def test_gradient_equals_brute_force_true_gradient_group_sums():
    peft_model, arch, config = lora_model("gradient")
    reference = copy.deepcopy(peft_model)  # before the Pruner: no hooks, base weights frozen
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    peft_model(input_ids=tokens(), labels=tokens()).loss.backward()
    heads, channels = pruner.layer_scores(1)

    layer = reference.get_base_model().model.layers[1]
    weights = [projection(layer, n).base_layer.weight.requires_grad_(True) for n in PROJECTIONS]
    loss = reference(input_ids=tokens(), labels=tokens()).loss
    grads = torch.autograd.grad(loss, weights)
    element = {n: (g * w).abs().detach() for n, g, w in zip(PROJECTIONS, grads, weights, strict=True)}
    expected_heads, expected_channels = group_sums_by_loops(element, reference.config)
    torch.testing.assert_close(heads, expected_heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(channels, expected_channels, rtol=1e-4, atol=1e-7)


def test_gradient_frees_base_grads_after_each_update_so_they_never_accumulate():
    peft_model, arch, config = lora_model("gradient")
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    assert len(pruner.scored_weights) == 3 * len(PROJECTIONS)
    scores = []
    for _ in range(2):  # same batch, same weights: same scores only if step 1's dL/dW0 was freed
        peft_model(input_ids=tokens(), labels=tokens()).loss.backward()
        scores.append(pruner.layer_scores(2))
        assert pruner.update_scores()
        assert all(w.grad is None for w in pruner.scored_weights)
        peft_model.zero_grad(set_to_none=True)
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)


def test_training_under_gradient_never_updates_the_base_weights():
    model = tiny_model("llama-gqa")
    originals = [(p, p.detach().clone()) for p in model.parameters()]  # peft keeps these Parameters
    arch = arch_for(model.config)
    config = PruneConfig(criterion="gradient", steps=6, prune_freq=2, lr=1e-2, skip_layers="none")
    peft_model = attach_lora(model, arch, config)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    lora_B = pruner.projections(0)["q"].lora_B["default"].weight
    batches = iter(torch.randint(0, 64, (config.steps, 2, 16), generator=torch.Generator().manual_seed(0)))
    history = train(peft_model, pruner, batches, config, causal_lm_loss, progress=False)

    assert history.pruning_steps and pruner.sparsity()[0] > 0  # it trained and pruned
    assert lora_B.abs().sum() > 0  # B started at zero: the optimizer did step the LoRA factors
    assert all(torch.equal(p, before) for p, before in originals)  # ... and nothing else
    # step 6 is in the cooldown: scoring stopped there, the base weights are frozen again
    assert not pruner.scoring and all(w.grad is None and not w.requires_grad for w in pruner.scored_weights)
    pruner.close()
    assert not any(w.requires_grad for w in pruner.scored_weights)


def test_prune_under_gradient_returns_a_frozen_model_without_grads(tiny_tokenizer):
    config = PruneConfig(criterion="gradient", steps=6, prune_freq=2, seq_len=16, batch_size=2)
    pruned, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, config, progress=False)
    assert report["score_updates"] == SparsitySchedule.of(config).end and report["removed"]["heads"] == 0.5
    assert not any(p.requires_grad or p.grad is not None for p in pruned.parameters())


def test_magnitude_needs_no_backward_and_sums_the_merged_weight():
    peft_model, arch, config = lora_model("magnitude")
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    heads, channels = pruner.layer_scores(1)  # no backward() was ever called

    layer = peft_model.get_base_model().model.layers[1]
    element = {}
    for n in PROJECTIONS:
        m = projection(layer, n)
        A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        element[n] = (m.base_layer.weight + m.scaling["default"] * B @ A).abs().detach()
    expected_heads, expected_channels = group_sums_by_loops(element, peft_model.config)
    torch.testing.assert_close(heads, expected_heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(channels, expected_channels, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="call backward"):  # the LoRA-guided score does need one
        projection_scores(projection(layer, "q"), make_criterion("lora"), dim=1)
    assert read_factors(projection(layer, "q"), slice(None), lora_grads=False).grad_A is None


def random_masks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    peft_model, arch, config = lora_model("random", seed=seed)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    torch.rand(7)  # the global RNG is not what makes it reproducible
    for _ in range(2):
        assert pruner.update_scores()  # no backward needed
    pruner.prune_to(0.5)
    return pruner.head_alive, pruner.channel_alive


def test_random_is_reproducible_by_seed():
    first, again, other = random_masks(0), random_masks(0), random_masks(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_target_params_is_validated_and_out_of_reach_targets_fail():
    with pytest.raises(LoraPruneError, match=r"--target-params must be in \(0, 1\)"):
        PruneConfig(target_params=1.0)
    with pytest.raises(LoraPruneError, match="out of reach.*--hidden-ratio also cuts the embedding"):
        check_compatible(tiny_model("llama-mha").config, PruneConfig(target_params=0.9))


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
def test_target_params_lands_within_one_group(tiny_tokenizer, family):
    model = tiny_model(family)  # 3 layers, the last skipped: 2 pruned layers
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    config = PruneConfig(target_params=0.3, steps=6, prune_freq=2, seq_len=16, batch_size=2)
    ratio = resolve_ratio(c, config)[0].ratio
    pruned, report = prune(model, tiny_tokenizer, CORPUS, config, progress=False)
    total = report["parameters"]["before"]["total"]
    achieved, predicted = report["removed"]["total_parameters"], report["target_params"]["predicted"]
    assert report["config"]["ratio"] == ratio != 0.5 and report["target_params"]["requested"] == 0.3

    # one group of every pruned layer: a head (its q rows and o columns, plus k, v rows when it has
    # its own k/v head) or a channel (gate, up rows and a down column), whichever is larger
    head = d * c.hidden_size * (4 if c.num_key_value_heads == c.num_attention_heads else 2)
    bound = 2 * max(head, 3 * c.hidden_size) / total
    assert abs(predicted - 0.3) <= bound
    if family == "llama-mha":
        assert achieved == pytest.approx(predicted, abs=1e-12)  # k/v heads go with their head
        assert abs(achieved - 0.3) <= bound
    else:  # k/v heads assumed kept: the run removes at least the prediction, plus any emptied k/v head
        kv_heads = 2 * c.num_key_value_heads * 2 * d * c.hidden_size / total
        assert predicted - 1e-12 <= achieved <= predicted + kv_heads
