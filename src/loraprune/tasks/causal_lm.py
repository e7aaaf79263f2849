"""causal-lm: next-token loss on token windows (chunked: lm_loss.py), evaluated by perplexity."""

from pathlib import Path

import torch
from torch import Tensor, nn

from ..pipeline.data import bos_token_id, tokenize, windows
from ..pipeline.evaluate import greedy_generate, perplexity
from ..pipeline.lm_loss import causal_lm_loss as chunked_lm_loss
from ..pipeline.lm_loss import distilled_causal_lm_loss, top_k_distilled_causal_lm_loss
from ..pipeline.teacher_cache import top_k_targets
from ..runtime import distributed
from .common import device_of

PROMPT = "the company said it expects"  # the greedy sample printed after a run


def forward(model: nn.Module, batch: Tensor | dict):
    batch = input_ids(batch).to(device_of(model))
    return model(input_ids=batch, labels=batch)  # the model's own next-token loss, as transformers computes it


def input_ids(batch: Tensor | dict) -> Tensor:
    """A batch's token windows: the batch itself, or its "input_ids" under --distill-top-k."""
    return batch["input_ids"] if isinstance(batch, dict) else batch


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The next-token loss, without the whole logits in memory (lm_loss.py)."""
    return chunked_lm_loss(model, batch.to(device_of(model)))


def distilled_loss(model: nn.Module, batch: Tensor | dict, teacher, distill: float,
                   temperature: float) -> Tensor | None:  # fmt: skip
    """The next-token loss mixed with distillation, without the whole logits of either model
    (lm_loss.py): from the dense model's top-k stored with the batch (examples), or from `teacher`."""
    if isinstance(batch, dict):
        ids = batch["input_ids"].to(device_of(model))
        return top_k_distilled_causal_lm_loss(model, ids, batch["teacher_ids"], batch["teacher_log_p"], distill,
                                              temperature)  # fmt: skip
    return distilled_causal_lm_loss(model, batch.to(device_of(model)), teacher.run, distill, temperature)


def examples(model, tokenizer, text: str, config, store: Path | None = None, progress: bool = False) -> Tensor | dict:
    """The text's windows; under --distill-top-k K only those training will draw (steps × global batch
    × grad accum, a sample seeded by --seed when the text has more: the same on every rank), each with
    the dense `model`'s top-K next tokens at every position (teacher_cache.py), kept in or read back
    from the folder `store` when given (`progress`: a progress bar while they are computed)."""
    all_windows = windows(tokenize(tokenizer, text), config.seq_len, bos_token_id(tokenizer))
    if not (config.distill and config.distill_top_k):
        return all_windows
    # --batch-size is per process: the global batch, and so the sample, grows with the processes
    needed = config.steps * config.batch_size * distributed.world_size() * config.grad_accum
    if len(all_windows) > needed:
        picked = torch.randperm(len(all_windows), generator=torch.Generator().manual_seed(config.seed))[:needed]
        all_windows = all_windows[picked.sort().values]
    ids, log_p = top_k_targets(
        model, all_windows, config.distill_top_k, config.distill_temperature, store=store, progress=progress
    )
    return {"input_ids": all_windows, "teacher_ids": ids, "teacher_log_p": log_p}


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
