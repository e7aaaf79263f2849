"""`loraprune estimate`: the expected peak memory of a prune, from the model's config alone.

Parameter counts come from a meta-device model (no weights are read or allocated). The peak of a
training step is the base weights, the LoRA factors with their gradients and AdamW moments
(float32), plus the larger of two transients that never coexist: the activations kept for
backward (with the logits and their cross-entropy gradient), and the score block of one module
(scoring runs after backward has freed the activations).
"""

from dataclasses import dataclass

from torch import nn

from ..archs import arch_for

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# activation elements kept for backward per token and layer, in units of hidden (h) and MLP (m)
# width: norms and their inputs, q/k/v/o and gate/up/down inputs, rotary q/k, attention output,
# the LoRA branch's dropout outputs, SiLU(gate)·up: a count by hand, checked only end to end (a
# 42M llama: 293 MiB predicted, 341 MiB measured; tests/test_memory.py)
HIDDEN_PER_LAYER, MLP_PER_LAYER = 20, 7
LOGIT_COPIES = 3  # logits, log-softmax, and their gradient at the top of backward (float32)
SCORE_COPIES = 4  # W0 block, s·B·A, the gradient estimate and their product (float32)
SCORE_BLOCK_ROWS = 1024  # importance.projection_scores' block


@dataclass
class Estimate:
    """Bytes of each part of a run's peak, for one base-weight dtype."""

    dtype: str
    base_weights: int
    lora_and_adamw: int
    activations: int
    score_block: int

    @property
    def peak(self) -> int:
        return self.base_weights + self.lora_and_adamw + max(self.activations, self.score_block)


def estimate(model_config, batch_size: int, seq_len: int, lora_r: int = 8, dtype: str = "float32") -> Estimate:
    """Expected peak bytes of a training step for this config (gradient checkpointing off)."""
    from ..tasks import meta_model

    model = meta_model(model_config)
    arch = arch_for(model.config)
    targets = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in arch.lora_targets
    ]
    params = sum(p.numel() for p in model.parameters())
    lora = sum(lora_r * (m.in_features + m.out_features) for m in targets)
    h, m = model_config.hidden_size, model_config.intermediate_size
    tokens, layers = batch_size * seq_len, model_config.num_hidden_layers
    activations = tokens * layers * (HIDDEN_PER_LAYER * h + MLP_PER_LAYER * m) * BYTES[dtype]
    activations += tokens * model_config.vocab_size * 4 * LOGIT_COPIES
    block = max(min(SCORE_BLOCK_ROWS, t.out_features) * t.in_features for t in targets) * 4 * SCORE_COPIES
    return Estimate(dtype, params * BYTES[dtype], lora * 4 * 4, activations, block)


def format_estimates(name: str, estimates: list[Estimate], batch_size: int, seq_len: int, lora_r: int) -> str:
    """A table of the estimates, one column per dtype, in MiB."""
    rows = [("", *(e.dtype for e in estimates))]
    for label, attribute in (
        ("base weights", "base_weights"),
        ("LoRA factors + grads + AdamW (float32)", "lora_and_adamw"),
        ("activations kept for backward", "activations"),
        ("score block of one module (after backward)", "score_block"),
        ("expected peak", "peak"),
    ):
        rows.append((label, *(f"{getattr(e, attribute) / 2**20:.1f}" for e in estimates)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  " + "  ".join(f"{c:>9}" for c in r[1:]) for r in rows]
    lines.append(f"MiB for {name}: batch {batch_size} x {seq_len} tokens, LoRA r={lora_r}, no gradient checkpointing")
    return "\n".join(lines)
