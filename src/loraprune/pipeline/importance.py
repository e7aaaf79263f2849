"""Importance criteria: what to score, as small callables over one block of a projection.

A criterion maps `LoraFactors` (a block of rows of one projection: W0, A, B and the gradients
available) to |score| per element, (rows, in). Reading the factors from a peft module and
summing the scores block by block is scoring.py's job; the names of the criteria are its table.

Every criterion has one interface (`Criterion`): it says which gradients it reads
(`needs_lora_grads`, `needs_weight_grad`), and has hooks with no-op defaults that the Pruner
calls: `attach(modules)` before training, `synchronize()` before scoring a step,
`next_step()` after it, `detach()` after training, and `state_dict()` / `load_state_dict()`
for checkpoints. Only criteria that collect their own statistics (sketch.py, streamed.py) or draw random
numbers override them.
"""

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LoraFactors:
    """W = W0 + s·B·A and the available gradients, for a block of output rows (float32, or bfloat16
    for a bfloat16 model: scoring.scoring_dtype)."""

    weight: Tensor  # W0: (rows, in)
    A: Tensor  # (r, in)
    B: Tensor  # (rows, r)
    grad_A: Tensor | None  # dL/dA: (r, in)
    grad_B: Tensor | None  # dL/dB: (rows, r)
    scaling: float  # s = alpha / r
    weight_grad: Tensor | None = None  # dL/dW0: (rows, in), only when the base weight requires grad
    sketch_basis: Tensor | None = None  # R: (k, in), only under the sketch criterion
    sketch_product: Tensor | None = None  # dL/dW0·Rᵀ: (rows, k)
    output_grad: Tensor | None = None  # under the streamed criterion: one micro-batch's dL/dy, (tokens, rows)
    inputs: Tensor | None = None  # and its inputs x, (tokens, in), both in streamed.KEPT_DTYPE
    scratch: "Scratch | None" = None  # the score update's reused buffers (None: fresh tensors)

    def buffer(self, slot: int, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised (rows, in) tensor like W0's block (in `dtype` if given) for a criterion's
        transient number `slot`."""
        dtype = dtype or self.weight.dtype
        if self.scratch is None:
            return torch.empty_like(self.weight, dtype=dtype)
        return self.scratch.get(slot, self.weight.shape, dtype, self.weight.device)


class Scratch:
    """Buffers that every block of a score update reuses. A fresh block-sized tensor per block costs a
    pass of page faults where glibc maps large blocks afresh (tools/preflight.return_freed_memory): 4.8x the
    scoring time of a 1B model (bench/score_blocks.py)."""

    def __init__(self):
        self.buffers: dict[tuple, Tensor] = {}

    def get(self, slot, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        key, n = (slot, dtype, device), shape.numel()
        if key not in self.buffers or self.buffers[key].numel() < n:
            self.buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return self.buffers[key][:n].view(shape)


class Criterion:
    """Element scores of a block of one projection, |score| (rows, in), and the Pruner's hooks."""

    needs_lora_grads = False  # reads dL/dA and dL/dB
    needs_weight_grad = False  # reads the true dL/dW0 (the Pruner lets the scored base weights get a .grad)

    def __call__(self, f: LoraFactors) -> Tensor:
        raise NotImplementedError

    def attach(self, modules: dict[nn.Module, int]) -> None:
        """Before training: start collecting statistics on these projections (each with the dimension
        its element scores are summed over: 0 per input column, 1 per output row)."""

    def collected_scores(self, module: nn.Module, dim: int, square: bool) -> Tensor | None:
        """The step's summed scores of `module`, for a criterion that sums them during backward
        (streamed.py); None: scoring.projection_scores scores the module's blocks now."""
        return None

    def synchronize(self) -> None:
        """Before scoring a step: several processes average what they collected."""

    def next_step(self) -> None:
        """After scoring a step (or skipping it): drop what the step collected."""

    def detach(self) -> None:
        """After training: remove whatever `attach` added to the model."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class Formula(Criterion):
    """A stateless criterion: one function of the factors."""

    def __init__(self, score, needs_lora_grads: bool = False, needs_weight_grad: bool = False):
        functools.update_wrapper(self, score)  # its name and docstring
        self.score, self.needs_lora_grads, self.needs_weight_grad = score, needs_lora_grads, needs_weight_grad

    def __call__(self, f: LoraFactors) -> Tensor:
        return self.score(f)


def formula(needs_lora_grads: bool = False, needs_weight_grad: bool = False):
    """Make a function of the factors a Criterion, marking which gradients it reads."""
    return lambda score: Formula(score, needs_lora_grads, needs_weight_grad)


class Seeded(Criterion):
    """A criterion that draws random numbers: one CPU generator per run, seeded by --seed, drawn in
    the fixed order the Pruner scores, so the same seed gives the same masks on any device; a
    checkpoint saves and restores it."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Tensor]:
        return {"criterion_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["criterion_rng"])


def lora_gradient_estimate(f: LoraFactors) -> Tensor:
    """G_B·A + B·G_A − G_B·G_A: the change one SGD step (lr 1) on A and B makes to B·A,
    B·A − (B − G_B)(A − G_A). It stands in for dL/dW0, which is never formed."""
    # = [G_B, B − G_B]·[A; G_A]: one rank-2r product instead of three (rows, in) ones
    return torch.mm(torch.cat([f.grad_B, f.B - f.grad_B], dim=1), torch.cat([f.A, f.grad_A], dim=0), out=f.buffer(1))


def merged_weight(f: LoraFactors) -> Tensor:
    """W0 + s·B·A of the block, in the criterion's buffer 0 (W0 itself is never written)."""
    return torch.addmm(f.weight, f.B, f.A, alpha=f.scaling, out=f.buffer(0))


@formula(needs_lora_grads=True)
def lora_guided(f: LoraFactors) -> Tensor:
    """docs/method.md#lora-guided-criterion: |(G_B·A + B·G_A − G_B·G_A) ⊙ (W0 + s·B·A)|."""
    # two (rows, in) tensors in all (the estimate and the merged weight), the product in place:
    # 3.5x faster than the term-by-term form on SmolLM2's shapes (bench/overhead.py)
    return lora_gradient_estimate(f).mul_(merged_weight(f)).abs_()


@formula(needs_weight_grad=True)
def weight_gradient(f: LoraFactors) -> Tensor:
    """Vanilla first-order |dL/dW0 ⊙ W0| with the true gradient, as LLM-Pruner (the memory baseline).

    Like LLM-Pruner it multiplies by the frozen W0, not the merged W0 + s·B·A.
    """
    if f.weight_grad is None:
        raise RuntimeError("base weight has no gradient: the 'gradient' criterion needs the Pruner to enable it")
    return torch.mul(f.weight_grad, f.weight, out=f.buffer(0)).abs_()


@formula()
def magnitude(f: LoraFactors) -> Tensor:
    """|W0 + s·B·A|: needs no gradient at all."""
    return merged_weight(f).abs_()


class RandomScores(Seeded):
    """Uniform random element scores, a floor every criterion must beat."""

    def __call__(self, f: LoraFactors) -> Tensor:
        return torch.rand(f.weight.shape, generator=self.generator).to(f.weight.device)  # float32 scores
