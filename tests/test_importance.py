import torch

from loraprune.archs import arch_for
from loraprune.config import PruneConfig
from loraprune.pipeline.groups import LayerGroups, head_scores, per_unit
from loraprune.pipeline.importance import lora_guided
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.scoring import projection_scores, read_factors
from tiny import randomize_lora, tiny_model


def lora_model_with_grads(family="llama-gqa"):
    model = tiny_model(family)
    arch = arch_for(model.config)
    peft_model = attach_lora(model, arch, PruneConfig(lora_dropout=0.0))
    randomize_lora(peft_model)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    return peft_model.get_base_model(), arch


def test_gradient_estimate_is_one_sgd_step_on_the_factors():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 7, generator=g), torch.randn(5, 4, generator=g)
    gA, gB = torch.randn(4, 7, generator=g), torch.randn(5, 4, generator=g)
    estimate = gB @ A + B @ gA - gB @ gA
    torch.testing.assert_close(estimate, B @ A - (B - gB) @ (A - gA), atol=1e-5, rtol=1e-5)


def test_lora_guided_matches_the_formula_elementwise():
    model, _ = lora_model_with_grads()
    q = model.model.layers[1].self_attn.q_proj
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    s = q.scaling["default"]
    expected = ((B.grad @ A + B @ A.grad - B.grad @ A.grad) * (q.base_layer.weight + s * B @ A)).abs()
    torch.testing.assert_close(lora_guided(read_factors(q, slice(None))), expected.detach())


def test_lora_gradients_are_projections_of_the_true_gradient():
    """G_B = s·dL/dW0·Aᵀ: the factors' gradients carry the information the score uses."""
    model = tiny_model()
    arch = arch_for(model.config)
    peft_model = attach_lora(model, arch, PruneConfig(lora_dropout=0.0))
    randomize_lora(peft_model)
    q = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    q.base_layer.weight.requires_grad_(True)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    A, B, s = q.lora_A["default"].weight, q.lora_B["default"].weight, q.scaling["default"]
    torch.testing.assert_close(B.grad, s * q.base_layer.weight.grad @ A.detach().T, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(A.grad, s * B.detach().T @ q.base_layer.weight.grad, atol=1e-6, rtol=1e-4)


def test_blocked_row_and_column_sums_equal_the_full_matrix():
    model, _ = lora_model_with_grads()
    o = model.model.layers[2].self_attn.o_proj
    full = lora_guided(read_factors(o, slice(None)))
    torch.testing.assert_close(projection_scores(o, lora_guided, dim=1, block_rows=5), full.sum(1))
    torch.testing.assert_close(projection_scores(o, lora_guided, dim=0, block_rows=5), full.sum(0))


def test_group_sums_equal_an_explicit_loop_over_members():
    model, arch = lora_model_with_grads()
    g = LayerGroups.from_config(model.config, arch)
    attention = model.model.layers[1].self_attn
    element = {n: lora_guided(read_factors(getattr(attention, f"{n}_proj"), slice(None))) for n in "qkvo"}
    alive = torch.tensor([True, False, True, True, True, True])
    d = g.head_dim
    expected = []
    for h in range(g.heads):
        kv = h // g.heads_per_kv
        readers = sum(alive[j] and j // g.heads_per_kv == kv for j in range(g.heads))
        total = element["q"][h * d : (h + 1) * d].sum() + element["o"][:, h * d : (h + 1) * d].sum()
        total += (element["k"][kv * d : (kv + 1) * d].sum() + element["v"][kv * d : (kv + 1) * d].sum()) / readers
        expected.append(total if alive[h] else torch.tensor(0.0))  # a dead head scores 0
    q, o = per_unit(element["q"].sum(1), g.heads), per_unit(element["o"].sum(0), g.heads)
    k, v = per_unit(element["k"].sum(1), g.kv_heads), per_unit(element["v"].sum(1), g.kv_heads)
    torch.testing.assert_close(head_scores(q, k, v, o, g, alive), torch.stack(expected))
