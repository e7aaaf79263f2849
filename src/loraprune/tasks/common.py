"""What the tasks share: moving a batch to the model, the model's own loss and logits, the
inputs used to probe a reloaded model, and timing (examples per second, models alternated)."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..pipeline.data import num_examples

SPEED_REPEATS = 3  # throughput is the median of this many timings
MIN_TIMING_SECONDS = 0.5  # each timing repeats whole passes over the eval set for at least this long


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def own_loss(output, batch, dense) -> Tensor:
    return output.loss


def logits(output) -> Tensor:
    return output.logits


def token_inputs(model_config, batch_size: int, seq_len: int) -> dict:
    # no attention mask: a full one is what training batches hold, and masks cannot be built on meta
    return {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")}


def input_probe(model, eval_set: dict | None) -> dict | None:
    """The first few examples' model inputs (no targets, no labels), or None without an eval set."""
    if eval_set is None:
        return None
    names = ("input_ids", "attention_mask", "pixel_values")
    return {k: v[:4].to(device_of(model)) for k, v in eval_set.items() if k in names}


def throughput(run: Callable[[], Any], items: int) -> float:
    """Items per second: median over SPEED_REPEATS timed runs."""
    return statistics.median(_rate(run, items) for _ in range(SPEED_REPEATS))


def _rate(run: Callable[[], Any], items: int) -> float:
    """Items per second of whole passes repeated for at least MIN_TIMING_SECONDS (tiny models
    take milliseconds a pass: one pass alone would time mostly noise)."""
    passes, started = 0, time.perf_counter()
    while True:
        run()
        passes += 1
        elapsed = time.perf_counter() - started
        if elapsed >= MIN_TIMING_SECONDS:
            return passes * items / elapsed


def paired_speeds(task, models: list[nn.Module], eval_set, batch_size: int = 64) -> list[float]:
    """Examples per second of each model, timed in alternation (A, B, A, B, ...) and each the median
    of SPEED_REPEATS passes, so that load from other processes on a shared machine hits all alike."""
    items = num_examples(eval_set)
    rates: list[list[float]] = [[] for _ in models]
    for model in models:
        task.timed_pass(model, eval_set, batch_size)  # warm-up
    for _ in range(SPEED_REPEATS):
        for model, model_rates in zip(models, rates, strict=True):
            model_rates.append(_rate(lambda model=model: task.timed_pass(model, eval_set, batch_size), items))
    return [statistics.median(model_rates) for model_rates in rates]
