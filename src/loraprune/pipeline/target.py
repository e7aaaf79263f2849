"""--target-params: the group ratio that removes a given fraction of all parameters, from the
model config alone (the model is built on the meta device: shapes, no weights).

Under grouped-query attention with free per-query-head pruning, whether a k/v head goes depends
on the scores (it goes only when every query head reading it does): the count assumes every
k/v head stays, so the prediction is a lower bound and the run may remove slightly more.
"""

from dataclasses import dataclass, replace
from itertools import pairwise

from ..archs import arch_for, meta_model
from ..errors import LoraPruneError
from ..prune_config import PruneConfig
from .counts import count_parameters
from .groups import LayerGroups
from .hidden import hidden_config_error, hidden_norms


@dataclass(frozen=True)
class ParameterCounts:
    """The model's total parameters and what removing one group of one layer takes away."""

    total: int
    head: int  # one query head: its q rows (with bias) and the o columns that read it
    kv_head: int  # one k/v head: its k and v rows (with biases)
    channel: int  # one MLP channel: its gate/up rows (with biases) and down column
    layer: int  # one whole decoder layer, norms included (--layer-ratio)
    prunable_layers: int
    all_layers: int
    removed_layers: int  # of the prunable ones, whole (--layer-ratio)
    groups: LayerGroups
    # --hidden-ratio: what one hidden channel costs per head, k/v head and MLP channel a layer keeps, and
    # per layer whatever the widths (norms, o/down biases); the rest of the model (embeddings, final norm)
    # is proportional to the hidden size
    hidden: int = 0
    removed_hidden: int = 0
    per_head_column: int = 0
    per_kv_head_column: int = 0
    per_channel_column: int = 0
    per_layer_column: int = 0

    @classmethod
    def of(cls, model_config, config: PruneConfig) -> "ParameterCounts":
        arch = arch_for(model_config)
        model = meta_model(model_config, config.task)
        layers = arch.layers_of(model)
        p = arch.projections(layers[0])

        groups = LayerGroups.from_config(model_config, arch)
        parts = groups.row_parts(p)

        def row(role: str) -> int:  # a row-pruned role loses its weights' row and its bias entry
            module = p[parts[role][0]]  # its own projection or the fused one holding its rows
            return module.in_features + (module.bias is not None)

        d = groups.head_dim
        prunable = len(layers) - len(config.skipped_layers(len(layers)))
        hidden = model_config.hidden_size
        biases = sum(p[role].bias is not None for role in ("o", "down"))
        mlp_inputs = sum(role in parts for role in ("gate", "up"))
        return cls(
            total=count_parameters(model),
            head=d * (row("q") + p["o"].out_features),
            kv_head=d * (row("k") + row("v")),
            channel=sum(row(role) for role in ("gate", "up") if role in parts) + p["down"].out_features,
            layer=count_parameters(layers[0]),
            prunable_layers=prunable,
            all_layers=len(layers),
            removed_layers=config.removed_layers(len(layers)),
            groups=groups,
            hidden=hidden,
            removed_hidden=config.removed_hidden(hidden),
            per_head_column=2 * d,  # its q column and o row
            per_kv_head_column=2 * d,  # its k and v columns
            per_channel_column=mlp_inputs + 1,  # its gate/up columns and down row
            per_layer_column=len(hidden_norms(layers[0], hidden)) + biases,
        )

    def removed(self, ratio: float, uniform: bool) -> int:
        """Parameters removed at `ratio` in the prunable layers that stay, k/v heads assumed kept where the
        scores decide them, and by the whole layers removed."""
        g = self.groups
        heads, kv_heads, channels = g.kept_at(ratio, uniform)
        if kv_heads is None:  # free pruning: plain attention loses k/v with each head; GQA keeps them
            kv_heads = heads if g.heads_per_kv == 1 else g.kv_heads
        per_layer = (g.heads - heads) * self.head + (g.kv_heads - kv_heads) * self.kv_head
        width = (self.prunable_layers - self.removed_layers) * (per_layer + (g.channels - channels) * self.channel)
        return width + self.removed_layers * self.layer + self._hidden_removed(heads, kv_heads, channels)

    def _hidden_removed(self, heads: int, kv_heads: int, channels: int) -> int:
        """What --hidden-ratio removes besides: its channels' share of the embeddings and final norm, and
        of every layer that stays, at the widths each keeps (the skipped ones dense)."""
        if not self.removed_hidden:
            return 0
        g = self.groups

        def column(h: int, kv: int, c: int) -> int:  # one hidden channel's parameters in a layer of these widths
            return (
                h * self.per_head_column
                + kv * self.per_kv_head_column
                + c * self.per_channel_column
                + (self.per_layer_column)
            )

        skipped = self.all_layers - self.prunable_layers
        in_layers = skipped * column(g.heads, g.kv_heads, g.channels)
        in_layers += (self.prunable_layers - self.removed_layers) * column(heads, kv_heads, channels)
        outside = (self.total - self.all_layers * self.layer) / self.hidden  # per channel: embeddings, final norm
        return round(self.removed_hidden * (in_layers + outside))


def _between(low: float, high: float) -> float:
    """A short decimal strictly inside (low, high), for a readable --ratio in reports."""
    for digits in range(2, 12):
        value = round((low + high) / 2, digits)
        if low < value < high:
            return value
    return (low + high) / 2


def candidate_ratios(groups: LayerGroups, uniform: bool) -> list[float]:
    """One ratio per distinct (heads, channels) pruned: between consecutive rounding thresholds."""
    sizes = {groups.channels, *(len(pool) for pool in groups.head_pools(uniform))}
    # round_half_up(ratio * n) steps up at ratio = (k + 0.5) / n
    edges = sorted({0.0, 1.0, *((k + 0.5) / n for n in sizes for k in range(n))})
    return [_between(low, high) for low, high in pairwise(edges)]


def ratio_for_target_params(counts: ParameterCounts, config: PruneConfig) -> float:
    """The group ratio whose removed fraction of all parameters is closest to config.target_params."""
    reachable = {}
    for ratio in candidate_ratios(counts.groups, config.uniform):
        try:
            reachable[ratio] = counts.removed(ratio, config.uniform) / counts.total
        except LoraPruneError:  # this ratio would empty a layer
            continue
    best = min(reachable, key=lambda r: (abs(reachable[r] - config.target_params), r))
    most = max(reachable.values())
    step = max(counts.head, counts.channel) * counts.prunable_layers / counts.total
    if config.target_params > most + step:
        further = "" if config.hidden_ratio else "; --hidden-ratio also cuts the embedding"
        raise LoraPruneError(
            f"--target-params {config.target_params} is out of reach: at most {most:.3f} of the parameters can go "
            "(embeddings, norms, the LM head and skipped layers stay, and every layer keeps a head and a channel)"
            + further
        )
    return best


# --target-shape mix: the shares of the target that whole layers, then layers and the hidden size
# together, may take; heads and channels take the rest. Measured at a quarter of SmolLM2 (docs/benchmarks/
# recipes.md#shape), a cut split about this way kept held-out text better than width, depth or hidden alone.
MIX_DEPTH_SHARE, MIX_DEPTH_HIDDEN_SHARE = 0.5, 0.9
# and never more than a third of the prunable layers: where the embedding dominates (Gemma 3 270M: 63%),
# half the target would be most of the layers; ShortGPT removed about a quarter before quality fell off
MIX_MOST_LAYERS = 1 / 3
# a hidden size that is not a multiple of 64 slowed llama.cpp's f16 prompt processing to a third
# (docs/benchmarks/serving.md#shape): mix keeps it one where the model's is
MIX_HIDDEN_MULTIPLE = 64


def mix_shape(model_config, config: PruneConfig) -> PruneConfig:
    """`config` with --layer-ratio and --hidden-ratio chosen for --target-shape mix: the most whole layers
    within MIX_DEPTH_SHARE of the target and MIX_MOST_LAYERS of the prunable ones, then the largest hidden cut
    that keeps both within MIX_DEPTH_HIDDEN_SHARE, at a size the family's config accepts (a multiple of
    MIX_HIDDEN_MULTIPLE where the model's is one; none where no such size is accepted)."""
    counts = ParameterCounts.of(model_config, config)
    budget = config.target_params * counts.total
    layers = min(int(MIX_DEPTH_SHARE * budget // counts.layer), int(MIX_MOST_LAYERS * counts.prunable_layers))
    counts = replace(counts, removed_layers=layers)
    arch, hidden, cut = arch_for(model_config), counts.hidden, 0
    multiple = MIX_HIDDEN_MULTIPLE if hidden % MIX_HIDDEN_MULTIPLE == 0 else 1
    for kept in range(hidden - multiple, 0, -multiple):
        if replace(counts, removed_hidden=hidden - kept).removed(0.0, config.uniform) > MIX_DEPTH_HIDDEN_SHARE * budget:
            break
        if hidden_config_error(model_config, arch, kept) is None:
            cut = hidden - kept
    # six decimals name the same counts: round_half_up(ratio * n) gives back layers and cut
    return replace(config, layer_ratio=round(layers / counts.prunable_layers, 6), hidden_ratio=round(cut / hidden, 6))


def resolve_ratio(model_config, config: PruneConfig) -> tuple[PruneConfig, dict | None]:
    """`config` with --ratio replaced by the one --target-params asks for (and under --target-shape mix
    --layer-ratio and --hidden-ratio), and the target's requested and predicted fractions of all
    parameters (unchanged and None without it)."""
    if config.target_params is None:
        return config, None
    if config.target_shape == "mix":
        config = mix_shape(model_config, config)
    counts = ParameterCounts.of(model_config, config)
    config = replace(config, ratio=ratio_for_target_params(counts, config))
    predicted = counts.removed(config.ratio, config.uniform) / counts.total
    return config, {"requested": config.target_params, "predicted": predicted}
