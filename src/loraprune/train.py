"""The LoRAPrune loop: fine-tune LoRA, score from its gradients, prune on the schedule."""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .pruner import Pruner
from .schedule import CubicSchedule


@dataclass
class History:
    """What happened at each optimizer step (for reports and plots)."""

    loss: list[float] = field(default_factory=list)
    head_sparsity: list[float] = field(default_factory=list)
    channel_sparsity: list[float] = field(default_factory=list)
    pruning_steps: list[int] = field(default_factory=list)


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model(input_ids=batch, labels=batch).loss


def train(
    model: nn.Module,
    pruner: Pruner,
    batches: Iterator[Tensor],
    config: PruneConfig,
    progress: bool = True,
) -> History:
    """Run `config.steps` optimizer steps on the LoRA parameters of `model`, pruning as scheduled."""
    schedule = CubicSchedule(config.ratio, config.steps, config.warmup, config.cooldown, config.prune_freq)
    # by name, not requires_grad: the 'gradient' criterion gives base weights a .grad, never an update
    trainable = [p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    history = History()
    model.train()
    bar = tqdm(range(1, config.steps + 1), desc="pruning", disable=not progress, dynamic_ncols=True)
    for step in bar:
        loss = 0.0
        for _ in range(config.grad_accum):
            micro_loss = causal_lm_loss(model, next(batches)) / config.grad_accum
            micro_loss.backward()
            loss += micro_loss.item()
        pruner.update_scores()  # from the accumulated gradients, before they are consumed
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule.is_pruning_step(step):
            pruner.prune_to(schedule.sparsity(step))
            history.pruning_steps.append(step)

        heads, channels = pruner.sparsity()
        history.loss.append(loss)
        history.head_sparsity.append(heads)
        history.channel_sparsity.append(channels)
        bar.set_postfix(
            loss=f"{loss:.3f}" if math.isfinite(loss) else "nan", heads=f"{heads:.0%}", channels=f"{channels:.0%}"
        )
    model.eval()
    return history
