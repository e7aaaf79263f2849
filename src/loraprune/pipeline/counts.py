"""Parameter counts: how big a model is, in all and in the projections the method prunes."""

from ..archs import Arch, arch_for


def count_parameters(model) -> int:
    """All parameters; tied weights (shared embedding / lm_head) count once."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields each tensor once


def count_prunable(model, arch: Arch | None = None) -> int:
    """Weights and biases of every layer's q/k/v/o and gate/up/down projections."""
    arch = arch or arch_for(model.config)
    total = 0
    for layer in arch.layers_of(model):
        for module in arch.projections(layer).values():
            # .weight/.bias rather than .parameters(): a LoRA-wrapped projection also holds adapters
            total += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    return total
