"""The next-token loss of a causal LM without its (tokens x vocabulary) logits in memory.

transformers computes the loss from the whole logits upcast to float32 (with a 128k vocabulary,
0.5 GiB per thousand tokens), and its backward holds two more tensors of that size. Here the loss
and its gradient with respect to the last hidden states are computed together, in the forward,
LOSS_CHUNK_BYTES of float32 logits at a time; backward only scales that gradient. Same flops as
transformers' loss (one head product forward, one backward), no recomputation. The output
embedding is frozen (LoRA trains the projections), so it needs no gradient of its own.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import fsdp

LOSS_CHUNK_BYTES = 32 * 2**20  # float32 logits of one chunk of tokens


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary of `vocab_size`."""
    return max(1, LOSS_CHUNK_BYTES // max(vocab_size * 4, 1))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap(hidden @ weightᵀ + bias) against `targets`, in float32."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None):
        n, chunk = hidden.shape[0], loss_chunk_tokens(weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()  # in the model's dtype, then float32, as transformers does
            if softcap:  # Gemma 2/3: softcap · tanh(logits / softcap)
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is not None:  # d(mean loss)/d(logits) = (softmax - one-hot) / n
                g = logits.sub_(log_norm[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                if softcap:
                    g.mul_(1.0 - capped.square())
                grad[start : start + chunk] = g.div_(n).to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # the model inside DDP


def chunked_head(model: nn.Module) -> nn.Linear | None:
    """The output embedding of `model` (a peft model, possibly in DDP) when the chunked loss can read
    it directly: a plain linear layer, not sharded by FSDP, not quantized; else None."""
    head = _unwrapped(model).get_output_embeddings()
    if type(head) is not nn.Linear or fsdp.is_sharded(head.weight) or not head.weight.is_floating_point():
        return None
    return head


def causal_lm_loss(model: nn.Module, input_ids: Tensor, **forward_options) -> Tensor:
    """The mean next-token cross-entropy of `model` on the windows `input_ids` (batch, tokens): the
    loss transformers computes with `labels=input_ids`, without the whole logits (falls back to it
    where the head cannot be read directly, see `chunked_head`). `forward_options` go to the model."""
    head = chunked_head(model)
    if head is None:
        return model(input_ids=input_ids, labels=input_ids, **forward_options).loss
    hidden = {}

    def keep_hidden(module, args):  # the head computes logits of no token; the hidden states are kept
        hidden["last"] = args[0]
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        model(input_ids=input_ids, **forward_options)
    finally:
        handle.remove()
    last = hidden["last"]
    states = last[:, :-1].reshape(-1, last.shape[-1])  # position i predicts token i + 1
    softcap = getattr(_unwrapped(model).config, "final_logit_softcapping", None)
    return ChunkedCrossEntropy.apply(states, head.weight, head.bias, input_ids[:, 1:].reshape(-1), softcap)
