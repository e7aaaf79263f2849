"""Importance criteria: small pure functions from one LoRA projection to element scores.

A criterion maps `LoraFactors` (a block of rows of one projection) to |score| per element,
(rows, in). `projection_scores` runs it block by block and sums rows or columns, so the
out x in transient never exists for more than one block of one module at a time.
A criterion says what it reads through two attributes: `needs_lora_grads` (default True) and
`needs_weight_grad` (the true dL/dW0, which the Pruner then enables on the base weights). A
criterion that collects its own statistics (sketch.py) also has `attach(modules)`,
`synchronize()` (before scoring), `next_step()` (after it) and `detach()`, which the Pruner calls.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import fsdp
from .sketch import SKETCH_ATTRIBUTE, SketchScores


@dataclass
class LoraFactors:
    """W = W0 + s·B·A and the available gradients, for a block of output rows (float32)."""

    weight: Tensor  # W0: (rows, in)
    A: Tensor  # (r, in)
    B: Tensor  # (rows, r)
    grad_A: Tensor | None  # dL/dA: (r, in)
    grad_B: Tensor | None  # dL/dB: (rows, r)
    scaling: float  # s = alpha / r
    weight_grad: Tensor | None = None  # dL/dW0: (rows, in), only when the base weight requires grad
    sketch_basis: Tensor | None = None  # R: (k, in), only under the sketch criterion
    sketch_product: Tensor | None = None  # dL/dW0·Rᵀ: (rows, k)

    @classmethod
    def of(
        cls,
        module: nn.Module,
        rows: slice,
        adapter: str = "default",
        lora_grads: bool = True,
        weight: Tensor | None = None,
        whole_A: tuple[Tensor, Tensor | None] | None = None,
    ) -> "LoraFactors":
        """Read a peft LoRA layer's factors for output rows `rows` of this rank's rows (all of them
        unless FSDP shards the module); gradients are None where absent (an error if `lora_grads`
        asks for the LoRA ones). `weight`: W0 already dequantized. `whole_A`: (A, dL/dA) already
        gathered by `gather_A` (under FSDP a collective, so issued once per module, not per block)."""
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        W = module.base_layer.weight if weight is None else weight
        if lora_grads and (A.grad is None or B.grad is None):
            raise RuntimeError("LoRA factors have no gradient: call backward() before scoring")

        def f32(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().float()

        def row_block(t: Tensor | None, whole: bool = False) -> Tensor | None:  # B's rows are sharded like W0's
            if t is None:
                return None
            return (fsdp.rows_held(t, W) if whole else fsdp.local(t))[rows]  # whole: a tensor of all rows

        sketch = getattr(module, SKETCH_ATTRIBUTE, None)
        A_all, grad_A_all = gather_A(module, adapter) if whole_A is None else whole_A
        return cls(
            weight=f32(row_block(W)),
            A=f32(A_all),
            B=f32(row_block(B)),
            grad_A=f32(grad_A_all),
            grad_B=f32(row_block(B.grad)),
            scaling=module.scaling[adapter],
            weight_grad=f32(row_block(W.grad)),
            sketch_basis=None if sketch is None else f32(sketch.basis),
            sketch_product=None if sketch is None else f32(row_block(sketch.product, whole=True)),
        )


def gather_A(module: nn.Module, adapter: str = "default") -> tuple[Tensor, Tensor | None]:
    """A and dL/dA of a LoRA projection, whole: under FSDP gathered from the ranks (collectives that
    every rank must issue alike, whatever number of row blocks it holds)."""
    A = module.lora_A[adapter].weight
    return fsdp.whole(A), fsdp.whole(A.grad)


def _reads(lora_grads: bool = False, weight_grad: bool = False):
    """Mark which gradients a criterion reads."""

    def mark(criterion):
        criterion.needs_lora_grads, criterion.needs_weight_grad = lora_grads, weight_grad
        return criterion

    return mark


def lora_gradient_estimate(f: LoraFactors) -> Tensor:
    """G_B·A + B·G_A − G_B·G_A: the change one SGD step (lr 1) on A and B makes to B·A,
    B·A − (B − G_B)(A − G_A). It stands in for dL/dW0, which is never formed."""
    # = [G_B, B − G_B]·[A; G_A]: one rank-2r product instead of three (rows, in) ones
    return torch.cat([f.grad_B, f.B - f.grad_B], dim=1) @ torch.cat([f.A, f.grad_A], dim=0)


@_reads(lora_grads=True)
def lora_guided(f: LoraFactors) -> Tensor:
    """METHOD.md §2: |(G_B·A + B·G_A − G_B·G_A) ⊙ (W0 + s·B·A)|."""
    # two (rows, in) tensors in all (the estimate and the merged weight), the product in place:
    # 3.5x faster than the term-by-term form on SmolLM2's shapes (bench/overhead.py)
    merged = torch.addmm(f.weight, f.B, f.A, alpha=f.scaling)  # a new tensor: W0 itself is never written
    return lora_gradient_estimate(f).mul_(merged).abs_()


@_reads(weight_grad=True)
def weight_gradient(f: LoraFactors) -> Tensor:
    """Vanilla first-order |dL/dW0 ⊙ W0| with the true gradient, as LLM-Pruner (the memory baseline).

    Like LLM-Pruner it multiplies by the frozen W0, not the merged W0 + s·B·A.
    """
    if f.weight_grad is None:
        raise RuntimeError("base weight has no gradient: the 'gradient' criterion needs the Pruner to enable it")
    return (f.weight_grad * f.weight).abs()


@_reads()
def magnitude(f: LoraFactors) -> Tensor:
    """|W0 + s·B·A|: needs no gradient at all."""
    return torch.addmm(f.weight, f.B, f.A, alpha=f.scaling).abs_()


class RandomScores:
    """Uniform random element scores, a floor every criterion must beat.

    One CPU generator per run, seeded by --seed and drawn in the fixed order the Pruner scores
    (step, layer, module, row block), so the same seed gives the same masks on any device.
    """

    needs_lora_grads = needs_weight_grad = False

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, f: LoraFactors) -> Tensor:
        return torch.rand(f.weight.shape, generator=self.generator).to(f.weight.device)


Criterion = Callable[[LoraFactors], Tensor]
# a class entry is stateful: make_criterion builds a fresh one per run
CRITERIA: dict[str, Criterion | type] = {
    "lora": lora_guided,
    "gradient": weight_gradient,
    "magnitude": magnitude,
    "random": RandomScores,
    "sketch": SketchScores,
}


def make_criterion(name: str, seed: int = 0, rank: int = 8) -> Criterion:
    """The criterion called `name`, a stateful one seeded by `seed` (the sketch: of `rank` directions)."""
    criterion = CRITERIA[name]
    if criterion is SketchScores:
        return SketchScores(seed, rank)
    return criterion(seed) if isinstance(criterion, type) else criterion


def projection_scores(module: nn.Module, criterion: Criterion, dim: int, block_rows: int = 1024) -> Tensor:
    """Sum a projection's element scores over its rows (dim=0: one score per input column) or
    over its columns (dim=1: one score per output row). Under FSDP each rank scores its own rows
    and the ranks' sums are added up (fsdp.py)."""
    from .quant import dense_weight  # W0 itself, or an 8-/4-bit one dequantized: one module at a time

    weight = dense_weight(module.base_layer)
    local_rows = fsdp.local(weight).shape[0]
    lora_grads = getattr(criterion, "needs_lora_grads", True)
    whole_A = gather_A(module)  # once per module: ranks may hold different numbers of blocks
    parts = []
    total = None
    for start in range(0, local_rows, block_rows):
        rows = slice(start, start + block_rows)
        block = criterion(LoraFactors.of(module, rows, lora_grads=lora_grads, weight=weight, whole_A=whole_A))
        if dim == 1:
            parts.append(block.sum(dim=1))
        else:
            total = block.sum(dim=0) if total is None else total + block.sum(dim=0)
        del block  # free the transient before the next block
    if not fsdp.is_sharded(weight):
        return torch.cat(parts) if dim == 1 else total
    if dim == 1:  # this rank's rows in place, zeros elsewhere
        scores = torch.zeros(weight.shape[0], device=fsdp.local(weight).device)
        offset = fsdp.row_offset(weight)
        scores[offset : offset + local_rows] = torch.cat(parts) if parts else 0
    else:
        scores = total if total is not None else torch.zeros(weight.shape[1], device=fsdp.local(weight).device)
    return fsdp.sum_over_shards(scores, weight)
