import torch

from loraprune.archs import arch_for
from loraprune.pipeline.groups import LayerGroups, head_scores, per_unit
from loraprune.pipeline.importance import Scratch, lora_gradient_estimate, lora_guided
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.scoring import projection_scores, read_factors
from loraprune.prune_config import PruneConfig
from tiny import randomize_lora, tiny_model


def lora_model_with_grads(family="llama-gqa"):
    model = tiny_model(family)
    arch = arch_for(model.config)
    peft_model = attach_lora(model, arch, PruneConfig(lora_dropout=0.0))
    randomize_lora(peft_model)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    return peft_model.get_base_model(), arch


def test_gradient_estimate_is_the_change_of_one_sgd_step_on_the_factors():
    """lora_gradient_estimate on a real peft projection equals B·A before minus B·A after an actual
    torch SGD step (lr 1) on copies of A and B, for the whole module and for a block of its rows."""
    model, _ = lora_model_with_grads()
    v = model.model.layers[1].self_attn.v_proj
    A, B = (p.detach().clone().requires_grad_(True) for p in (v.lora_A["default"].weight, v.lora_B["default"].weight))
    A.grad, B.grad = v.lora_A["default"].weight.grad.clone(), v.lora_B["default"].weight.grad.clone()
    before = (B @ A).detach()
    torch.optim.SGD([A, B], lr=1.0).step()
    change = before - (B @ A).detach()
    assert change.abs().max() > 0
    for rows in (slice(None), slice(3, 9)):
        estimate = lora_gradient_estimate(read_factors(v, rows))
        torch.testing.assert_close(estimate, change[rows], rtol=1e-5, atol=1e-7)


def test_lora_guided_matches_the_formula_elementwise():
    model, _ = lora_model_with_grads()
    q = model.model.layers[1].self_attn.q_proj
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    s = q.scaling["default"]
    expected = ((B.grad @ A + B @ A.grad - B.grad @ A.grad) * (q.base_layer.weight + s * B @ A)).abs()
    assert expected.mean() > 1e-8  # small scores (~5e-7): the default atol of 1e-5 would accept anything
    torch.testing.assert_close(lora_guided(read_factors(q, slice(None))), expected.detach(), rtol=1e-5, atol=1e-10)


def test_lora_guided_equals_the_estimate_built_from_the_true_gradient():
    """With G = dL/dW0 from autograd, G_B = s·G·Aᵀ and G_A = s·Bᵀ·G, so METHOD.md §2's estimate is
    s·G·AᵀA + s·B·Bᵀ·G − s²·G·Aᵀ·Bᵀ·G: the score computed from peft's LoRA gradients must equal
    |that ⊙ (W0 + s·B·A)|, element by element and summed per row and per column."""
    model = tiny_model()
    arch = arch_for(model.config)
    peft_model = attach_lora(model, arch, PruneConfig(lora_dropout=0.0))
    randomize_lora(peft_model)
    gate = peft_model.get_base_model().model.layers[0].mlp.gate_proj
    W0 = gate.base_layer.weight.requires_grad_(True)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    A, B, s = gate.lora_A["default"].weight.detach(), gate.lora_B["default"].weight.detach(), gate.scaling["default"]
    G = W0.grad
    estimate = s * G @ A.T @ A + s * B @ B.T @ G - s * s * G @ A.T @ B.T @ G
    expected = (estimate * (W0.detach() + s * B @ A)).abs()
    assert expected.sum() > 0
    torch.testing.assert_close(lora_guided(read_factors(gate, slice(None))), expected, rtol=1e-4, atol=1e-9)
    for dim in (0, 1):
        summed = projection_scores(gate, lora_guided, dim=dim, block_rows=7)
        torch.testing.assert_close(summed, expected.sum(dim), rtol=1e-4, atol=1e-8)


def test_blocked_row_and_column_sums_equal_the_full_matrix():
    model, _ = lora_model_with_grads()
    o = model.model.layers[2].self_attn.o_proj
    full = lora_guided(read_factors(o, slice(None)))
    for dim in (0, 1):
        blocked = projection_scores(o, lora_guided, dim=dim, block_rows=5)
        torch.testing.assert_close(blocked, full.sum(dim), rtol=1e-5, atol=1e-10)


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
    torch.testing.assert_close(head_scores(q, k, v, o, g, alive), torch.stack(expected), rtol=1e-5, atol=1e-10)


def test_scratch_buffers_are_reused_across_blocks_and_projections():
    """A score update writes every block's transients into the same buffers (a fresh tensor per
    block costs page faults under preflight.return_freed_memory), growing them only for a larger block;
    the sums equal those of fresh tensors, in float32 for a bfloat16 model."""
    model, _ = lora_model_with_grads()
    scratch = Scratch()
    first = scratch.get(0, torch.Size([3, 4]), torch.float32, torch.device("cpu"))
    assert scratch.get(0, torch.Size([2, 5]), torch.float32, first.device).data_ptr() == first.data_ptr()
    assert scratch.get(0, torch.Size([4, 4]), torch.float32, first.device).shape == (4, 4)  # grown
    layer = model.model.layers[1]
    for module in (layer.mlp.up_proj, layer.self_attn.o_proj):
        for dim in (0, 1):
            fresh = projection_scores(module, lora_guided, dim, block_rows=5)
            reused = projection_scores(module, lora_guided, dim, block_rows=5, scratch=scratch)
            torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
    assert {key[0] for key in scratch.buffers} == {0, 1}  # the merged weight and the gradient estimate
    model.to(torch.bfloat16)
    up = layer.mlp.up_proj
    for p in (up.lora_A["default"].weight, up.lora_B["default"].weight):
        p.grad = p.grad.to(torch.bfloat16)
    scores = projection_scores(up, lora_guided, 1, scratch=scratch)
    assert scores.dtype == torch.float32 and ("float32", torch.float32, torch.device("cpu")) in scratch.buffers
