"""The `streamed` criterion: the true gradient's score, summed during backward, dL/dW0 never whole.

The `gradient` criterion (LLM-Pruner's) lets autograd accumulate dL/dW0 for every scored
projection, a second copy of the scored weights, and scores it after backward. But a group's score
is a sum of |dL/dW0 ⊙ W| over its rows or columns, and for one micro-batch dL/dW0 = (dL/dy)ᵀ·x.
So each projection keeps its input x for backward (in bfloat16: half of float32's bytes; one copy
for the projections that read the same input), and when backward reaches its output, the hook
forms (dL/dy)ᵀ·x a block of rows at a time (scoring.projection_scores), multiplies it by
W = W0 + s·B·A, and adds the row or column sums to the step's. Memory: LoRA's plus the kept inputs
and one block; time: one more out × in × tokens product per projection, as autograd's dL/dW0, but
in bfloat16 (float32 accumulation) whatever the model's dtype.

It differs from `gradient` in two ways: W is the merged weight, as the `lora` and `sketch` criteria
use; and with several micro-batches per step (--grad-accum) or processes, the per-micro-batch
sums of |...| are added (and averaged over processes) where `gradient` takes |...| of the summed
gradient.
"""

import weakref

import torch
from torch import Tensor, nn

from ..runtime import distributed
from .importance import Criterion, LoraFactors, Scratch, formula, merged_weight

STREAM_ATTRIBUTE = "loraprune_streamed_score"  # where scoring.read_factors finds a micro-batch's dL/dy and x
KEPT_DTYPE = torch.bfloat16  # the inputs kept for backward


@formula()
def streamed_element_scores(f: LoraFactors) -> Tensor:
    """|(dL/dy)ᵀ·x ⊙ (W0 + s·B·A)| for a block of rows: one micro-batch's dL/dW0, a block at a time."""
    # the product in the kept dtype (bfloat16: half the time of float32 on CPUs with bf16 matmuls)
    gradient = torch.mm(f.output_grad.T, f.inputs, out=f.buffer(1, f.inputs.dtype))
    return merged_weight(f).mul_(gradient).abs_()


class _ScoreInBackward(torch.autograd.Function):
    """The identity on a projection's output; its backward scores the projection from dL/dy and the
    input it saved (saved as autograd saves tensors: gradient checkpointing drops and recomputes it)."""

    @staticmethod
    def forward(ctx, output: Tensor, kept_input: Tensor, stream: "StreamedScore") -> Tensor:
        ctx.save_for_backward(kept_input)
        ctx.stream = stream
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (kept_input,) = ctx.saved_tensors
        ctx.stream.add(grad, kept_input)
        return grad, None, None


class StreamedScore:
    """One projection's group score sums over one optimizer step, added up in backward."""

    def __init__(self, module: nn.Module, dim: int, criterion: "StreamedGradient"):
        self.module, self.dim, self.criterion = module, dim, criterion
        self.sums: Tensor | None = None
        self.output_grad = self.inputs = None  # one micro-batch's, while its backward scores them
        self.handle = module.register_forward_hook(self._forward)
        setattr(module, STREAM_ATTRIBUTE, self)

    def _forward(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not (torch.is_grad_enabled() and output.requires_grad):  # evaluation, the teacher, no_grad passes
            return None
        # the input after the mask hooks: a masked column has no gradient either
        return _ScoreInBackward.apply(output, self.criterion.keep(args[0]), self)

    @torch.no_grad()
    def add(self, output_grad: Tensor, kept_input: Tensor) -> None:
        self.output_grad, self.inputs = output_grad.flatten(0, -2).to(KEPT_DTYPE), kept_input.flatten(0, -2)
        try:
            c = self.criterion
            sums = c.projection_scores(
                self.module, streamed_element_scores, self.dim, square=c.square, scratch=c.scratch
            )
        finally:
            self.output_grad = self.inputs = None
        self.sums = sums if self.sums is None else self.sums + sums

    def remove(self) -> None:
        self.handle.remove()
        delattr(self.module, STREAM_ATTRIBUTE)


class StreamedGradient(Criterion):
    """|dL/dW0 ⊙ (W0 + s·B·A)| summed per group in backward (see the module docstring).
    `projection_scores`: scoring.projection_scores, which scores the blocks of one projection."""

    def __init__(self, projection_scores, square: bool = False):
        self.projection_scores, self.square = projection_scores, square
        self.scratch = Scratch()  # one set of block buffers for every hook
        self.streams: dict[nn.Module, StreamedScore] = {}
        self.last_kept: tuple[weakref.ref, Tensor] | None = None

    def keep(self, x: Tensor) -> Tensor:
        """x for backward, in KEPT_DTYPE; the same copy for consecutive projections reading the same x (q, k, v)."""
        if self.last_kept is not None and self.last_kept[0]() is x:
            return self.last_kept[1]
        kept = x.detach().to(KEPT_DTYPE)
        self.last_kept = (weakref.ref(x), kept)
        return kept

    def attach(self, modules: dict[nn.Module, int]) -> None:
        self.streams = {m: StreamedScore(m, dim, self) for m, dim in modules.items()}

    def collected_scores(self, module: nn.Module, dim: int, square: bool) -> Tensor:
        stream = self.streams[module]
        if stream.sums is None:
            raise RuntimeError("no streamed scores: run forward and backward with the criterion attached first")
        if (dim, square) != (stream.dim, self.square):
            raise ValueError(f"streamed scores were summed over dim {stream.dim} (square={self.square})")
        return stream.sums

    def synchronize(self) -> None:
        """Several processes: average the sums over the ranks, as DDP averages LoRA gradients."""
        for stream in self.streams.values():
            if stream.sums is not None:
                stream.sums = distributed.average(stream.sums)

    def next_step(self) -> None:
        self.last_kept = None
        for stream in self.streams.values():
            stream.sums = None

    def detach(self) -> None:
        for stream in self.streams.values():
            stream.remove()
        self.streams, self.last_kept = {}, None
