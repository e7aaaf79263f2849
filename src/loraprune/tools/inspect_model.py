"""`loraprune inspect`: a model's prunable structure and what each --ratio would remove,
from its config alone (shapes on the meta device; no weights are read)."""

from dataclasses import replace

from ..archs import arch_for, meta_model
from ..errors import LoraPruneError
from ..pipeline.counts import count_prunable
from ..pipeline.groups import LayerGroups
from ..pipeline.shrink import stock_config_error
from ..pipeline.target import ParameterCounts
from ..prune_config import PruneConfig

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def _ratio_row(model_config, counts: ParameterCounts, config: PruneConfig) -> dict:
    """Kept shape and removed fraction at one ratio, or why the ratio is impossible."""
    try:
        heads, kv_heads, channels = counts.groups.kept_at(config.ratio, config.uniform, config.multiple_of)
    except LoraPruneError:
        return {"ratio": config.ratio, "uniform": config.uniform, "possible": False, "why": "empties a layer"}
    row = {"ratio": config.ratio, "uniform": config.uniform, "possible": True, "heads": heads, "channels": channels}
    row["removed_total"] = counts.removed(config.ratio, config.uniform) / counts.total
    if config.uniform:
        kv_heads = kv_heads or heads
        problem = stock_config_error(model_config, arch_for(model_config), heads, kv_heads, channels)
        row.update(possible=problem is None, why=problem)
    return row


def describe(model_config, skip_layers: str = "first10pct,last") -> dict:
    """Family, sizes, prunable groups, parameters, and the ratio table of a model config."""
    arch = arch_for(model_config)
    groups = LayerGroups.from_config(model_config, arch)
    config = PruneConfig(skip_layers=skip_layers)
    counts = ParameterCounts.of(model_config, config)
    prunable = count_prunable(meta_model(model_config), arch)
    layers = model_config.num_hidden_layers
    return {
        "family": model_config.model_type,
        "layers": layers,
        "skipped_layers": sorted(config.skipped_layers(layers)),
        "heads": groups.heads,
        "kv_heads": groups.kv_heads,
        "head_dim": groups.head_dim,
        "mlp_width": groups.channels,
        "parameters": counts.total,
        "prunable_parameters": prunable,
        "ratios": [
            _ratio_row(
                model_config,
                counts,
                replace(config, ratio=ratio, uniform=uniform, skip_layers="none" if uniform else skip_layers),
            )
            for uniform in (False, True)
            for ratio in RATIOS
        ],
    }


def format_description(name: str, info: dict) -> str:
    """The table `loraprune inspect` prints."""
    prunable_layers = info["layers"] - len(info["skipped_layers"])
    lines = [
        f"model          {name} ({info['family']})",
        f"layers         {info['layers']}; pruned by default: {prunable_layers} (skipped {info['skipped_layers']})",
        f"attention      {info['heads']} query heads sharing {info['kv_heads']} k/v heads, head_dim {info['head_dim']}",
        f"MLP width      {info['mlp_width']}",
        f"groups/layer   {info['heads']} heads + {info['mlp_width']} channels",
        f"parameters     {info['parameters'] / 1e6:.2f}M total, {info['prunable_parameters'] / 1e6:.2f}M prunable "
        "(q/k/v/o/gate/up/down)",
        "",
        "--ratio  layout     heads kept  channels kept  total params removed",
    ]
    for row in info["ratios"]:
        layout = "uniform" if row["uniform"] else "per-layer"
        if "heads" not in row:
            lines.append(f"{row['ratio']:<8} {layout:<10} impossible: {row['why']}")
            continue
        shape = f"{row['heads']:<11} {row['channels']:<14} {row['removed_total']:.1%}"
        note = "" if row["possible"] else f"  (rejected by the config class: {row['why']})"
        lines.append(f"{row['ratio']:<8} {layout:<10} {shape}{note}")
    lines.append("per-layer: k/v heads assumed kept (they go only with every query head reading them)")
    return "\n".join(lines)
