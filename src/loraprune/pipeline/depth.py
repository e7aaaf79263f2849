"""Depth pruning (`--layer-ratio`): whole decoder layers scored while LoRA trains, removed on the
sparsity schedule, and cut out of the model at the end (docs/method.md#depth).

A removed layer is bypassed by a forward hook that hands its input on as its output: exactly what
the model computes once the layer is gone, whatever the layer holds (biases, norms, its heads and
channels). The dense teacher (--distill, which keeps --shrink end) sees every layer (`lifted_for_teacher`).
Under --shrink progressive nothing needs the removed layer again, so it stops computing too: its
forward returns its input.

Two scores of a layer, each a moving average (--ema) over the steps; the lowest-scored live layers
go first:
- similarity: 1 − cos(input, output) of its hidden states, averaged over tokens (ShortGPT's "block
  influence"): a layer that barely turns the residual stream changes little when it goes;
- taylor: |⟨∂L/∂output, output − input⟩| summed over tokens: the first-order estimate of the loss
  change when the layer's contribution to the residual stream is removed.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..prune_config import round_half_up
from .scored_units import ScoredUnits


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _passing_on(hidden_states, *args, **kwargs):
    """A removed layer's forward under --shrink progressive: its input, nothing computed."""
    return hidden_states


class LayerRemoval(ScoredUnits):
    """Which prunable layers are alive, their score averages, and the hooks that score them and
    bypass the dead ones. Indices are the dense model's."""

    def __init__(self, layers: nn.ModuleList, prunable: list[int], ratio: float, score: str, ema: float,
                 progressive: bool = False):  # fmt: skip
        super().__init__("layer", len(layers), ratio, ema)
        self.layers, self.prunable, self.kind, self.progressive = layers, prunable, score, progressive
        self.step_count = torch.zeros(len(layers), dtype=torch.int64)
        hooked = prunable if ratio else []
        self.hooks = [layers[i].register_forward_hook(self._hook(i), with_kwargs=True) for i in hooked]

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            if self.lifted:
                return None
            given = args[0] if args else kwargs["hidden_states"]
            if not self.alive[i]:
                return (given, *output[1:]) if isinstance(output, tuple) else given
            if self.scoring and torch.is_grad_enabled():
                self._collect(i, given.detach(), _hidden(output))
            return None

        return hook

    def _collect(self, i: int, given: Tensor, out: Tensor) -> None:
        if self.kind == "similarity":
            similarity = F.cosine_similarity(given.float(), out.detach().float(), dim=-1)
            self.step_sum[i] += float((1 - similarity).sum())
            self.step_count[i] += similarity.numel()
        elif out.requires_grad:  # taylor: in backward, with the gradient of the layer's output
            change = out.detach() - given

            def in_backward(grad: Tensor) -> None:
                self.step_sum[i] += float((grad.float() * change.float()).sum())
                self.step_count[i] += 1

            out.register_hook(in_backward)

    def step_scores(self) -> Tensor | None:
        """This step's score of every layer (NaN where not measured), and the step's sums reset."""
        if not self.scoring:
            return None
        if self.kind == "similarity":
            step = self.step_sum / self.step_count.clamp(min=1)
        else:  # the whole batch's estimate: |summed over micro-batches|
            step = self.step_sum.abs()
        step = torch.where(self.step_count > 0, step, torch.nan).float()
        self.next_step()
        return step

    def next_step(self) -> None:
        super().next_step()
        self.step_count.zero_()

    def prune_to(self, fraction: float) -> None:
        """Remove the lowest-scored live prunable layers until `fraction` of the prunable ones are dead."""
        rows = torch.tensor(self.prunable, dtype=torch.long)
        self.remove_lowest(rows, round_half_up(fraction * len(rows)) - int((~self.alive[rows]).sum()))
        self.apply_alive()

    def apply_alive(self) -> None:
        for i in self.prunable:
            if not self.alive[i]:
                # no gradient reaches a removed layer: frozen, so DDP (rebuilt by train) waits for none
                self.layers[i].requires_grad_(False)
                if self.progressive:  # nothing needs it again: it stops computing
                    self.layers[i].forward = _passing_on

    def kept(self) -> list[int]:
        return self.alive.nonzero().flatten().tolist()

    def close(self) -> None:
        """Remove the hooks and give bypassed layers their own forward back (drop_layers cuts them out)."""
        for i in self.prunable:
            self.layers[i].__dict__.pop("forward", None)
        super().close()


def drop_layers(model: nn.Module, arch, kept: list[int]) -> None:
    """Cut every layer not in `kept` out of `model` in place: the layer list, each kept attention's
    KV-cache index, and the config's layer count and per-layer lists (layer_types)."""
    layers = arch.layers_of(model)
    if len(kept) == len(layers):
        return
    remaining = nn.ModuleList([layers[i] for i in kept])
    parent, name = next((m, n) for m in model.modules() for n, child in m.named_children() if child is layers)
    setattr(parent, name, remaining)
    for position, layer in enumerate(remaining):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    config = model.config
    for key in ("layer_types",):
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)
