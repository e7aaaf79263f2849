"""The dense model's top-k next-token distribution for every training window, computed once before
LoRA is attached (`--distill-top-k K`): distillation then needs no teacher forward per step and no
dense copy of the weights, so the model may shrink physically while it trains.

Each position keeps the ids (int32) of its K most likely tokens and K + 1 log-probabilities (float16,
at the distillation's temperature): those of the K, and that of every other token together, so the
loss keeps the probability the K leave (lm_loss._sparse_kl_and_its_gradient). 6·K + 2 bytes per
position, in a temporary file memory-mapped and deleted when the run ends (10 MB per thousand
128-token windows at K = 64).
"""

import math
import tempfile

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import LoraPruneError
from .lm_loss import TINY, chunked_head, head_logits, last_hidden_states, logit_softcap, loss_chunk_tokens


def memory_mapped(shape: tuple[int, ...], dtype: np.dtype) -> Tensor:
    """A zeroed tensor backed by an anonymous temporary file (gone once the tensor is freed)."""
    backing = tempfile.TemporaryFile()
    array = np.memmap(backing, dtype=dtype, mode="w+", shape=shape)
    return torch.from_numpy(array)


@torch.no_grad()
def top_k_targets(model: nn.Module, windows: Tensor, k: int, temperature: float = 1.0,
                  batch_size: int = 8) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(ids int32 [windows, tokens, k], log-probabilities float16 [windows, tokens, k + 1]): the dense
    `model`'s top-k next tokens at every position of `windows` [n, tokens] and their log-probabilities
    at `temperature`, then the log-probability of all the other tokens; memory-mapped. A progress
    bar shows on a terminal."""
    head = chunked_head(model)
    if head is None:
        raise LoraPruneError("--distill-top-k reads the output embedding directly; this model's is sharded "
                             "or quantized: use --distill without --distill-top-k")  # fmt: skip
    vocab = head.weight.shape[0]
    n, tokens = windows.shape
    ids, log_p = memory_mapped((n, tokens, k), np.int32), memory_mapped((n, tokens, k + 1), np.float16)
    device, softcap, was_training = head.weight.device, logit_softcap(model), model.training
    rows = loss_chunk_tokens(vocab)
    model.eval()
    try:
        for start in tqdm(range(0, n, batch_size), desc=f"dense model's top-{k}", disable=None):
            batch = windows[start : start + batch_size].to(device)
            hidden = last_hidden_states(model, head, batch, use_cache=False)
            flat = hidden.reshape(-1, hidden.shape[-1])
            batch_ids, batch_log_p = [], []
            for first in range(0, len(flat), rows):
                logits = head_logits(flat[first : first + rows], head.weight, head.bias, softcap)[0]
                log_probs = torch.log_softmax(logits / temperature, dim=-1)
                top = torch.topk(log_probs, k, dim=-1)
                rest = log_probs.scatter_(1, top.indices, float("-inf")).logsumexp(-1, keepdim=True)
                batch_ids.append(top.indices)
                batch_log_p.append(torch.cat([top.values, rest.clamp(min=math.log(TINY))], dim=-1))
            ids[start : start + len(batch)] = torch.cat(batch_ids).view(len(batch), tokens, k).to(torch.int32).cpu()
            log_p[start : start + len(batch)] = torch.cat(batch_log_p).view(len(batch), tokens, k + 1).half().cpu()
    finally:
        model.train(was_training)
    return ids, log_p
