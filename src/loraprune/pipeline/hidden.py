"""Hidden-size pruning (`--hidden-ratio`): channels of the residual stream scored while LoRA trains,
masked on the sparsity schedule, and cut out of every weight that reads or writes them at the end
(docs/method.md#hidden-size).

A hidden channel is written by the embedding and by every layer's o and down projections, and read
by the norms and, through them, by every q/k/v/gate/up projection and the LM head. Masking it means
zeroing it in each write (forward hooks on the embedding, o and down; where a norm follows o or down
before the stream, as in Gemma, the zero goes through it), so the stream never holds it.

The cut model must compute what the masked one does. Its RMS norms average over `kept` channels
where the masked model's averaged over `hidden`, zeros included: mean(x²) grows by hidden / kept.
Where the embedding is multiplied by sqrt(hidden_size) (Gemma), the cut model's factor is
sqrt(kept), so its whole stream is s = sqrt(kept / hidden) times the masked one's; every write is
scaled by s too (o and down), which makes mean(x²) of the stream and of the sublayer outputs exactly
the masked model's and leaves every epsilon as it was. Elsewhere s = 1, and the epsilon
(config.rms_norm_eps, one value for every norm) grows by hidden / kept. In both cases the gain of a
norm over the stream grows by sqrt(hidden / kept), that of a norm over a sublayer's output by
s × sqrt(hidden / kept). Exact, but for per-head q/k norms (Qwen3) whose epsilon grows with the
config's where s = 1.

Score of channel j, a moving average (--ema) over the steps: |Σ ∂L/∂write_j · write_j| over the
tokens and every write (the embedding's output and each o and down output), the first-order change
of the loss when the channel is zeroed in all of them: from the gradients backward computes anyway.
"""

import math

import torch
from torch import Tensor, nn

from ..archs import get_path
from ..prune_config import round_half_up
from .groups import LayerGroups
from .modeling_pruned import LAYOUT_KEY
from .scored_units import ScoredUnits
from .shrink import keep_projection, scale_output, set_layout, stock_config_error

READERS = ("q", "k", "v", "qkv", "gate", "up", "gate_up")  # projections whose input columns are hidden channels
WRITERS = ("o", "down")  # projections whose output rows are


class HiddenRemoval(ScoredUnits):
    """Which hidden channels are alive, their score averages, and the hooks that score and mask them."""

    def __init__(self, model: nn.Module, arch, layers: nn.ModuleList, ratio: float, ema: float):
        super().__init__("hidden", model.config.hidden_size, ratio, ema)
        self.mask = torch.ones(len(self.alive), device=next(model.parameters()).device)
        self.step_sum = self.step_sum.to(self.mask.device)  # summed where backward runs: no copy per write
        if not ratio:
            return
        writers = [model.get_input_embeddings()]
        writers += [arch.projections(layer)[role] for layer in layers for role in WRITERS]
        self.hooks = [module.register_forward_hook(self._hook(module is writers[0])) for module in writers]

    def _hook(self, embedding: bool):
        def hook(module, args, output: Tensor):
            if self.lifted:
                return None
            if embedding and self.scoring and torch.is_grad_enabled():
                output = output.detach().requires_grad_()  # frozen: its gradient is wanted for the score
            masked = output * self.mask.to(output.dtype)
            if self.scoring and masked.requires_grad:
                written = output.detach()

                def in_backward(grad: Tensor) -> None:  # returns nothing: the gradient flows on unchanged
                    self.step_sum.add_((grad * written).flatten(0, -2).sum(0).double())

                masked.register_hook(in_backward)
            return masked

        return hook

    def step_scores(self) -> Tensor | None:
        """This step's score of every channel, and the step's sums reset (None when not scoring)."""
        if not self.scoring:
            return None
        step = self.step_sum.abs().float().cpu()
        self.next_step()
        return step

    def prune_to(self, fraction: float) -> None:
        """Mask the lowest-scored live channels until `fraction` of the hidden size is gone."""
        channels = torch.arange(len(self.alive))
        self.remove_lowest(channels, round_half_up(fraction * len(self.alive)) - int((~self.alive).sum()))
        self.apply_alive()

    def apply_alive(self) -> None:
        self.mask.copy_(self.alive)


def hidden_config_error(config, arch, kept: int) -> str | None:
    """Why the family's config class rejects `kept` hidden channels (heads, widths and head size
    kept), or None."""
    dense = LayerGroups.from_config(config, arch)
    return stock_config_error(config, arch, dense.heads, dense.kv_heads, dense.channels, kept)


def accepted_ratios(config, arch, kept: int) -> list[float]:
    """The --hidden-ratio values nearest below and above the one leaving `kept` channels whose hidden
    size the config class accepts (for the refusal's hint)."""
    hidden = config.hidden_size
    found = []
    for candidates in (range(kept + 1, hidden), range(kept - 1, 0, -1)):
        ok = next((k for k in candidates if hidden_config_error(config, arch, k) is None), None)
        if ok is not None:
            found.append(round((hidden - ok) / hidden, 4))
    return sorted(found)


def hidden_norms(model: nn.Module, hidden: int) -> list[nn.Module]:
    """The norms over the residual stream: modules named *Norm whose weight has `hidden` entries."""
    return [
        m
        for m in model.modules()
        if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.shape == (hidden,)
    ]


@torch.no_grad()
def shrink_hidden(model: nn.Module, arch, alive: Tensor) -> None:
    """Cut the dead hidden channels out of `model` (plain or peft-wrapped, before merging) in place:
    the embedding's columns (and the LM head's, tied or not), the readers' input columns and the
    writers' output rows in every layer, and the norms' weights, scaled as the module docstring
    says; then the config's hidden size (and its head size, made explicit)."""
    config = model.config
    hidden, kept = config.hidden_size, alive.nonzero().flatten()
    if len(kept) == hidden:
        return
    head_dim = LayerGroups.from_config(config, arch).head_dim
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    layers = arch.layers_of(model)
    output_norms = {id(get_path(layer, path)) for layer in layers for path in arch.output_norms}
    norms = hidden_norms(model, hidden)
    embedding.weight = nn.Parameter(embedding.weight[:, kept.to(embedding.weight.device)], requires_grad=False)
    embedding.embedding_dim = len(kept)
    if tied:
        head.weight = embedding.weight
        head.in_features = len(kept)
    elif head is not None:
        keep_projection(head, kept, 1)
    averaging = math.sqrt(hidden / len(kept))  # sqrt of how much mean(x²) over the kept channels grows
    stream = 1 / averaging if arch.scaled_embedding else 1.0  # the cut stream over the masked one
    if arch.scaled_embedding:  # what the family computes from config.hidden_size when it loads
        embedding.scalar_embed_scale = math.sqrt(len(kept))
        embedding.embed_scale.fill_(embedding.scalar_embed_scale)
    for layer in layers:
        for role, module in arch.projections(layer).items():
            if role in READERS:
                keep_projection(module, kept, 1)
            elif role in WRITERS:
                keep_projection(module, kept, 0)
                if stream != 1:
                    scale_output(module, stream)
    for norm in norms:
        gain = averaging * (stream if id(norm) in output_norms else 1.0)
        weight = (norm.weight[kept.to(norm.weight.device)] + arch.norm_offset) * gain - arch.norm_offset
        norm.weight = nn.Parameter(weight, requires_grad=False)
    if not arch.scaled_embedding:  # mean(x²) of the cut stream is hidden / kept times the masked one's
        epsilon = hidden / len(kept)
        for module in model.modules():  # every norm reads config.rms_norm_eps when the model loads
            if "norm" in type(module).__name__.lower():
                for name in ("variance_epsilon", "eps"):
                    if hasattr(module, name):
                        setattr(module, name, getattr(module, name) * epsilon)
        config.rms_norm_eps *= epsilon
    for module in model.modules():  # sizes some modules keep for their forward (LlamaMLP.hidden_size)
        if getattr(module, "hidden_size", None) == hidden and not isinstance(module.hidden_size, bool):
            module.hidden_size = len(kept)
    config.hidden_size = len(kept)
    if arch.head_dim_key:
        setattr(config, arch.head_dim_key, head_dim)
    layout = getattr(config, LAYOUT_KEY, None)
    if layout is not None:  # layers of one shape the config class refused at the full hidden size
        set_layout(config, arch, layout["layers"])
