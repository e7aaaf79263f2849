"""causal-lm: next-token loss on token windows (chunked: lm_loss.py), evaluated by perplexity."""

import torch
from torch import Tensor, nn

from ..pipeline.data import bos_token_id, tokenize, windows
from ..pipeline.evaluate import greedy_generate, perplexity
from ..pipeline.lm_loss import causal_lm_loss as chunked_lm_loss
from ..pipeline.lm_loss import distilled_causal_lm_loss
from .common import device_of

PROMPT = "the company said it expects"  # the greedy sample printed after a run


def forward(model: nn.Module, batch: Tensor):
    batch = batch.to(device_of(model))
    return model(input_ids=batch, labels=batch)  # the model's own next-token loss, as transformers computes it


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The next-token loss, without the whole logits in memory (lm_loss.py)."""
    return chunked_lm_loss(model, batch.to(device_of(model)))


def distilled_loss(model: nn.Module, batch: Tensor, teacher, distill: float, temperature: float) -> Tensor | None:
    """The next-token loss mixed with distillation, without the whole logits of either model (lm_loss.py)."""
    return distilled_causal_lm_loss(model, batch.to(device_of(model)), teacher.run, distill, temperature)


def examples(model, tokenizer, text: str, config) -> Tensor:
    return windows(tokenize(tokenizer, text), config.seq_len, bos_token_id(tokenizer))


def eval_set(model, tokenizer, text: str, seq_len: int, limit: int | None) -> Tensor:
    return windows(tokenize(tokenizer, text), seq_len, bos_token_id(tokenizer))[:limit]


def evaluate(model, eval_set: Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    return perplexity(model, eval_set, batch_size, progress=progress)


def probe(model, eval_set) -> dict:
    """16 seeded random token ids: they check the weights whether or not there was an evaluation."""
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device_of(model))}


def sample(model, tokenizer) -> str:
    return f"greedy sample: {PROMPT!r} -> {greedy_generate(model, tokenizer, PROMPT, max_new_tokens=20)!r}"
