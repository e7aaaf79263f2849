"""8-/4-bit base weights through bitsandbytes (CUDA only): loading, and plain weights when needed.

The score reads W0 one module at a time, dequantized to float (`dense_weight`), so no more than
one module's float copy exists at once. After training, each quantized base layer is replaced by
a plain one (one module at a time) so that shrinking and merging work as for any model.
UNVERIFIED here: this machine has no CUDA, so only the refusal paths are tested.
"""

import importlib.util

import torch
from torch import Tensor, nn

from ..errors import LoraPruneError

_QUANTIZED = ("Int8Params", "Params4bit")


def quantization_config(bits: int | None, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for 8 or 4 bits (None: no quantization), or a clear refusal."""
    if bits is None:
        return None
    flag = f"--load-in-{bits}bit"
    if not torch.cuda.is_available():
        raise LoraPruneError(f"{flag} needs a CUDA GPU (bitsandbytes kernels); this machine has none: drop {flag}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraPruneError(f"{flag} needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def is_quantized(weight: Tensor) -> bool:
    return type(weight).__name__ in _QUANTIZED


def dense_weight(base_layer: nn.Module) -> Tensor:
    """The layer's weight as a plain float tensor: itself, or dequantized from 8/4 bits."""
    weight = base_layer.weight
    if not is_quantized(weight):
        return weight
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(weight, state=getattr(base_layer, "state", None))


def dequantize_base_layers(peft_model: nn.Module) -> None:
    """Replace every quantized LoRA layer by a plain peft LoRA Linear over the dequantized weight."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    replaced = 0
    for name, module in list(peft_model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is None or not is_quantized(base.weight):
            continue
        weight = dense_weight(base)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.bfloat16
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        linear.to(dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        linear.requires_grad_(False)
        adapter = module.active_adapters[0]
        plain = LoraLinear(
            linear, adapter, r=module.r[adapter], lora_alpha=module.lora_alpha[adapter], lora_dropout=0.0
        )
        plain.lora_A[adapter].weight.data = module.lora_A[adapter].weight.data
        plain.lora_B[adapter].weight.data = module.lora_B[adapter].weight.data
        parent_name, _, child = name.rpartition(".")
        setattr(peft_model.get_submodule(parent_name), child, plain)
        replaced += 1
    if replaced:
        model = peft_model.get_base_model()
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        model.is_loaded_in_8bit = model.is_loaded_in_4bit = False
