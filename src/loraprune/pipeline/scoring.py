"""Scoring a projection: read its LoRA factors from peft, a block of rows at a time, apply a
criterion (importance.py) and sum the element scores per row or column, so the out x in
transient never exists for more than one block of one module at a time. And the criteria by name.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import LoraPruneError
from ..runtime import fsdp
from ..runtime.quant import dense_weight
from .importance import Criterion, LoraFactors, RandomScores, Scratch, lora_guided, magnitude, weight_gradient
from .sketch import SKETCH_ATTRIBUTE, SketchScores
from .streamed import STREAM_ATTRIBUTE, StreamedGradient

# The criteria by name (--criterion), the one table the Pruner, the command line and the memory
# estimate read (its columns in this order): name -> a fresh criterion for one run, from
# (seed, rank, square); stateful ones are built anew.
CRITERIA: dict[str, Callable[[int, int, bool], Criterion]] = {
    "lora": lambda seed, rank, square: lora_guided,
    "sketch": lambda seed, rank, square: SketchScores(seed, rank),  # the true gradient through `rank` random directions
    "streamed": lambda seed, rank, square: StreamedGradient(projection_scores, square),  # sums formed in backward
    "gradient": lambda seed, rank, square: weight_gradient,
    "magnitude": lambda seed, rank, square: magnitude,
    "random": lambda seed, rank, square: RandomScores(seed),
}


def check_criterion(name: str | None) -> None:
    """Refuse a --criterion that is not in CRITERIA (None: undecided, the run picks its default)."""
    if name is not None and name not in CRITERIA:
        raise LoraPruneError(f"--criterion must be one of {', '.join(CRITERIA)} (got {name!r})")


def make_criterion(name: str, seed: int = 0, rank: int = 8, square: bool = False) -> Criterion:
    """The criterion called `name`, a stateful one seeded by `seed` (the sketch: of `rank` directions;
    the streamed one sums squared element scores if `square`, as it sums them in backward)."""
    check_criterion(name)
    return CRITERIA[name](seed, rank, square)


def read_factors(
    module: nn.Module,
    rows: slice,
    adapter: str = "default",
    lora_grads: bool = True,
    weight: Tensor | None = None,
    whole_A: tuple[Tensor, Tensor | None] | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
) -> LoraFactors:
    """A peft LoRA layer's factors for output rows `rows` of this rank's rows (all of them
    unless FSDP shards the module), in `dtype`; gradients are None where absent (an error if
    `lora_grads` asks for the LoRA ones). `weight`: W0 already dequantized. `whole_A`: (A, dL/dA)
    already gathered by `gather_A` (under FSDP a collective, so issued once per module, not per block)."""
    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    W = module.base_layer.weight if weight is None else weight
    if lora_grads and (A.grad is None or B.grad is None):
        raise RuntimeError("LoRA factors have no gradient: call backward() before scoring")

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(dtype)

    def row_block(t: Tensor | None, whole: bool = False) -> Tensor | None:  # B's rows are sharded like W0's
        if t is None:
            return None
        return (fsdp.rows_held(t, W) if whole else fsdp.local(t))[rows]  # whole: a tensor of all rows

    sketch, stream = getattr(module, SKETCH_ATTRIBUTE, None), getattr(module, STREAM_ATTRIBUTE, None)
    streaming = stream is not None and stream.output_grad is not None  # inside its backward hook
    A_all, grad_A_all = gather_A(module, adapter) if whole_A is None else whole_A
    return LoraFactors(
        weight=cast(row_block(W)),
        A=cast(A_all),
        B=cast(row_block(B)),
        grad_A=cast(grad_A_all),
        grad_B=cast(row_block(B.grad)),
        scaling=module.scaling[adapter],
        weight_grad=cast(row_block(W.grad)),
        sketch_basis=None if sketch is None else cast(sketch.basis),
        sketch_product=None if sketch is None else cast(row_block(sketch.product, whole=True)),
        output_grad=stream.output_grad[:, rows] if streaming else None,  # in the dtype the inputs are kept in
        inputs=stream.inputs if streaming else None,
        scratch=scratch,
    )


def gather_A(module: nn.Module, adapter: str = "default") -> tuple[Tensor, Tensor | None]:
    """A and dL/dA of a LoRA projection, whole: under FSDP gathered from the ranks (collectives that
    every rank must issue alike, whatever number of row blocks it holds)."""
    A = module.lora_A[adapter].weight
    return fsdp.whole(A), fsdp.whole(A.grad)


def scoring_dtype(weight: Tensor) -> torch.dtype:
    """bfloat16 base weights are scored in bfloat16 (2-3x faster on CPUs with bf16 matmuls, half the
    transient; element products keep float32's range), summed in float32; anything else in float32
    (float16 would underflow small gradient products)."""
    return torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32


# one (rows, in) transient of a block in the scoring dtype: the block's few transients stay in the
# CPU's caches between the passes over them (1024-row blocks: 2x slower at 1B shapes, bench/score_blocks.py)
SCORE_BLOCK_BYTES = 2 * 2**20


def score_block_rows(in_features: int, dtype: torch.dtype) -> int:
    """Rows of one scoring block of a projection with `in_features` inputs, scored in `dtype`."""
    return max(1, SCORE_BLOCK_BYTES // (in_features * dtype.itemsize))


def projection_scores(
    module: nn.Module,
    criterion: Criterion,
    dim: int,
    block_rows: int | None = None,
    square: bool = False,
    scratch: Scratch | None = None,
) -> Tensor:
    """Sum a projection's element scores (or their squares) over its rows (dim=0: one score per
    input column) or over its columns (dim=1: one score per output row), in float32, `block_rows`
    rows at a time (default: score_block_rows), the transients in `scratch`'s buffers (a new one
    for this projection if None). Under FSDP each rank scores its own rows and the ranks' sums are
    added up (fsdp.py). A criterion that summed them in backward (streamed.py) hands its sums over."""
    collected = criterion.collected_scores(module, dim, square)
    if collected is not None:
        return collected
    weight = dense_weight(module.base_layer)  # W0 itself, or an 8-/4-bit one dequantized: one module at a time
    dtype = scoring_dtype(weight)
    block_rows = block_rows or score_block_rows(weight.shape[1], dtype)
    scratch = Scratch() if scratch is None else scratch
    local_rows = fsdp.local(weight).shape[0]
    whole_A = gather_A(module)  # once per module: ranks may hold different numbers of blocks
    parts = []
    total = None
    for start in range(0, local_rows, block_rows):
        rows = slice(start, start + block_rows)
        factors = read_factors(
            module,
            rows,
            lora_grads=criterion.needs_lora_grads,
            weight=weight,
            whole_A=whole_A,
            dtype=dtype,
            scratch=scratch,
        )
        block = criterion(factors)
        if square:
            block.square_()
        if block.dtype != torch.float32:  # summed in float32, in a reused buffer (sum(dtype=) would allocate one)
            block = scratch.get("float32", block.shape, torch.float32, block.device).copy_(block)
        if dim == 1:
            parts.append(block.sum(dim=1))
        else:
            part = block.sum(dim=0)
            total = part if total is None else total + part
    if not fsdp.is_sharded(weight):
        return torch.cat(parts) if dim == 1 else total
    if dim == 1:  # this rank's rows in place, zeros elsewhere
        scores = torch.zeros(weight.shape[0], device=fsdp.local(weight).device)
        offset = fsdp.row_offset(weight)
        scores[offset : offset + local_rows] = torch.cat(parts) if parts else 0
    else:
        scores = total if total is not None else torch.zeros(weight.shape[1], device=fsdp.local(weight).device)
    return fsdp.sum_over_shards(scores, weight)
