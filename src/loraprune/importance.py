"""Importance criteria: small pure functions from one LoRA projection to element scores.

A criterion maps `LoraFactors` (a block of rows of one projection) to |score| per element,
(rows, in). `projection_scores` runs it block by block and sums rows or columns, so the
out x in transient never exists for more than one block of one module at a time.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LoraFactors:
    """W = W0 + s·B·A and the LoRA gradients, for a block of output rows (float32)."""

    weight: Tensor  # W0: (rows, in)
    A: Tensor  # (r, in)
    B: Tensor  # (rows, r)
    grad_A: Tensor  # dL/dA: (r, in)
    grad_B: Tensor  # dL/dB: (rows, r)
    scaling: float  # s = alpha / r

    @classmethod
    def of(cls, module: nn.Module, rows: slice, adapter: str = "default") -> "LoraFactors":
        """Read a peft LoRA layer's factors for output rows `rows`."""
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if A.grad is None or B.grad is None:
            raise RuntimeError("LoRA factors have no gradient: call backward() before scoring")

        def f32(t: Tensor) -> Tensor:
            return t.detach().float()

        return cls(
            weight=f32(module.base_layer.weight[rows]),
            A=f32(A),
            B=f32(B[rows]),
            grad_A=f32(A.grad),
            grad_B=f32(B.grad[rows]),
            scaling=module.scaling[adapter],
        )


def lora_guided(f: LoraFactors) -> Tensor:
    """METHOD.md §2: |(G_B·A + B·G_A − G_B·G_A) ⊙ (W0 + s·B·A)|.

    The first factor is the change one SGD step (lr 1) on A and B makes to B·A:
    B·A − (B − G_B)(A − G_A). It estimates dL/dW0 without ever forming it.
    """
    grad_estimate = f.grad_B @ f.A + f.B @ f.grad_A - f.grad_B @ f.grad_A
    merged = f.weight + f.scaling * (f.B @ f.A)
    return (grad_estimate * merged).abs()


Criterion = Callable[[LoraFactors], Tensor]
CRITERIA: dict[str, Criterion] = {"lora": lora_guided}


def projection_scores(module: nn.Module, criterion: Criterion, dim: int, block_rows: int = 1024) -> Tensor:
    """Sum a projection's element scores over its rows (dim=0: one score per input column) or
    over its columns (dim=1: one score per output row)."""
    out_features = module.base_layer.weight.shape[0]
    parts = []
    total = None
    for start in range(0, out_features, block_rows):
        block = criterion(LoraFactors.of(module, slice(start, start + block_rows)))
        if dim == 1:
            parts.append(block.sum(dim=1))
        else:
            total = block.sum(dim=0) if total is None else total + block.sum(dim=0)
        del block  # free the transient before the next block
    return torch.cat(parts) if dim == 1 else total
