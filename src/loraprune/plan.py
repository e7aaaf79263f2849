"""The plan of a run: every check that needs only the model's config, and every default of the
run (the ratio --target-params picks, the criterion, the shrink mode) decided once, before any
weight is read. `prune` (pruning.py) and the job (job.py) run what the plan says.
"""

from dataclasses import dataclass, replace

from .archs import Arch, arch_for
from .errors import LoraPruneError
from .pipeline import hidden
from .pipeline.groups import LayerGroups
from .pipeline.load import context_length
from .pipeline.schedule import SparsitySchedule
from .pipeline.scoring import check_criterion
from .pipeline.shrink import stock_config_error
from .pipeline.target import resolve_ratio
from .prune_config import PruneConfig
from .runtime import fsdp
from .tasks import Task, task_for


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
    sharded = fsdp.requested(config.fsdp)
    arch = arch_for(model_config)
    task = task_for(model_config, config.task)
    config = resolve_criterion(config, sharded)
    config = resolve_distill(config, task, sharded, getattr(model_config, "vocab_size", None))
    config = resolve_shrink(config, sharded, quantized)  # refuses --shrink progressive where it cannot work
    if config.target_shape == "mix":
        check_mix(config, task, sharded)
    config, target = resolve_ratio(model_config, config)
    context = context_length(model_config)
    if config.seq_len > context:
        raise LoraPruneError(f"--seq-len {config.seq_len} exceeds the model's context of {context} tokens")
    SparsitySchedule.of(config)  # fails here if the steps leave no pruning window
    if config.distill and task.logits is None:
        raise LoraPruneError(
            f"--distill applies to tasks with logits; the {task.name} task already trains against the dense model"
        )
    if config.distill_top_k and not (task.top_k_distill and not sharded):
        raise LoraPruneError(
            "--distill-top-k applies to causal LMs in one process or DDP (not FSDP); use --distill alone"
        )
    vocab = getattr(model_config, "vocab_size", None)
    if config.distill_top_k and vocab and config.distill_top_k > vocab:
        raise LoraPruneError(f"--distill-top-k must be in [1, {vocab}] (the vocabulary), got {config.distill_top_k}")
    if config.layer_ratio:
        check_depth(model_config, config, task, sharded)
    if config.hidden_ratio:
        check_hidden(model_config, config, arch, task, sharded)
    if config.allocation == "global" and config.ratio > 1 - config.min_keep:
        raise LoraPruneError(
            f"--ratio {config.ratio} with --allocation global would take more than 1 - --min-keep "
            f"({1 - config.min_keep:g}) of some layer; lower --min-keep"
        )
    heads, kv_heads, channels = LayerGroups.from_config(model_config, arch).kept_at(
        config.ratio, config.uniform, config.multiple_of
    )
    if config.uniform:
        kv_heads = kv_heads or heads  # plain multi-head attention: k/v heads follow the heads
        hidden = model_config.hidden_size - config.removed_hidden(model_config.hidden_size)
        problem = stock_config_error(model_config, arch, heads, kv_heads, channels, hidden)
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


def resolve_distill(config: PruneConfig, task: Task, sharded: bool, vocab: int | None) -> PruneConfig:
    """`config` with --distill and --distill-top-k decided: the task's recipe where they were not
    given (causal LMs: 0.9 from the dense model's top 256), the top-k only where it can be computed up
    front (one process or DDP, not FSDP: there the whole logits, from the dense model inside). A top-k
    without distillation is refused here, where an undecided --distill has become the task's."""
    distill = task.default_distill if config.distill is None else config.distill
    top_k = config.distill_top_k
    if top_k is None:
        top_k = task.default_distill_top_k if distill and not sharded else 0
        top_k = min(top_k, vocab) if vocab else top_k
    if top_k and not distill:
        raise LoraPruneError("--distill-top-k sets how --distill reads the dense model; give --distill too")
    return replace(config, distill=distill, distill_top_k=top_k)


def resolve_shrink(config: PruneConfig, sharded: bool, quantized: bool = False) -> PruneConfig:
    """`config` with --shrink decided: progressive unless something needs the dense layers to the end
    (then end); a progressive shrink asked for where it cannot work is refused."""
    reasons = {
        "--fsdp": (sharded, "FSDP shards the layers once, and re-sharding after each shrink is not implemented"),
        "8-/4-bit weights": (quantized, "quantized weights are sliced only after they are dequantized, at the end"),
        "--distill": (
            bool(config.distill) and not config.distill_top_k,
            "the distillation teacher is the dense model inside the one being pruned (adapter off, masks "
            "lifted), and a physical shrink removes the rows it needs (--distill-top-k K computes it up front)",
        ),
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


def check_mix(config: PruneConfig, task, sharded: bool) -> None:
    """--target-shape mix: it picks --layer-ratio and --hidden-ratio from --target-params (so a given
    ratio is refused, not overridden), where both apply."""
    if config.target_params is None or config.layer_ratio or config.hidden_ratio:
        raise LoraPruneError("--target-shape mix chooses --layer-ratio and --hidden-ratio from --target-params: "
                             "give --target-params and neither ratio")  # fmt: skip
    if task.name != "causal-lm" or sharded:
        raise LoraPruneError("--target-shape mix removes layers and hidden channels of causal LMs, not under --fsdp")


def check_depth(model_config, config: PruneConfig, task, sharded: bool) -> None:
    """--layer-ratio: causal LMs, not under FSDP (whose flat shards a removed layer cannot leave), and
    at least one layer left."""
    if task.name != "causal-lm" or sharded:
        raise LoraPruneError("--layer-ratio removes decoder layers of causal LMs, not under --fsdp")
    layers = model_config.num_hidden_layers
    if config.removed_layers(layers) >= layers:
        raise LoraPruneError(f"--layer-ratio {config.layer_ratio} would remove all {layers} layers; lower it")


def check_hidden(model_config, config: PruneConfig, arch: Arch, task, sharded: bool) -> None:
    """--hidden-ratio: causal LMs, not under FSDP, leaving a hidden size the family's config accepts."""
    if task.name != "causal-lm" or sharded:
        raise LoraPruneError("--hidden-ratio prunes the hidden size of causal LMs, not under --fsdp")
    kept = model_config.hidden_size - config.removed_hidden(model_config.hidden_size)
    problem = hidden.hidden_config_error(model_config, arch, kept)
    if kept < 1 or problem:
        nearest = " or ".join(f"{r:g}" for r in hidden.accepted_ratios(model_config, arch, kept))
        raise LoraPruneError(
            f"--hidden-ratio {config.hidden_ratio} leaves {kept} hidden channels, which "
            f"{type(model_config).__name__} rejects ({problem or 'none left'}); nearest accepted: {nearest}"
        )
