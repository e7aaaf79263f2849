"""`prune()`: the whole method on an in-memory model, for notebooks; the CLI is a layer over it.

load → attach LoRA → train (score, schedule, mask) → shrink → merge. Saving and evaluating
are separate steps (export.py, evaluate.py).
"""

import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .archs import Arch, arch_for
from .config import PruneConfig
from .errors import LoraPruneError
from .pipeline.data import BatchSampler, num_examples
from .pipeline.evaluate import count_parameters, count_prunable
from .pipeline.groups import LayerGroups
from .pipeline.load import context_length
from .pipeline.lora import attach_lora
from .pipeline.pruner import Pruner
from .pipeline.schedule import SparsitySchedule
from .pipeline.scoring import check_criterion
from .pipeline.shrink import shrink, stock_config_error
from .pipeline.target import resolve_ratio
from .pipeline.train import DenseTeacher, set_activation_checkpointing, teacher_autocast, train
from .runtime import distributed, fsdp
from .runtime.checkpoint import Checkpoint, Checkpointer
from .runtime.quant import dequantize_base_layers
from .tasks import Task, objective, task_for


@dataclass(frozen=True)
class Plan:
    """A PruneConfig checked against one model's config: what `prune` runs, found once."""

    config: PruneConfig  # every default decided: ratio (from --target-params), criterion, shrink
    arch: Arch
    task: Task
    target: dict | None  # --target-params: {"requested", "predicted"} fractions of all parameters
    sharded: bool  # FSDP shards the model while it trains


def check_compatible(model_config, config: PruneConfig, quantized: bool | None = None) -> Plan:
    """Every check that needs only the model's config, run before any work is done, and every
    default of the run decided, once. `quantized`: the base weights are loaded in 8 or 4 bits
    (default: whether `model_config` says so)."""
    if quantized is None:
        quantized = getattr(model_config, "quantization_config", None) is not None
    arch = arch_for(model_config)
    task = task_for(model_config, config.task)
    config, target = resolve_ratio(model_config, config)
    context = context_length(model_config)
    if config.seq_len > context:
        raise LoraPruneError(f"--seq-len {config.seq_len} exceeds the model's context of {context} tokens")
    SparsitySchedule.of(config)  # fails here if the steps leave no pruning window
    if config.distill and task.logits is None:
        raise LoraPruneError(
            f"--distill applies to tasks with logits; the {task.name} task already trains against the dense model"
        )
    if config.allocation == "global" and config.ratio > 1 - config.min_keep:
        raise LoraPruneError(
            f"--ratio {config.ratio} with --allocation global would take more than 1 - --min-keep "
            f"({1 - config.min_keep:g}) of some layer; lower --min-keep"
        )
    sharded = fsdp.requested(config.fsdp)
    config = resolve_criterion(config, sharded)
    config = resolve_shrink(config, sharded, quantized)  # refuses --shrink progressive where it cannot work
    heads, kv_heads, channels = LayerGroups.from_config(model_config, arch).kept_at(config.ratio, config.uniform)
    if config.uniform:
        kv_heads = kv_heads or heads  # plain multi-head attention: k/v heads follow the heads
        problem = stock_config_error(model_config, arch, heads, kv_heads, channels)
        if problem:
            raise LoraPruneError(
                f"--uniform --ratio {config.ratio} leaves {heads} heads ({kv_heads} k/v) and {channels} channels "
                f"per layer, which {type(model_config).__name__} rejects ({problem}); "
                "choose another ratio or drop --uniform"
            )
    return Plan(config, arch, task, target, sharded)


def resolve_criterion(config: PruneConfig, sharded: bool) -> PruneConfig:
    """`config` with --criterion decided: streamed (the gradient's score inside LoRA's memory, which
    won on three seeds, docs/benchmarks/recipes.md) unless FSDP shards the projections it scores (then lora)."""
    check_criterion(config.criterion)
    if config.criterion is None:
        return replace(config, criterion="lora" if sharded else "streamed")
    if config.criterion == "streamed" and sharded:
        raise LoraPruneError("--criterion streamed cannot be combined with --fsdp: its backward hooks score "
                             "whole projections, and FSDP shards them; use --criterion lora or sketch")  # fmt: skip
    return config


def resolve_shrink(config: PruneConfig, sharded: bool, quantized: bool = False) -> PruneConfig:
    """`config` with --shrink decided: progressive unless something needs the dense layers to the end
    (then end); a progressive shrink asked for where it cannot work is refused."""
    reasons = {
        "--distill": (
            config.distill > 0,
            "the distillation teacher is the dense model inside the one being pruned (adapter off, masks "
            "lifted), and a physical shrink removes the rows it needs",
        ),
        "--fsdp": (sharded, "FSDP shards the layers once, and re-sharding after each shrink is not implemented"),
        "8-/4-bit weights": (quantized, "quantized weights are sliced only after they are dequantized, at the end"),
    }
    found = [(name, why) for name, (applies, why) in reasons.items() if applies]
    if config.shrink is None:
        return replace(config, shrink="end" if found else "progressive")
    if config.shrink == "progressive" and found:
        name, why = found[0]
        raise LoraPruneError(
            f"--shrink progressive cannot be combined with {name}: {why}; use --shrink end (or leave --shrink out)"
        )
    return config


def training_loss(task: Task, peft_model: nn.Module, pruner: Pruner, config: PruneConfig):
    """The loss `prune` trains with, on (model, batch): the task's, distilled under --distill from the
    dense model inside `peft_model` (train.DenseTeacher, in the precision --distill-teacher picks)."""
    if not config.distill:
        return objective(task)
    autocast = teacher_autocast(config.distill_teacher, peft_model)
    teacher = DenseTeacher(peft_model, task.forward, pruner, autocast)
    return objective(task, teacher, config.distill, config.distill_temperature)


def prune(
    model: nn.Module,
    tokenizer,
    data,
    config: PruneConfig | Plan,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    resume: Checkpoint | None = None,
    on_pruning_step=None,
) -> tuple[nn.Module, dict]:
    """Prune `model` (modified in place) by LoRAPrune, fine-tuning on `data`: for a causal LM a text,
    for a BERT embedding model a list of sentences (or a text, one per line), for a ViT classifier
    (pixel_values, labels) -- whatever the task's `load` returns (tasks.py; the task is
    `config.task` or the model type's default). Returns the physically smaller model, LoRA merged,
    and a report dict. `config` may be a Plan that check_compatible made for this model.
    `checkpointer` saves checkpoints while training; `resume` continues from one (checkpoint.py).
    `on_pruning_step(step, pruner)` is called after each pruning step (train.train)."""
    started = time.perf_counter()
    plan = config if isinstance(config, Plan) else check_compatible(model.config, config)
    config, arch, task, sharded = plan.config, plan.arch, plan.task, plan.sharded
    # under torchrun / accelerate launch: DDP over the LoRA factors, or FSDP (distributed.py, fsdp.py)
    distributed.init(always=sharded)
    progress = progress and distributed.is_main()
    # from the dense model, before LoRA: the embedding task's teacher targets are computed here
    train_windows = task.examples(model, tokenizer, data, config)
    before = {"total": count_parameters(model), "prunable": count_prunable(model, arch)}

    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    if distributed.device() is not None:  # several processes on GPUs: each rank its own
        model.to(distributed.device())
    peft_model = attach_lora(model, arch, config)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    if sharded:
        fsdp.shard(peft_model, pruner.layers)

    loss_fn = training_loss(task, peft_model, pruner, config)
    torch.manual_seed(config.seed + distributed.rank())  # LoRA dropout: each rank its own stream
    rank, world = distributed.rank(), distributed.world_size()  # --batch-size is per process
    batches = iter(BatchSampler(train_windows, config.batch_size, seed=config.seed, rank=rank, world_size=world))
    try:
        history = train(
            peft_model,
            pruner,
            batches,
            config,
            loss_fn,
            progress=progress,
            checkpointer=checkpointer,
            resume=resume,
            on_pruning_step=on_pruning_step,
        )
    finally:  # also when training stops on an error: the caller's model keeps no hooks of ours
        pruner.close()
        if config.gradient_checkpointing:
            set_activation_checkpointing(model, False)
    if sharded:  # the whole model on rank 0 from here on; the other ranks are done
        peft_model = fsdp.gather(peft_model, lambda: attach_lora(type(model)(model.config), arch, config))
        if peft_model is None:
            return None, {}
        peft_model.get_base_model().generation_config = model.generation_config
        peft_model.get_base_model().tie_weights()
    dequantize_base_layers(peft_model)  # 8-/4-bit base weights: shrink and merge need plain ones
    # what is dead and still held (all of it under --shrink end, nothing under progressive) goes now
    shrink(peft_model.get_base_model(), arch, *pruner.physical_masks())
    model = peft_model.merge_and_unload()
    model.eval()

    after = {"total": count_parameters(model), "prunable": count_prunable(model, arch)}
    heads, channels = pruner.sparsity()
    report = {
        "config": asdict(config),  # its ratio is the one run, also when --target-params chose it
        "target_params": plan.target,
        "parameters": {"before": before, "after": after},
        "removed": {
            "heads": heads,
            "channels": channels,
            "prunable_parameters": 1 - after["prunable"] / before["prunable"],
            "total_parameters": 1 - after["total"] / before["total"],
        },
        "layers": [
            {
                "index": i,
                "pruned": i in pruner.prunable,
                "heads": int(h.sum()),
                "kv_heads": len(pruner.groups.kv_of_head[h].unique()),
                "channels": int(c.sum()),
            }
            for i, (h, c) in enumerate(zip(pruner.head_alive, pruner.channel_alive, strict=True))
        ],
        "dense_groups": asdict(pruner.groups),
        "scores": {  # final moving averages and masks, saved as safetensors beside the report
            "head_score": pruner.head_score,
            "channel_score": pruner.channel_score,
            "head_alive": pruner.head_alive,
            "channel_alive": pruner.channel_alive,
        },
        "score_updates": pruner.score_updates,
        "skipped_score_updates": pruner.skipped_updates,
        "task": task.name,
        "train_windows": num_examples(train_windows),  # windows, sentences or images
        "processes": world,  # data-parallel ranks; the global batch is config.batch_size x processes
        "fsdp": sharded,  # base weights and LoRA factors sharded over the processes while training
        "history": asdict(history),
        "seconds": time.perf_counter() - started,
    }
    return model, report
