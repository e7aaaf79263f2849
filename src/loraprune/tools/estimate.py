"""`loraprune estimate` and the memory pre-flight of `prune`: the expected peak memory of a run, from
the model's config alone, and whether it fits in what the device has free.

Sizes come from a meta-device model (no weights are read or allocated). The activations autograd
keeps for backward are not counted by hand: a forward of a one- and a two-layer copy of the model,
with LoRA, the criterion's hooks and its requires_grad settings, runs on the meta device under a
saved-tensors hook that adds up what is saved (a second, for a 7B shape); the difference is one
layer's share. The peak of a step is then the larger of its phases:

- forward and the top of backward: base weights, LoRA factors with their gradients and AdamW
  moments (float32), every activation kept for backward, and the loss's transients (the gradient
  of the float32 log-softmax over the vocabulary, and of the logits);
- with gradient checkpointing: only each layer's input is kept, and one layer's activations are
  recomputed at a time in backward;
- `gradient` criterion, end of backward: dL/dW0 of every scored projection (the model's dtype)
  has accumulated while the activations were freed; then scoring reads it a block at a time;
- `streamed` criterion: the projections' inputs it keeps (bfloat16) are saved tensors, so the trace
  counts them, and it scores blocks during backward, at the top of it;
- scoring (every criterion): the transients of one block of one module (scoring.py).

On CPU the peak is the process's resident memory, so the Python + torch runtime is added
(RUNTIME_BYTES, measured); on a GPU it is the device's allocations.
"""

import copy
import os
from dataclasses import asdict, dataclass

import torch

from ..archs import arch_for, meta_model
from ..pipeline.lm_loss import LOGIT_COPIES, causal_lm_loss, chunked_head, distilled_causal_lm_loss, loss_chunk_tokens
from ..pipeline.scoring import CRITERIA, SCORE_BLOCK_BYTES

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30
# resident memory of python + torch + transformers + peft + loraprune before a model is loaded, and
# what the first forward/backward adds (thread pools, kernel code): measured (bench/scale.py)
RUNTIME_BYTES = 560 * 2**20
SCORE_COPIES = 4  # W0 block, s·B·A, the gradient estimate and their product
KEEPS_INPUTS = ("gradient", "streamed")  # criteria under which the scored projections keep their inputs


@dataclass
class Estimate:
    """Bytes of each part of one process's peak."""

    dtype: str
    criterion: str
    gradient_checkpointing: bool
    runtime: int  # CPU: the Python + torch process itself; GPU: 0
    base_weights: int
    lora_and_adamw: int  # factors, gradients, two AdamW moments, float32
    activations: int  # kept for backward at its top (checkpointing: layer inputs + one layer's)
    loss_transient: int  # float32 logits of a chunk and what is computed from them (lm_loss.py)
    weight_grads: int  # dL/dW0 of the scored projections (`gradient` only), at the end of backward
    early_activations: int  # activations still kept when the last dL/dW0 appears (unscored first layers)
    score_block: int  # transients of scoring one block of one module (scoring dtype)

    @property
    def peak(self) -> int:
        common = self.runtime + self.base_weights + self.lora_and_adamw
        top = self.activations + self.loss_transient
        end = self.weight_grads + self.early_activations if self.weight_grads else 0
        return common + max(top, end, self.weight_grads + self.score_block)

    def parts(self) -> dict:
        return asdict(self) | {"peak": self.peak}


def _config_with_layers(model_config, layers: int):
    config = copy.deepcopy(model_config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # qwen2 and others: one entry per layer
        config.layer_types = config.layer_types[:layers]
    return config


def _meta_lora_model(model_config, criterion: str, dtype: str, lora_r: int, lora_dropout: float, task: str | None):
    """The `task`'s model with LoRA and the criterion's Pruner on the meta device; every layer scored."""
    from ..archs import auto_class_for
    from ..pipeline.lora import attach_lora
    from ..pipeline.pruner import Pruner
    from ..prune_config import PruneConfig

    with torch.device("meta"):
        model = auto_class_for(model_config, task).from_config(model_config, dtype=getattr(torch, dtype))
    config = PruneConfig(criterion=criterion, lora_r=lora_r, lora_dropout=lora_dropout, skip_layers="none")
    arch = arch_for(model_config)
    peft_model = attach_lora(model, arch, config)
    Pruner(peft_model.get_base_model(), arch, config)
    return peft_model


class _FlashAttentionLike(torch.autograd.Function):
    """What CPU and GPU flash attention keep for backward (q, k, v, output, log-sum-exp), for the
    meta trace: on the meta device scaled_dot_product_attention takes the math path, which keeps
    the (heads x tokens x tokens) attention matrix instead."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace is forward only
        raise NotImplementedError


def _flash_like(query, key, value, *args, **kwargs):
    return _FlashAttentionLike.apply(query, key, value)


_MEMO: dict[tuple, int | dict] = {}  # the meta traces and counts of one process, by config and arguments


def _memo(function):
    """Cache a function of (model_config, *hashable arguments) by the config's JSON."""

    def cached(model_config, *args):
        key = (function.__name__, model_config.to_json_string(), *args)
        if key not in _MEMO:
            _MEMO[key] = function(model_config, *args)
        return _MEMO[key]

    cached.__name__, cached.__doc__ = function.__name__, function.__doc__
    return cached


def saved_bytes(model_config, batch_size: int, seq_len: int, criterion: str = "lora", dtype: str = "float32",
                lora_r: int = 8, lora_dropout: float = 0.05, distill: bool = False,
                task: str | None = None) -> int:  # fmt: skip
    """Bytes autograd keeps for backward after a training forward and loss of this model (meta
    device) on a batch the `task` (the family's default if None) builds: for a causal LM the chunked
    loss of lm_loss.py, distilled from the dense model under `distill`; an encoder's forward."""
    return _saved_bytes(model_config, batch_size, seq_len, criterion, dtype, lora_r, lora_dropout, distill, task)


@_memo
def _saved_bytes(model_config, batch_size, seq_len, criterion, dtype, lora_r, lora_dropout, distill, task) -> int:
    from ..tasks import task_for

    model = _meta_lora_model(model_config, criterion, dtype, lora_r, lora_dropout, task)
    model.train()
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}  # by storage (a view's base): one input saved by q, k and v counts once

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in params:
            kept[id(base)] = base  # the reference keeps the id unique while counting
        return t

    inputs = task_for(model_config, task).meta_inputs(model_config, batch_size, seq_len)
    ids = inputs.get("input_ids")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = _flash_like
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if chunked_head(model) is None:  # an encoder: its forward on the task's inputs (no LM loss)
                model(**inputs)
            elif distill:  # the teacher: the same model without gradients (nothing kept)
                distilled_causal_lm_loss(model, ids, lambda fn: torch.no_grad()(fn)(model), 0.5, 1.0)
            else:
                causal_lm_loss(model, ids)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return sum(t.numel() * t.element_size() for t in kept.values())


def model_counts(model_config, lora_r: int = 8, skip_layers: str = "first10pct,last", task: str | None = None) -> dict:
    """Parameters of the `task`'s model, of its LoRA factors, and of the projections a criterion scores."""
    return dict(_model_counts(model_config, lora_r, skip_layers, task))


@_memo
def _model_counts(model_config, lora_r, skip_layers, task) -> dict:
    from ..prune_config import PruneConfig

    model = meta_model(model_config, task)
    arch = arch_for(model.config)
    layers = arch.layers_of(model)
    skipped = PruneConfig(skip_layers=skip_layers).skipped_layers(len(layers))
    lora = scored = 0
    for i, layer in enumerate(layers):
        for module in arch.projections(layer).values():
            lora += lora_r * (module.in_features + module.out_features)
            scored += module.weight.numel() if i not in skipped else 0
    largest = max(m.weight.numel() for layer in layers for m in arch.projections(layer).values())
    return {"parameters": sum(p.numel() for p in model.parameters()), "lora": lora, "scored": scored,
            "largest_projection": largest, "layers": len(layers), "skipped_layers": sorted(skipped)}  # fmt: skip


def estimate(
    model_config,
    batch_size: int,
    seq_len: int,
    lora_r: int = 8,
    dtype: str = "float32",
    criterion: str = "lora",
    gradient_checkpointing: bool = False,
    device: str = "cpu",
    skip_layers: str = "first10pct,last",
    lora_dropout: float = 0.05,
    distill: bool = False,
    task: str | None = None,
) -> Estimate:
    """Expected peak bytes of one process's training step for this config; `distill`: the loss
    distills from the dense model (--distill; its last hidden states and logits a chunk at a time);
    `task`: what the model is trained for (tasks/; the family's default if None)."""
    counts = model_counts(model_config, lora_r, skip_layers, task)
    layers, e = counts["layers"], BYTES[dtype]
    tokens = batch_size * seq_len

    def saved(n: int, crit: str) -> int:
        config = _config_with_layers(model_config, n)
        return saved_bytes(config, batch_size, seq_len, crit, dtype, lora_r, lora_dropout, distill, task)

    one = saved(1, "lora")
    layer = saved(2, "lora") - one  # one layer's activations
    outside = one - layer  # embeddings, final norm, logits and loss
    scored_layer = layer
    if criterion in KEEPS_INPUTS:  # base weights that require grad, or the streamed hooks, keep inputs
        scored_layer = saved(2, criterion) - saved(1, criterion)
    n_scored = layers - len(counts["skipped_layers"]) if criterion in KEEPS_INPUTS else 0
    kept = outside + (layers - n_scored) * layer + n_scored * scored_layer
    first_skipped = sum(1 for i in counts["skipped_layers"] if i < layers // 2)
    if gradient_checkpointing:  # each layer's input, plus one layer recomputed in backward
        kept = outside + layers * tokens * model_config.hidden_size * e + max(layer, scored_layer)
        early = first_skipped * tokens * model_config.hidden_size * e
    else:
        early = first_skipped * layer
    vocab = getattr(model_config, "vocab_size", 0) or 0
    # float32 temporaries of one chunk of logits (lm_loss.py), and the dense model's last hidden states
    loss_chunk = min(tokens, loss_chunk_tokens(vocab, distill)) * vocab * 4 * LOGIT_COPIES[distill]
    teacher_states = tokens * model_config.hidden_size * e if distill else 0
    score_bytes = 2 if dtype == "bfloat16" else 4  # scoring.scoring_dtype
    score_block = min(counts["largest_projection"] * score_bytes, SCORE_BLOCK_BYTES) * SCORE_COPIES
    if criterion == "streamed":  # it scores its blocks during backward, from the top of it
        kept += score_block
    return Estimate(
        dtype=dtype,
        criterion=criterion,
        gradient_checkpointing=gradient_checkpointing,
        runtime=RUNTIME_BYTES if device == "cpu" else 0,
        base_weights=counts["parameters"] * e,
        lora_and_adamw=counts["lora"] * 4 * 4,
        activations=kept,
        loss_transient=loss_chunk + teacher_states,
        weight_grads=counts["scored"] * e if criterion == "gradient" else 0,
        early_activations=early if criterion == "gradient" else 0,
        score_block=score_block,
    )


def available_bytes(device: str = "cpu") -> int:
    """Memory free for a new run: MemAvailable on CPU, free memory of the GPU otherwise."""
    if device.startswith("cuda"):
        index = torch.device(device).index
        return torch.cuda.mem_get_info(torch.cuda.current_device() if index is None else index)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def format_estimates(name: str, estimates: list[Estimate], batch_size: int, seq_len: int, lora_r: int,
                     available: int | None = None, processes: int = 1) -> str:  # fmt: skip
    """A table of the estimates, one column per criterion, in GiB."""
    rows = [("", *(e.criterion for e in estimates))]
    for label, attribute in (
        ("runtime (Python + torch)", "runtime"),
        ("base weights", "base_weights"),
        ("LoRA factors + grads + AdamW (float32)", "lora_and_adamw"),
        ("activations kept for backward", "activations"),
        ("loss transients (a chunk of logits)", "loss_transient"),
        ("base-weight gradients dL/dW0", "weight_grads"),
        ("score block of one module", "score_block"),
        ("expected peak", "peak"),
    ):
        rows.append((label, *(f"{getattr(e, attribute) / GiB:.2f}" for e in estimates)))
    if processes > 1:
        rows.append((f"{processes} processes on this machine", *(f"{e.peak * processes / GiB:.2f}" for e in estimates)))
    if available is not None:
        rows.append(
            ("fits in what is available", *("yes" if e.peak * processes <= available else "NO" for e in estimates))
        )
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  " + "  ".join(f"{c:>9}" for c in r[1:]) for r in rows]
    e = estimates[0]
    lines.append(
        f"GiB for {name}: {e.dtype}, batch {batch_size} x {seq_len} tokens, LoRA r={lora_r}, gradient checkpointing "
        f"{'on' if e.gradient_checkpointing else 'off'}"
        + ("" if available is None else f"; available: {available / GiB:.2f} GiB")
    )
    return "\n".join(lines)


def run_estimate(model_config, config, dtype: str, device: str = "cpu", sharded_over: int = 1,
                 quantize_bits: int | None = None) -> Estimate:  # fmt: skip
    """The estimate of one process of a run: `config` is its PruneConfig; FSDP over `sharded_over`
    processes divides the weights; 8-/4-bit loading stores the base weights in that many bits."""
    est = estimate(model_config, config.batch_size, config.seq_len, config.lora_r, dtype, config.decided_criterion(),
                   config.gradient_checkpointing, "cpu" if device == "cpu" else "cuda", config.skip_layers,
                   config.lora_dropout, distill=bool(config.distill), task=config.task)  # fmt: skip
    if quantize_bits:
        est.base_weights = est.base_weights * quantize_bits // (8 * BYTES[dtype])
    if sharded_over > 1:
        est.base_weights //= sharded_over
        est.weight_grads //= sharded_over
    return est


def estimate_report(model_config, settings) -> str:
    """`loraprune estimate`: the table (or JSON) of the estimates for each criterion, and the verdicts."""
    import json

    from ..prune_config import PruneConfig

    s = settings
    criteria = [s.criterion] if s.criterion else list(CRITERIA)
    device = s.device
    shared = s.processes if device == "cpu" else 1
    estimates = []
    for criterion in criteria:
        config = PruneConfig(criterion=criterion, batch_size=s.batch_size, seq_len=s.seq_len, lora_r=s.lora_r,
                             lora_alpha=2.0 * s.lora_r, gradient_checkpointing=s.gradient_checkpointing)  # fmt: skip
        estimates.append(run_estimate(model_config, config, s.dtype, device))
    available = available_bytes(device)
    if s.json:
        return json.dumps(
            {"model": s.model, "dtype": s.dtype, "batch_size": s.batch_size, "seq_len": s.seq_len, "lora_r": s.lora_r,
             "gradient_checkpointing": s.gradient_checkpointing, "device": device, "processes": s.processes,
             "available_bytes": available,
             "estimates": [e.parts() | {"needed": e.peak * shared, "fits": e.peak * shared <= available}
                           for e in estimates]},
            indent=2,
        )  # fmt: skip
    table = format_estimates(s.model, estimates, s.batch_size, s.seq_len, s.lora_r, available, shared)
    return table
