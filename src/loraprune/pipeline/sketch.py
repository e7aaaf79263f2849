"""The `sketch` criterion: the true gradient seen through fresh random directions, never formed.

LoRA's own estimate (docs/method.md#lora-guided-criterion) sees dL/dW0 = G through the directions
of A (and of B), which training turns towards G's largest ones, so its group ranking can agree
with the true gradient's less as LoRA trains (`loraprune diagnose` measures it), while fresh
random directions keep seeing G from every side, and more so averaged over steps.

So for every scored projection, hooks collect G·Rᵀ = Σ_tokens dy·(R·x)ᵀ (out × r) for a Gaussian
R (r × in, entries N(0, 1/r), so that E[RᵀR] = I) drawn anew at every optimizer step, and the score
is |(G·Rᵀ)·R ⊙ (W0 + s·B·A)|: the moving average then averages many independent projections.
Memory: one (out × r) product per module, the size of LoRA's dL/dB; time: two rank-r products per
module per micro-batch. R comes from one seeded CPU generator, drawn in forward order, so every
rank of a multi-process run draws the same R, and a checkpoint restores the generator.
"""

import torch
from torch import Tensor, nn

from ..runtime import distributed
from .importance import LoraFactors, Seeded, merged_weight

SKETCH_ATTRIBUTE = "loraprune_gradient_sketch"  # where scoring.read_factors finds a module's sketch


class GradientSketch:
    """G·Rᵀ of one projection over one optimizer step, collected by a forward hook on it."""

    def __init__(self, module: nn.Module, rank: int, generator: torch.Generator):
        self.rank, self.generator = rank, generator
        self.basis: Tensor | None = None  # R (r, in): drawn at the step's first forward
        self.product: Tensor | None = None  # G·Rᵀ (out, r), summed over the step's micro-batches
        self.module = module
        self.handle = module.register_forward_hook(self._forward)
        setattr(module, SKETCH_ATTRIBUTE, self)

    def _forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):  # evaluation, or a recomputation
            return
        x = args[0]  # the input after the mask hooks: masked columns have no gradient either
        if self.basis is None:
            basis = torch.randn(self.rank, x.shape[-1], generator=self.generator) / self.rank**0.5
            self.basis = basis.to(x.device)
        projected = x.detach().float() @ self.basis.T  # (..., r)
        output.register_hook(lambda grad: self._accumulate(grad, projected))

    def _accumulate(self, grad: Tensor, projected: Tensor) -> None:
        product = torch.einsum("...o,...r->or", grad.float(), projected)
        self.product = product if self.product is None else self.product + product

    def reset(self) -> None:
        self.basis = self.product = None

    def remove(self) -> None:
        self.handle.remove()
        delattr(self.module, SKETCH_ATTRIBUTE)


class SketchScores(Seeded):
    """|(G·Rᵀ)·R ⊙ (W0 + s·B·A)| from gradient sketches (see the module docstring)."""

    def __init__(self, seed: int = 0, rank: int = 8):
        super().__init__(seed)
        self.rank = rank
        self.sketches: list[GradientSketch] = []

    def attach(self, modules: dict[nn.Module, int]) -> None:
        self.sketches = [GradientSketch(m, self.rank, self.generator) for m in modules]

    def synchronize(self) -> None:
        """Several processes: average the sketches over the ranks, as DDP averages LoRA gradients."""
        for sketch in self.sketches:
            if sketch.product is not None:
                sketch.product = distributed.average(sketch.product)

    def next_step(self) -> None:
        for sketch in self.sketches:
            sketch.reset()

    def detach(self) -> None:
        for sketch in self.sketches:
            sketch.remove()
        self.sketches = []

    def __call__(self, f: LoraFactors) -> Tensor:
        if f.sketch_product is None:
            raise RuntimeError("no gradient sketch: run forward and backward with the criterion attached first")
        return torch.mm(f.sketch_product, f.sketch_basis, out=f.buffer(1)).mul_(merged_weight(f)).abs_()
