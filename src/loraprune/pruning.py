"""`prune()`: the whole method on an in-memory model, for notebooks; the CLI is a layer over it.

plan → attach LoRA → train (score, schedule, mask) → shrink → merge. Saving and evaluating
are separate steps (export.py, evaluate.py).
"""

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .pipeline.counts import count_parameters, count_prunable
from .pipeline.data import BatchSampler, num_examples
from .pipeline.depth import drop_layers
from .pipeline.hidden import shrink_hidden
from .pipeline.lora import attach_lora
from .pipeline.pruner import Pruner
from .pipeline.shrink import shrink
from .pipeline.train import DenseTeacher, base_parameters, set_activation_checkpointing, teacher_autocast, train
from .plan import Plan, check_compatible
from .prune_config import PruneConfig
from .runtime import distributed, fsdp
from .runtime.checkpoint import Checkpoint, Checkpointer
from .runtime.quant import dequantize_base_layers
from .tasks import Task, objective


def training_loss(task: Task, peft_model: nn.Module, pruner: Pruner, config: PruneConfig):
    """The loss `prune` trains with, on (model, batch): the task's, distilled under --distill from the
    dense model inside `peft_model` (train.DenseTeacher, in the precision --distill-teacher picks), or
    from its top-k stored with the examples under --distill-top-k."""
    if not config.distill:
        return objective(task)
    if config.distill_top_k:  # the dense model's top-k came with the examples (causal_lm.examples)
        return objective(task, None, config.distill, config.distill_temperature)
    autocast = teacher_autocast(config.distill_teacher, peft_model)
    teacher = DenseTeacher(peft_model, task.forward, pruner, autocast)
    return objective(task, teacher, config.distill, config.distill_temperature)


def removed_by_kind(total: int, layers: int, layer_size: int, hidden: int) -> dict[str, int]:
    """Where the removed parameters went: whole layers (at their dense size), the hidden channels cut
    from what stayed, and the heads and channels (the rest)."""
    whole = layers * layer_size
    return {"layers": whole, "hidden": hidden, "heads_and_channels": total - whole - hidden}


def prune(
    model: nn.Module,
    tokenizer,
    data,
    config: PruneConfig | Plan,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    resume: Checkpoint | None = None,
    on_pruning_step=None,
    teacher_cache: Path | None = None,
) -> tuple[nn.Module, dict]:
    """Prune `model` (modified in place) by LoRAPrune, fine-tuning on `data`: for a causal LM a text,
    for a BERT embedding model a list of sentences (or a text, one per line), for a ViT classifier
    (pixel_values, labels) -- whatever the task's `load` returns (tasks/; the task is
    `config.task` or the model type's default). Returns the physically smaller model, LoRA merged,
    and a report dict. `config` may be a Plan that check_compatible made for this model.
    `checkpointer` saves checkpoints while training; `resume` continues from one (checkpoint.py).
    `on_pruning_step(step, pruner)` is called after each pruning step (train.train). `teacher_cache`: a
    folder where what is computed once from the dense model (the top-k to distil from) is kept across
    runs; by default it is kept among the checkpoints."""
    started = time.perf_counter()
    plan = config if isinstance(config, Plan) else check_compatible(model.config, config)
    config, arch, task, sharded = plan.config, plan.arch, plan.task, plan.sharded
    # under torchrun / accelerate launch: DDP over the LoRA factors, or FSDP (distributed.py, fsdp.py)
    distributed.init(always=sharded)
    progress = progress and distributed.is_main()
    # from the dense model, before LoRA: the embedding task's teacher targets are computed here, and
    # the causal LM's top-k for distillation, kept for --resume and later runs (one process)
    store = None
    if distributed.world_size() == 1:
        store = teacher_cache or (checkpointer.kept_folder("teacher") if checkpointer else None)
    train_windows = task.examples(model, tokenizer, data, config, store, progress)
    before = {"total": count_parameters(model), "prunable": count_prunable(model, arch)}
    dense_layer = count_parameters(arch.layers_of(model)[0])  # what a layer removed whole takes with it

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
    except BaseException:
        if checkpointer is not None:
            checkpointer.abandon()
        raise
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
    # whole layers removed (--layer-ratio) go first, then what is dead and still held in the others
    # (all of it under --shrink end, nothing under progressive)
    kept, base = pruner.depth.kept(), peft_model.get_base_model()
    drop_layers(base, arch, kept)
    shrink(base, arch, *([masks[i] for i in kept] for masks in pruner.physical_masks()))
    before_hidden = base_parameters(base)
    shrink_hidden(base, arch, pruner.hidden.alive)  # --hidden-ratio
    by_hidden = before_hidden - base_parameters(base)
    model = peft_model.merge_and_unload()
    model.eval()

    after = {"total": count_parameters(model), "prunable": count_prunable(model, arch)}
    heads, channels = pruner.sparsity()
    report = {
        "config": asdict(config),  # its ratio is the one run, also when --target-params chose it
        "target_params": plan.target,
        "parameters": {"before": before, "after": after},
        "removed": {
            "layers": (len(pruner.prunable) - len(pruner.width_layers)) / max(1, len(pruner.prunable)),
            "hidden": 1 - pruner.hidden.alive.float().mean().item(),
            "heads": heads,  # of the layers that stay
            "channels": channels,
            "prunable_parameters": 1 - after["prunable"] / before["prunable"],
            "total_parameters": 1 - after["total"] / before["total"],
        },
        "removed_parameters": removed_by_kind(
            before["total"] - after["total"], len(pruner.layers) - len(kept), dense_layer, by_hidden
        ),  # fmt: skip
        "layers": [
            {
                "index": i,
                "pruned": i in pruner.prunable,
                "removed": i not in kept,  # the whole layer (--layer-ratio): its heads and channels went with it
                "heads": int(h.sum()) if i in kept else 0,
                "kv_heads": len(pruner.groups.kv_of_head[h].unique()) if i in kept else 0,
                "channels": int(c.sum()) if i in kept else 0,
            }
            for i, (h, c) in enumerate(zip(pruner.head_alive, pruner.channel_alive, strict=True))
        ],
        "dense_groups": asdict(pruner.groups),
        "scores": {  # final moving averages and masks, saved as safetensors beside the report
            "head_score": pruner.head_score,
            "channel_score": pruner.channel_score,
            "head_alive": pruner.head_alive,
            "channel_alive": pruner.channel_alive,
            "layer_score": pruner.depth.score,
            "layer_alive": pruner.depth.alive,
            "hidden_score": pruner.hidden.score,
            "hidden_alive": pruner.hidden.alive,
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
