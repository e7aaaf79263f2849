"""The LoRAPrune loop: fine-tune LoRA, score from its gradients, prune on the schedule."""

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import LoraPruneError
from ..prune_config import PruneConfig
from ..runtime import distributed, fsdp
from ..runtime.checkpoint import Checkpoint, Checkpointer
from .pruner import Pruner
from .schedule import SparsitySchedule


@dataclass
class History:
    """What happened at each optimizer step (for reports and plots)."""

    loss: list[float] = field(default_factory=list)
    head_sparsity: list[float] = field(default_factory=list)
    channel_sparsity: list[float] = field(default_factory=list)
    pruning_steps: list[int] = field(default_factory=list)
    # NaN/inf loss or LoRA gradient: no score update, no optimizer step
    skipped_steps: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step (pruning and shrinking included)
    parameters: list[int] = field(default_factory=list)  # base-model parameters the step ran on (LoRA not counted)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each layer's activations in backward (non-reentrant: the embeddings' output needs no
    requires_grad for LoRA's gradients to flow), or stop. transformers 5.24 renamed
    gradient_checkpointing_enable/_disable to activation_checkpointing_* and deprecated the old names;
    earlier 5.x releases have only the old ones."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_disable()


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether `model` recomputes activations in backward (by the name its transformers version has)."""
    current = hasattr(type(model), "is_activation_checkpointing")
    return getattr(model, "is_activation_checkpointing" if current else "is_gradient_checkpointing")


class DenseTeacher:
    """The dense model inside the one being pruned: the same base weights with the LoRA adapter
    disabled and the masks lifted, in eval mode, without gradients. One extra forward per step
    and no second copy of the weights. Called with a batch, it returns `forward(model, batch)`;
    `run(fn)` returns fn(model) computed as the dense model. With `autocast` (a dtype) the forward
    runs under torch.autocast in it (teacher_autocast)."""

    def __init__(self, peft_model: nn.Module, forward: Callable[[nn.Module, Any], Any], pruner: Pruner | None = None,
                 autocast: torch.dtype | None = None):  # fmt: skip
        self.peft_model, self.forward, self.pruner, self.autocast = peft_model, forward, pruner, autocast

    def __call__(self, batch):
        return self.run(lambda model: self.forward(model, batch))

    @torch.no_grad()
    def run(self, fn: Callable[[nn.Module], Any]):
        model, was_training = self.peft_model, self.peft_model.training
        lifted = self.pruner.masks_lifted() if self.pruner is not None else contextlib.nullcontext()
        device_type = next(model.parameters()).device.type
        precision = torch.autocast(device_type, self.autocast, enabled=self.autocast is not None)
        model.eval()  # no dropout: the teacher is the dense model as it is evaluated
        try:
            with model.disable_adapter(), lifted, precision:
                return fn(model)
        finally:
            model.train(was_training)


def teacher_autocast(precision: str, model: nn.Module) -> torch.dtype | None:
    """The dtype DenseTeacher computes in under autocast for --distill-teacher `precision`, or None
    (the model's own). bfloat16 makes the teacher's forward ~1.5x faster on a CPU with AVX512-BF16
    (bench/overhead.py), and moves its distribution by ~5e-4 nats of KL per position."""
    weight = next(model.parameters())
    if precision == "model" or weight.dtype != torch.float32:
        return None
    return torch.bfloat16 if precision == "bfloat16" or native_bfloat16(weight.device) else None


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware (not by converting to float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lora_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the LoRA factors alone. By name, not requires_grad: the 'gradient' criterion
    gives base weights a .grad for scoring, never an update."""
    trainable = [p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)


def train(
    model: nn.Module,
    pruner: Pruner,
    batches: Iterator[Tensor],
    config: PruneConfig,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    resume: Checkpoint | None = None,
    on_pruning_step: Callable[[int, Pruner], None] | None = None,
) -> History:
    """Run `config.steps` optimizer steps on the LoRA parameters of `model`, pruning as scheduled.

    With a `checkpointer`, the state is saved as it says (and Ctrl-C saves, then raises
    `Interrupted`); with `resume`, training continues from that checkpoint's step.
    `loss_fn(model, batch)` is the task's loss (tasks/); it moves the batch to the model's device.
    `on_pruning_step(step, pruner)` is called right after each pruning step (to watch the scores
    and masks, e.g. bench/ema.py); it must not change them."""
    schedule = SparsitySchedule.of(config)
    # whole layers (--layer-ratio) and hidden channels (--hidden-ratio) on the same shape
    schedules = schedule, replace(schedule, target=config.layer_ratio), replace(schedule, target=config.hidden_ratio)
    optimizer = lora_optimizer(model, config.lr)
    history = History()
    first = 1 if resume is None else resume.restore(model, optimizer, pruner, batches, history) + 1
    nan_run = _trailing_run(history.skipped_steps, first - 1)
    model.train()
    ddp = ParallelModel(model)  # several processes: LoRA gradients all-reduced in backward
    size = base_parameters(model)  # changes only when a shrink cuts groups out
    bar = tqdm(range(first, config.steps + 1), desc="pruning", disable=not progress, dynamic_ncols=True)
    with checkpointer.catching_interrupts() if checkpointer is not None else contextlib.nullcontext():
        for step in bar:
            started = time.perf_counter()
            history.parameters.append(size)
            if step > schedule.end and pruner.scoring:  # no pruning step left (also on resume into the cooldown)
                pruner.stop_scoring()
                ddp.rebuild()  # the base weights no longer require grad
            loss, updated = _step(ddp.wrapped, pruner, optimizer, batches, config, loss_fn)
            nan_run = 0 if updated else nan_run + 1
            if nan_run:
                history.skipped_steps.append(step)
            if nan_run >= config.max_nan_steps:
                last = checkpointer.last if checkpointer is not None else None
                kept = f"; the last good checkpoint is {last}" if last else ""
                raise LoraPruneError(
                    f"the loss or a LoRA gradient was NaN or infinite for {nan_run} steps in a row "
                    f"(steps {step - nan_run + 1}-{step}): "
                    f"stopped{kept}; lower --lr or use --dtype float32 and run again"
                )
            _after_step(step, loss, schedules, pruner, history, bar)
            pruned = schedule.is_pruning_step(step)
            shrunk = pruned and pruner.shrink_dead(optimizer)  # --shrink progressive: the dead groups leave
            if shrunk or (pruned and ddp.trains_other_parameters()):  # or a removed layer froze
                ddp.rebuild()  # the old buckets hold the old parameters
            if shrunk:
                size = base_parameters(model)
            history.step_seconds.append(time.perf_counter() - started)
            if pruned and on_pruning_step is not None:
                on_pruning_step(step, pruner)
            if pruned or step == config.steps:
                distributed.check_identical(pruner.state_dict(), step)  # same masks and scores on every rank
            if checkpointer is not None:
                checkpointer.interrupted = distributed.any_rank(checkpointer.interrupted)  # all stop together
            if checkpointer is not None and checkpointer.due(step, config.steps):
                rank_rng = distributed.rng_states()  # the other ranks' dropout RNGs (a collective)
                checkpointer.save(step, model, optimizer, pruner, batches, history, extra=rank_rng)  # rank 0 writes
                if checkpointer.interrupted:
                    raise checkpointer.interrupted_error(step, config.steps)
    model.eval()
    return history


class ParallelModel:
    """The model as a step runs it: wrapped by DDP under several processes (itself in one). DDP
    all-reduces the parameters that required grad when it was built, bucketed as they were then, so
    it is built again whenever those change: a shrink, a layer removed, scoring stopped."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rebuild()

    def rebuild(self) -> None:
        self.wrapped = None  # an old wrapper's hooks and buckets go before the new ones are made
        self.wrapped = distributed.wrap(self.model)
        self.trained = trainable_parameters(self.model)

    def trains_other_parameters(self) -> bool:
        return trainable_parameters(self.model) != self.trained


def base_parameters(model: nn.Module) -> int:
    """Parameters of the model without its LoRA factors: the size of the model a step runs on."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def trainable_parameters(model: nn.Module) -> int:
    """How many parameter tensors train (what DDP all-reduces, see distributed.wrap)."""
    return sum(p.requires_grad for p in model.parameters())


def _trailing_run(steps: list[int], last: int) -> int:
    """How many of the steps up to `last` at the end of `steps` are consecutive."""
    run = 0
    while run < len(steps) and steps[-1 - run] == last - run:
        run += 1
    return run


def _step(model: nn.Module, pruner: Pruner, optimizer, batches, config: PruneConfig, loss_fn) -> tuple[float, bool]:
    """One optimizer step (grad_accum micro-batches); a NaN/inf loss, or a NaN/inf LoRA gradient under a
    finite loss, updates nothing (no score update, no optimizer step). Returns (loss, whether it updated)."""
    loss = 0.0
    for micro in range(config.grad_accum):
        # DDP: gradients are all-reduced once, in the last micro-batch's backward
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            micro_loss = loss_fn(model, next(batches)) / config.grad_accum
            micro_loss.backward()
        loss += micro_loss.item()
    loss = distributed.mean(loss)  # the global batch's loss; NaN on any rank skips the step on all
    bad_gradient = distributed.any_rank(not _gradients_finite(optimizer))  # FSDP: each rank checks its shards
    updated = math.isfinite(loss) and not bad_gradient
    if updated:
        if pruner.scoring:
            pruner.update_scores()  # from the accumulated gradients, before they are consumed
        optimizer.step()
    else:
        pruner.clear_step_gradients()
    optimizer.zero_grad(set_to_none=True)
    return loss, updated


def _gradients_finite(optimizer) -> bool:
    """Whether every gradient of the optimizer's parameters (this rank's rows under FSDP) is finite."""
    grads = [fsdp.local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _after_step(step: int, loss: float, schedules: tuple[SparsitySchedule, ...], pruner: Pruner, history: History,
                bar) -> None:  # fmt: skip
    """Prune on schedule (groups, whole layers, hidden channels; a skipped step too: the scores are
    the earlier averages) and record."""
    schedule = schedules[0]
    if schedule.is_pruning_step(step):
        pruner.prune_to(*(s.sparsity(step) for s in schedules))
        history.pruning_steps.append(step)
    heads, channels = pruner.sparsity()
    history.loss.append(loss)
    history.head_sparsity.append(heads)
    history.channel_sparsity.append(channels)
    bar.set_postfix(
        loss=f"{loss:.3f}" if math.isfinite(loss) else "nan", heads=f"{heads:.0%}", channels=f"{channels:.0%}"
    )
