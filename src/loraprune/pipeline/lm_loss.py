"""The next-token loss of a causal LM without its (tokens x vocabulary) logits in memory, and the same
loss mixed with self-distillation from the dense model (`--distill`).

transformers computes the loss from the whole logits upcast to float32 (with a 128k vocabulary,
0.5 GiB per thousand tokens), and its backward holds two more tensors of that size; distillation
adds the teacher's logits and both softmaxes. Here the loss and its gradient with respect to the
last hidden states are computed together, in the forward, LOSS_CHUNK_BYTES of float32 logits at a
time; backward only scales that gradient. The teacher contributes its last hidden states, not its
logits: its logits exist one chunk at a time too. Same flops as transformers' loss (one head
product forward, one backward), no recomputation. The output embedding is frozen (LoRA trains the
projections), so it needs no gradient of its own.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import fsdp

LOSS_CHUNK_BYTES = 64 * 2**20  # the float32 (tokens x vocabulary) temporaries of one chunk of tokens
# how many such tensors one chunk keeps alive: its logits and a temporary of logsumexp; distilling,
# also the teacher's logits, log-probabilities and probabilities (so its chunks are shorter)
LOGIT_COPIES = {False: 2, True: 4}  # by distillation
TINY = 1e-30  # the least probability a bucket of the top-k teacher or of its student holds
NO_TARGET = -1  # a position without a next token (the last of a window): distilled, no cross-entropy


def loss_chunk_tokens(vocab_size: int, distill: bool = False) -> int:
    """Tokens per chunk for a vocabulary of `vocab_size`, distilling or not."""
    return max(1, LOSS_CHUNK_BYTES // max(LOGIT_COPIES[distill] * vocab_size * 4, 1))


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None):
    """float32 logits of one chunk (in the model's dtype, then float32, as transformers does), and
    tanh(logits / softcap) for the softcap's derivative (Gemma 2/3: softcap · tanh(logits / softcap))."""
    logits = F.linear(hidden, weight, bias).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def _kl_and_its_gradient(logits: Tensor, log_norm: Tensor, teacher_logits: Tensor, temperature: float):
    """Σ KL(teacher ‖ student) over a chunk's positions at temperature T, and p_student − p_teacher
    at T (the gradient of T²·KL with respect to the logits, over T). In fewer passes over the
    chunk than with two log-softmaxes: KL = Σ p_t·log p_t − Σ p_t·logits/T + Σ logsumexp(logits/T)."""
    log_p_teacher = F.log_softmax(teacher_logits.div_(temperature), dim=-1)
    del teacher_logits
    p_teacher = log_p_teacher.exp()
    scaled = logits if temperature == 1 else logits / temperature
    scaled_norm = log_norm if temperature == 1 else torch.logsumexp(scaled, dim=-1)
    flat = p_teacher.view(-1)
    kl = torch.dot(flat, log_p_teacher.view(-1)) - torch.dot(flat, scaled.reshape(-1)) + scaled_norm.sum()
    p_student = torch.sub(scaled, scaled_norm[:, None], out=log_p_teacher).exp_()  # the teacher's buffer, reused
    return kl, p_student.sub_(p_teacher)


class LogitsKL(torch.autograd.Function):
    """T²·KL(teacher ‖ student) per position, averaged over positions, of whole logits [..., vocab]
    (tasks whose head the chunked loss cannot read: --distill on a ViT): the chunked loss's formula
    (_kl_and_its_gradient), `rows` positions at a time, its gradient formed in the forward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float, rows: int = 1024) -> Tensor:
        flat, n = student.detach().flatten(0, -2).float(), student.shape[:-1].numel()
        teacher = teacher.detach().flatten(0, -2)
        kl, grad = flat.new_zeros(()), torch.empty_like(flat)
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            logits = flat[chunk]
            teacher_logits = teacher[chunk].float().clone()  # divided in place
            kl_sum, grad[chunk] = _kl_and_its_gradient(logits, torch.logsumexp(logits, -1), teacher_logits, temperature)
            kl += kl_sum
        ctx.save_for_backward(grad.mul_(temperature / n))  # d(T²·KL / n)/d(logits) = T·(p_s − p_t) / n
        ctx.shape, ctx.dtype = student.shape, student.dtype
        return kl * temperature**2 / n

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).view(ctx.shape).to(ctx.dtype), None, None, None


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float, rows: int = 1024) -> Tensor:
    """T²·KL(teacher ‖ student) per position, averaged over positions, of logits [..., vocab]: the
    loss the chunked head computes, on whole logits (LogitsKL); no gradient reaches the teacher."""
    return LogitsKL.apply(student, teacher, temperature, rows)


def _sparse_kl_and_its_gradient(logits: Tensor, log_norm: Tensor, teacher_ids: Tensor, teacher_log_p: Tensor,
                                temperature: float):  # fmt: skip
    """_kl_and_its_gradient against a teacher known by its top-k tokens only: their ids [rows, k] and
    log-probabilities at temperature T [rows, k + 1], the last that of all other tokens (teacher_cache).
    The KL is over those k + 1 buckets, for the student too; inside the last bucket the gradient
    follows the student's own shape, as if the teacher's tail had it. With k = the vocabulary it is
    the whole teacher."""
    scaled = logits if temperature == 1 else logits / temperature
    scaled_norm = log_norm if temperature == 1 else torch.logsumexp(scaled, dim=-1)
    log_p_teacher = F.log_softmax(teacher_log_p.float(), dim=-1)  # sums to 1 again after float16 rounding
    p_teacher = log_p_teacher.exp()
    log_q_top = scaled.gather(1, teacher_ids) - scaled_norm[:, None]
    q_top = log_q_top.exp()
    # the student's rest is summed over the other tokens, not taken as 1 - sum(q_top): that difference
    # cancels to 0 where the student is sure, and the rest's gradient below divides by it
    p_student = (scaled - scaled_norm[:, None]).exp_().scatter_(1, teacher_ids, 0.0)
    q_rest = p_student.sum(-1, keepdim=True).clamp_(min=TINY)
    kl = (p_teacher * (log_p_teacher - torch.cat([log_q_top, q_rest.log()], dim=-1))).sum()
    # d KL / d logit_j = q_j - p_j on the top k, q_j · (1 - p_rest / q_rest) on every other token
    grad = p_student.mul_(1.0 - p_teacher[:, -1:] / q_rest)
    return kl, grad.scatter_(1, teacher_ids, q_top - p_teacher[:, :-1])


class ChunkedHeadLoss(torch.autograd.Function):
    """(1 − distill) · mean cross-entropy of the logits softcap(hidden @ weightᵀ + bias) against
    `targets` (over the positions that have one) + distill · T² · mean KL(teacher ‖ student) at
    temperature T (over all positions); in float32. The teacher is either its last hidden states
    `teacher` [n, hidden] (its logits formed here, chunk by chunk) or its top-k (ids, log-probs)
    `teacher` = ([n, k], [n, k]) computed before training (teacher_cache.py)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
                teacher: Tensor | tuple[Tensor, Tensor] | None = None, distill: float = 0.0,
                temperature: float = 1.0):  # fmt: skip
        n, chunk = hidden.shape[0], loss_chunk_tokens(weight.shape[0], teacher is not None)
        has_target = targets != NO_TARGET
        # each position's weight in d(loss)/d(logits): cross-entropy is a mean over the targets
        ce_scale = (1.0 - distill) / has_target.sum().clamp(min=1)  # a tensor: no host sync
        ce_weight = has_target.float() * ce_scale
        cross_entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl = torch.zeros_like(cross_entropy)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits, capped = head_logits(hidden[rows], weight, bias, softcap)
            t = targets[rows].clamp(min=0)
            log_norm = torch.logsumexp(logits, dim=-1)
            cross_entropy += ((log_norm - logits.gather(1, t[:, None]).squeeze(1)) * has_target[rows]).sum()
            if isinstance(teacher, tuple):
                kl_sum, kl_grad = _sparse_kl_and_its_gradient(logits, log_norm, teacher[0][rows], teacher[1][rows],
                                                              temperature)  # fmt: skip
            elif teacher is not None:
                teacher_logits = head_logits(teacher[rows], weight, bias, softcap)[0]
                kl_sum, kl_grad = _kl_and_its_gradient(logits, log_norm, teacher_logits, temperature)
            if teacher is not None:
                kl += kl_sum
            if grad is not None:  # d(cross-entropy)/d(logits) = softmax - one-hot
                g = logits.sub_(log_norm[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                g.mul_(ce_weight[rows, None])
                if teacher is not None:  # d(T²·KL)/d(logits) = T·(p_student - p_teacher)
                    g.add_(kl_grad, alpha=distill * temperature / n)
                if capped is not None:
                    g.mul_(1.0 - capped.square())
                grad[rows] = g.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        loss = cross_entropy * ce_scale
        return loss + kl * (distill * temperature**2 / n) if teacher is not None else loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None, None


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # the model inside DDP


def chunked_head(model: nn.Module) -> nn.Linear | None:
    """The output embedding of `model` (a peft model, possibly in DDP) when the chunked loss can read
    it directly: a plain linear layer, not sharded by FSDP, not quantized; else None."""
    head = _unwrapped(model).get_output_embeddings()
    if type(head) is not nn.Linear or fsdp.is_sharded(head.weight) or not head.weight.is_floating_point():
        return None
    return head


def last_hidden_states(model: nn.Module, head: nn.Linear, input_ids: Tensor, **forward_options) -> Tensor:
    """What `model`'s output embedding `head` (chunked_head) reads on `input_ids`: (batch, tokens,
    hidden). The head itself computes the logits of no token."""
    hidden = {}

    def keep_hidden(module, args):
        hidden["last"] = args[0]
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        model(input_ids=input_ids, **forward_options)
    finally:
        handle.remove()
    return hidden["last"]


def causal_lm_loss(model: nn.Module, input_ids: Tensor, **forward_options) -> Tensor:
    """The mean next-token cross-entropy of `model` on the windows `input_ids` (batch, tokens): the
    loss transformers computes with `labels=input_ids`, without the whole logits (falls back to it
    where the head cannot be read directly, see `chunked_head`). `forward_options` go to the model."""
    head = chunked_head(model)
    if head is None:
        return model(input_ids=input_ids, labels=input_ids, **forward_options).loss
    last = last_hidden_states(model, head, input_ids, **forward_options)
    states = last[:, :-1].reshape(-1, last.shape[-1])  # position i predicts token i + 1
    return ChunkedHeadLoss.apply(states, head.weight, head.bias, input_ids[:, 1:].reshape(-1), logit_softcap(model))


def distilled_causal_lm_loss(model: nn.Module, input_ids: Tensor, dense: Callable[[Callable], Tensor],
                             distill: float, temperature: float) -> Tensor | None:  # fmt: skip
    """(1 − distill) · next-token loss + distill · T² · KL(dense ‖ model) per position, the dense
    model's logits read from its last hidden states chunk by chunk. `dense(fn)` returns fn(model)
    computed as the dense teacher (train.DenseTeacher.run). None where the head cannot be read
    directly (the caller falls back to the whole logits)."""
    head = chunked_head(model)
    if head is None:
        return None
    teacher = dense(lambda m: last_hidden_states(m, head, input_ids))  # first: its activations go before the student's
    last = last_hidden_states(model, head, input_ids)
    teacher = teacher.to(last.dtype)  # a teacher under autocast (train.teacher_autocast)
    teacher_states = teacher.reshape(-1, teacher.shape[-1])
    return _distilled_head_loss(model, head, last, input_ids, teacher_states, distill, temperature)


def top_k_distilled_causal_lm_loss(model: nn.Module, input_ids: Tensor, teacher_ids: Tensor, teacher_log_p: Tensor,
                                   distill: float, temperature: float) -> Tensor | None:  # fmt: skip
    """distilled_causal_lm_loss against the dense model's top-k tokens per position (ids [batch, tokens,
    k] and log-probabilities [batch, tokens, k + 1], teacher_cache.py) instead of its forward. None where
    the head cannot be read directly."""
    head = chunked_head(model)
    if head is None:
        return None
    last = last_hidden_states(model, head, input_ids)
    k = teacher_ids.shape[-1]
    teacher = (teacher_ids.reshape(-1, k).to(last.device, torch.long), teacher_log_p.reshape(-1, k + 1).to(last.device))
    return _distilled_head_loss(model, head, last, input_ids, teacher, distill, temperature)


def _distilled_head_loss(model: nn.Module, head: nn.Linear, last: Tensor, input_ids: Tensor, teacher,
                         distill: float, temperature: float) -> Tensor:  # fmt: skip
    """ChunkedHeadLoss of the student's last hidden states `last` against `teacher` (its hidden states
    or its top-k), every position distilled and each but the last predicting the next token."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=NO_TARGET)  # position i predicts token i + 1
    return ChunkedHeadLoss.apply(last.reshape(-1, last.shape[-1]), head.weight, head.bias, targets.reshape(-1),
                                 logit_softcap(model), teacher, distill, temperature)  # fmt: skip


def logit_softcap(model: nn.Module) -> float | None:
    return getattr(_unwrapped(model).config, "final_logit_softcapping", None)
