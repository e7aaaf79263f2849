import pytest
import torch

from loraprune.archs import arch_for
from loraprune.pipeline import lm_loss
from loraprune.pipeline.lm_loss import causal_lm_loss, chunked_head, distillation_loss
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.teacher_cache import top_k_targets
from loraprune.pipeline.train import DenseTeacher
from loraprune.prune_config import PruneConfig
from loraprune.tasks import TASKS, objective
from tiny import FAMILIES, randomize_lora, tiny_model

CAUSAL = [family for family in FAMILIES if FAMILIES[family][0].model_type not in ("bert", "vit")]


def lora_model(family: str, dtype=torch.float32):
    model = tiny_model(family).to(dtype)
    peft_model = attach_lora(model, arch_for(model.config), PruneConfig(lora_dropout=0.0))
    randomize_lora(peft_model)
    return peft_model


def loss_and_lora_grads(peft_model, loss_fn, tokens):
    peft_model.zero_grad(set_to_none=True)
    loss = loss_fn(peft_model, tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}


def transformers_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize("family", CAUSAL)
def test_chunked_loss_and_its_gradients_equal_transformers_own(family, monkeypatch):
    """Several chunks (a 64-entry vocabulary at 4 tokens a chunk), every causal family (Gemma 2's
    final softcap included): the same loss and LoRA gradients as `labels=` in transformers."""
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_BYTES", 2 * 4 * 64 * 4)
    peft_model = lora_model(family)
    assert chunked_head(peft_model) is not None and lm_loss.loss_chunk_tokens(64) == 4
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    expected, expected_grads = loss_and_lora_grads(peft_model, transformers_loss, tokens)
    loss, grads = loss_and_lora_grads(peft_model, causal_lm_loss, tokens)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-7)


def test_chunked_loss_in_bfloat16_matches_transformers_to_bfloat16_precision():
    peft_model = lora_model("llama-gqa", torch.bfloat16)
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    expected, expected_grads = loss_and_lora_grads(peft_model, transformers_loss, tokens)
    loss, grads = loss_and_lora_grads(peft_model, causal_lm_loss, tokens)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.float(), rtol=1e-3, atol=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), expected_grads[name].float(), rtol=0.05, atol=1e-3)


def test_a_head_that_is_not_a_plain_linear_layer_falls_back_to_transformers_loss():
    peft_model = lora_model("llama-gqa")
    torch.nn.utils.parametrize.register_parametrization(
        peft_model.get_base_model().lm_head, "weight", torch.nn.Identity()
    )
    assert chunked_head(peft_model) is None
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(causal_lm_loss(peft_model, tokens), transformers_loss(peft_model, tokens))


def test_the_causal_lm_objective_is_the_chunked_loss_unless_distilling():
    task = TASKS["causal-lm"]
    assert objective(task) is task.direct_loss
    assert objective(task, teacher=lambda batch: None, distill=0.5) is not task.direct_loss


def whole_logits_distillation(teacher, alpha, temperature):
    """The distilled loss from the whole logits of student and teacher (the generic path of objective)."""

    def loss(model, tokens):
        output = model(input_ids=tokens, labels=tokens)
        kl = distillation_loss(output.logits, teacher(tokens).logits, temperature)
        return (1 - alpha) * output.loss + alpha * kl

    return loss


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("alpha, temperature", [(0.5, 2.0), (1.0, 1.0)])
def test_chunked_distillation_and_its_gradients_equal_the_whole_logits(family, alpha, temperature, monkeypatch):
    """Several chunks, every causal family (a softcapped teacher too): --distill without the whole
    logits computes the same loss and LoRA gradients as from them."""
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_BYTES", 4 * 3 * 64 * 4)
    assert lm_loss.loss_chunk_tokens(64, distill=True) == 3
    peft_model = lora_model(family)
    task, tokens = TASKS["causal-lm"], torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(4))
    teacher = DenseTeacher(peft_model, task.forward)
    whole = whole_logits_distillation(teacher, alpha, temperature)
    expected, expected_grads = loss_and_lora_grads(peft_model, whole, tokens)
    loss, grads = loss_and_lora_grads(peft_model, objective(task, teacher, alpha, temperature), tokens)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-7)


def test_distillation_with_a_head_that_is_not_a_plain_linear_layer_uses_the_whole_logits():
    peft_model = lora_model("llama-gqa")
    torch.nn.utils.parametrize.register_parametrization(
        peft_model.get_base_model().lm_head, "weight", torch.nn.Identity()
    )
    task, tokens = TASKS["causal-lm"], torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    teacher = DenseTeacher(peft_model, task.forward)
    assert task.distilled_loss(peft_model, tokens, teacher, 0.5, 2.0) is None
    torch.testing.assert_close(
        objective(task, teacher, 0.5, 2.0)(peft_model, tokens),
        whole_logits_distillation(teacher, 0.5, 2.0)(peft_model, tokens),
    )


@pytest.mark.parametrize("family", ["llama-gqa", "gemma2-gqa"])
@pytest.mark.parametrize("alpha, temperature", [(0.5, 2.0), (1.0, 1.0)])
def test_top_k_distillation_with_every_token_is_the_whole_logits_distillation(family, alpha, temperature, monkeypatch):
    """k = the vocabulary: the cached teacher (float16 log-probabilities) gives the loss and LoRA gradients
    of the live dense teacher, over several chunks (a softcapped head too)."""
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_BYTES", 4 * 3 * 64 * 4)
    peft_model = lora_model(family)
    task, tokens = TASKS["causal-lm"], torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(4))
    teacher = DenseTeacher(peft_model, task.forward)
    expected, expected_grads = loss_and_lora_grads(peft_model, objective(task, teacher, alpha, temperature), tokens)
    with peft_model.disable_adapter():
        ids, log_p = top_k_targets(peft_model, tokens, k=64, temperature=temperature)
    batch = {"input_ids": tokens, "teacher_ids": ids, "teacher_log_p": log_p}
    loss, grads = loss_and_lora_grads(peft_model, objective(task, None, alpha, temperature), batch)
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=2e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=2e-2, atol=2e-5)


def top_k_and_rest(log_probs: torch.Tensor, k: int):
    """The teacher as the cache keeps it: its top-k ids, and the log-probabilities of those k and of all
    other tokens together."""
    top = torch.topk(log_probs, k)
    rest = log_probs.scatter(1, top.indices, float("-inf")).logsumexp(-1, keepdim=True)
    return top.indices, torch.cat([top.values, rest], -1)


def kl_over_top_k_and_rest(logits: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor, T: float):
    """autograd's KL(p ‖ q) per position over the k + 1 buckets (the k tokens, every other token)."""
    scaled = (logits / T).log_softmax(-1)
    others = scaled.scatter(1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    q = torch.cat([scaled.gather(1, ids), others], -1)
    return (log_p.exp() * (log_p - q)).sum(-1)


def test_top_k_distillation_is_the_kl_over_the_top_k_and_the_rest():
    """Small k: the loss and its gradient are autograd's of (1 - α)·CE + α·T²·KL(p ‖ q) per position, p and
    q the teacher's and the student's probabilities of the teacher's top k and of every other token as one
    bucket, at temperature T."""
    g = torch.Generator().manual_seed(0)
    n, vocab, hidden, k, alpha, T = 7, 13, 5, 4, 0.7, 2.0
    states, weight = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    ids, log_p = top_k_and_rest((torch.randn(n, vocab, generator=g) / T).log_softmax(-1), k)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[-1] = lm_loss.NO_TARGET
    mine, theirs = states.clone().requires_grad_(), states.clone().requires_grad_()
    loss = lm_loss.ChunkedHeadLoss.apply(mine, weight, None, targets, None, (ids, log_p), alpha, T)
    loss.backward()
    logits = theirs @ weight.T
    ce = torch.nn.functional.cross_entropy(logits[:-1], targets[:-1])
    expected = (1 - alpha) * ce + alpha * T**2 * kl_over_top_k_and_rest(logits, ids, log_p, 1.0 * T).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_top_k_distillation_of_a_student_sure_of_the_top_k_has_a_bounded_gradient():
    """A student that leaves 1e-12 to the tokens outside the teacher's top k, the teacher 1e-3: the
    student's rest is summed, not 1 − Σ q_top (0 in float32), so the gradient is autograd's in float64
    (its entries on a position sum in absolute value to at most 2, the bound of q − p)."""
    vocab, k = 50, 3
    logits = torch.full((2, vocab), -30.0, dtype=torch.float64)
    logits[:, :k] = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    teacher = logits.clone()
    teacher[:, k:] = -8.0  # its rest: about 47 · e^-8 / e^2.4 ≈ 1.4e-3
    ids, log_p = top_k_and_rest(teacher.log_softmax(-1), k)
    student = logits.float().requires_grad_()
    kl, grad = lm_loss._sparse_kl_and_its_gradient(
        student.detach(), student.detach().logsumexp(-1), ids, log_p.float(), 1.0
    )
    reference = logits.clone().requires_grad_()
    expected = kl_over_top_k_and_rest(reference, ids, log_p, 1.0).sum()
    expected.backward()
    assert grad.abs().sum(-1).max() <= 2
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), reference.grad, rtol=1e-4, atol=1e-7)
