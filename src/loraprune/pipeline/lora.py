"""Attach LoRA adapters with peft (docs/method.md#setting): only A and B will receive gradients."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..archs import Arch
from ..prune_config import PruneConfig


def attach_lora(model: nn.Module, arch: Arch, config: PruneConfig) -> PeftModel:
    """Wrap q, k, v, o, gate, up, down of every layer in LoRA; freeze everything else."""
    torch.manual_seed(config.seed)  # A's initialisation
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=arch.lora_targets,
        bias="none",
    )
    return get_peft_model(model, lora)
