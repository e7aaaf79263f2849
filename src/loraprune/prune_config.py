"""Settings of a pruning run: one typed dataclass, validated in one place.

The CLI's flags are generated from the fields of this and the other settings dataclasses
(run_settings.py; a field `lora_r` is `--lora-r`), and each field's `help` is the flag's help, so
the two cannot drift apart. This module imports nothing from the pipeline: a name that only a
pipeline table knows (the criteria: scoring.CRITERIA) is checked where the run is planned
(plan.check_compatible).
"""

import math
from dataclasses import dataclass, field

from .archs import TASK_MODELS
from .errors import LoraPruneError

SCHEDULE_NAMES = ("cubic", "linear", "exponential", "oneshot")  # schedule.SHAPES
ALLOCATIONS = ("layer", "global")  # pruner.Pruner.prune_to
AGGREGATIONS = ("sum", "square")
TASK_NAMES = tuple(TASK_MODELS)  # tasks.TASKS holds one entry each
SHRINK_MODES = ("progressive", "end")
TEACHER_PRECISIONS = ("auto", "bfloat16", "model")  # train.teacher_autocast
LAYER_SCORES = ("similarity", "taylor")  # depth.LayerRemoval
TARGET_SHAPES = ("width", "mix")  # target.resolve_ratio


def round_half_up(x: float) -> int:
    """floor(x + 0.5): the one rounding rule of every count (groups, warmup/cooldown steps, skipped
    layers; schedule.py and groups.py use it from here). Python's round() is banker's rounding
    (4.5 -> 4, 5.5 -> 6): counts should not depend on parity. The 1e-9 absorbs float error in
    products such as 0.1 * 45."""
    return math.floor(x + 0.5 + 1e-9)


def setting(default, help: str, **metadata):
    """A settings field: its default and its flag's help; `metadata` may add `flag` (another flag
    name), `choices` and `positional` for the generated command line (cli.py)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class PruneConfig:
    """How much to prune, how to score, and the LoRA fine-tuning budget."""

    ratio: float = setting(0.5, "fraction of heads and of MLP channels removed in each prunable layer")
    target_params: float | None = setting(
        None, "fraction of the model's total parameters to remove; picks the group ratio that reaches it"
    )
    target_shape: str = setting(
        "width",
        "how --target-params splits the cut: width (heads and MLP channels, besides any --layer-ratio and "
        "--hidden-ratio given) or mix (whole layers up to half the target and a third of the layers, then the "
        "hidden size up to nine tenths of it (a multiple of 64 where the model's is one), heads and channels the "
        "rest; causal LMs)",
        choices=TARGET_SHAPES,
    )
    steps: int = setting(500, "optimizer steps of LoRA fine-tuning (pruning happens inside them)")
    seq_len: int = setting(128, "tokens per training window")
    batch_size: int = setting(4, "windows per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(5e-4, "AdamW learning rate of the LoRA factors (the paper's: 1e-4 at batch 128)")
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: float = setting(16.0, "LoRA alpha (scaling s = alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA branch")
    criterion: str | None = setting(
        None,
        "importance criterion: lora (LoRA-guided, the paper's method), gradient (true |dL/dW0 * W0|, stores full "
        "weight gradients), magnitude (|W0 + s*B*A|, no gradient), random (seeded by --seed), sketch (the true "
        "gradient through --lora-r fresh random directions each step, collected by hooks; never stores dL/dW0), "
        "streamed (the true |dL/dW0 * (W0 + s*B*A)| summed per group during backward, a block at a time: the "
        "gradient's score without storing dL/dW0; keeps each projection's input in bfloat16). "
        "None: streamed, or lora under --fsdp (which streamed cannot serve)",
    )
    layer_ratio: float = setting(
        0.0,
        "fraction of the prunable decoder layers removed whole (depth pruning), on the same schedule as the "
        "heads and channels; --ratio then applies to the layers that stay",
    )
    hidden_ratio: float = setting(
        0.0,
        "fraction of the hidden size (the residual stream's channels: embedding columns, every projection's "
        "hidden side, the norms) removed, on the same schedule; causal LMs of every decoder family",
    )
    layer_score: str = setting(
        "similarity",
        "how --layer-ratio ranks layers: similarity (1 - cosine of a layer's input and output hidden states) or "
        "taylor (|gradient . (output - input)|, the first-order loss change of removing the layer)",
        choices=LAYER_SCORES,
    )
    multiple_of: int | None = setting(
        None,
        "keep a multiple of N MLP channels in every pruned layer (a power of two: 32, 64, 256 suit llama.cpp's "
        "kernels and quantized blocks), the layers whose extra groups score highest rounding up so the total "
        "stays nearest --ratio; heads stay whole",
    )
    normalize: bool = setting(True, "L2-normalise each module's group scores before summing a group")
    aggregation: str = setting(
        "sum", "how a group's element scores add up: sum (the paper's) or square (the sum of their squares)"
    )
    allocation: str = setting(
        "layer",
        "where the groups go: layer (the paper's: --ratio of every prunable layer) or global (the same total, "
        "the lowest-scored groups across all prunable layers, heads and channels ranked separately)",
    )
    min_keep: float = setting(
        0.1, "with --allocation global: the fraction of its heads and of its channels every pruned layer keeps"
    )
    distill: float | None = setting(
        None,
        "weight alpha of distillation from the dense model (the same weights, adapter off, masks lifted): "
        "loss = (1 - alpha) task loss + alpha T^2 KL(dense || pruned); 0 turns it off (the paper's recipe: "
        "the task loss alone). None: 0.9 for causal LMs, which keeps their ability on text they were not "
        "tuned on; 0 for the other tasks",
    )
    distill_temperature: float = setting(1.0, "temperature T of the distillation's softmaxes")
    distill_teacher: str = setting(
        "auto",
        "precision of the teacher's forward: bfloat16 (autocast), model (the model's own dtype), or auto "
        "(bfloat16 where the model is float32 and the device computes bfloat16 natively)",
        choices=TEACHER_PRECISIONS,
    )
    distill_top_k: int | None = setting(
        None,
        "with --distill: distil from the dense model's K most likely next tokens per position, computed once "
        "for the training windows before LoRA (memory-mapped): no teacher forward per step, and the model "
        "may shrink while it trains; 0: the whole distribution, from the dense model inside the pruned one. "
        "None: 256 for causal LMs outside FSDP, else 0",
    )
    prune_freq: int = setting(10, "prune every this many optimizer steps inside the pruning window")
    warmup: float = setting(0.1, "fraction of steps fine-tuned before pruning starts")
    cooldown: float = setting(0.1, "fraction of steps fine-tuned after the target is reached")
    ema: float = setting(0.9, "moving-average factor lambda of the group scores")
    schedule: str = setting(
        "cubic",
        "how sparsity rises from warmup to cooldown: cubic (the paper's), linear, exponential (the same "
        "fraction of the remaining groups each time) or oneshot (all at the first pruning step, then recover)",
    )
    skip_layers: str = setting("first10pct,last", "layers never pruned: 'first10pct,last', 'none' or indices '0,1,29'")
    uniform: bool = setting(False, "same shape in every layer (none skipped) so stock transformers loads the result")
    seed: int = setting(0, "seed of LoRA init, data order, dropout and the random criterion")
    task: str | None = setting(
        None,
        "what the model is fine-tuned on while pruning: causal-lm (next-token loss), embedding (1 - cosine to "
        "the dense model's mean-pooled sentence embedding), image-classification (cross-entropy); "
        "default: from the model type (llama/mistral/qwen2: causal-lm, bert: embedding, vit: image-classification)",
    )
    max_nan_steps: int = setting(
        5, "stop after this many optimizer steps in a row whose loss or a LoRA gradient is NaN/inf (one is skipped)"
    )
    gradient_checkpointing: bool = setting(
        False, "recompute each layer's activations in backward: less memory, about a third more time, same result"
    )
    shrink: str | None = setting(
        None,
        "when pruned groups leave the model physically: progressive (at every pruning step: W0, LoRA factors and "
        "their AdamW moments are sliced, so training runs on the smaller model) or end (masked until training "
        "ends, then sliced); the same masks and weights either way. None: progressive, except with a live "
        "--distill teacher (--distill-top-k 0), --fsdp or 8-/4-bit weights, which need the dense layers (end)",
        choices=SHRINK_MODES,
    )
    fsdp: bool = setting(
        False,
        "shard base weights and LoRA factors over the processes with FSDP2 (under torchrun; accelerate launch "
        "with an FSDP config turns it on itself)",
    )

    def __post_init__(self):
        def require(ok: bool, name: str, what: str):
            if not ok:
                raise LoraPruneError(f"--{name.replace('_', '-')} {what} (got {getattr(self, name)!r})")

        require(0 <= self.ratio < 1, "ratio", "must be in [0, 1)")
        require(0 <= self.layer_ratio < 1, "layer_ratio", "must be in [0, 1)")
        require(0 <= self.hidden_ratio < 1, "hidden_ratio", "must be in [0, 1)")
        require(self.layer_score in LAYER_SCORES, "layer_score", f"must be one of {', '.join(LAYER_SCORES)}")
        require(self.target_params is None or 0 < self.target_params < 1, "target_params", "must be in (0, 1)")
        require(self.target_shape in TARGET_SHAPES, "target_shape", f"must be one of {', '.join(TARGET_SHAPES)}")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "lora_r", "prune_freq", "max_nan_steps"):
            require(getattr(self, name) >= 1, name, "must be a positive integer")
        require(self.seq_len >= 2, "seq_len", "must be at least 2 tokens")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        require(self.lora_alpha > 0, "lora_alpha", "must be positive")
        require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        require(0 <= self.warmup < 1 and 0 <= self.cooldown < 1, "warmup", "and --cooldown must be in [0, 1)")
        require(self.warmup + self.cooldown < 1, "warmup", "plus --cooldown must leave steps to prune in")
        require(0 <= self.ema < 1, "ema", "must be in [0, 1)")
        require(self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
        require(self.allocation in ALLOCATIONS, "allocation", f"must be one of {', '.join(ALLOCATIONS)}")
        require(0 < self.min_keep < 1, "min_keep", "must be in (0, 1)")
        require(self.distill is None or 0 <= self.distill <= 1, "distill", "must be in [0, 1]")
        require(self.distill_temperature > 0 and math.isfinite(self.distill_temperature), "distill_temperature",
                "must be a positive number")  # fmt: skip
        require(self.distill_teacher in TEACHER_PRECISIONS, "distill_teacher",
                f"must be one of {', '.join(TEACHER_PRECISIONS)}")  # fmt: skip
        require(self.distill_top_k is None or self.distill_top_k >= 0, "distill_top_k",
                "must be 0 (off) or a positive number of tokens")  # fmt: skip
        if self.multiple_of is not None:
            n = self.multiple_of
            require(n >= 1 and n & (n - 1) == 0, "multiple_of", "must be a positive power of two")
            if self.allocation == "global":
                raise LoraPruneError("--multiple-of aligns --allocation layer's widths; it cannot be combined "
                                     "with --allocation global")  # fmt: skip
        if self.uniform and self.allocation == "global":
            raise LoraPruneError("--allocation global puts different numbers of groups in each layer; "
                                 "it cannot be combined with --uniform")  # fmt: skip
        require(self.schedule in SCHEDULE_NAMES, "schedule", f"must be one of {', '.join(SCHEDULE_NAMES)}")
        require(self.shrink in (None, *SHRINK_MODES), "shrink", f"must be one of {', '.join(SHRINK_MODES)}")
        require(self.task is None or self.task in TASK_NAMES, "task", f"must be one of {', '.join(TASK_NAMES)}")
        if self.uniform and self.skip_layers not in ("none", "first10pct,last"):
            raise LoraPruneError("--uniform prunes every layer alike; it cannot be combined with --skip-layers")

    def decided_criterion(self) -> str:
        """--criterion once plan.check_compatible has decided its default (which depends on --fsdp)."""
        if self.criterion is None:
            raise ValueError("the config's criterion is undecided: pass it through plan.check_compatible first")
        return self.criterion

    def removed_layers(self, num_layers: int) -> int:
        """How many whole layers --layer-ratio removes from a model of `num_layers` (of its prunable ones)."""
        return round_half_up(self.layer_ratio * (num_layers - len(self.skipped_layers(num_layers))))

    def removed_hidden(self, hidden_size: int) -> int:
        """How many hidden channels --hidden-ratio removes."""
        return round_half_up(self.hidden_ratio * hidden_size)

    def skipped_layers(self, num_layers: int) -> set[int]:
        """Indices of the layers left unpruned (none under --uniform)."""
        spec = "none" if self.uniform else self.skip_layers.replace(" ", "")
        skipped: set[int] = set()
        for part in filter(None, spec.split(",")):
            if part == "none":
                continue
            elif part == "first10pct":
                skipped.update(range(round_half_up(0.1 * num_layers)))
            elif part == "last":
                skipped.add(num_layers - 1)
            elif part.lstrip("-").isdigit() and -num_layers <= int(part) < num_layers:
                skipped.add(int(part) % num_layers)
            else:
                raise LoraPruneError(
                    f"--skip-layers: {part!r} is not 'none', 'first10pct', 'last' or a layer index below {num_layers}"
                )
        if len(skipped) == num_layers and (self.ratio > 0 or self.layer_ratio > 0) and not self.hidden_ratio:
            raise LoraPruneError("--skip-layers leaves no layer to prune")
        return skipped
