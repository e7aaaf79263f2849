"""PNG plots of a run: schedule and loss, kept groups per layer, final score distributions."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_training(history: dict, path: Path) -> None:
    """Loss (left axis) and head/channel sparsity (right axis) per step, pruning steps marked; below,
    when the history has them, the wall time of each step and the parameters it ran on."""
    steps = range(1, len(history["loss"]) + 1)
    timed = bool(history.get("step_seconds")) and bool(history.get("parameters"))
    if timed:
        fig, (loss_axis, time_axis) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(3, 2))
    else:
        fig, loss_axis = plt.subplots(figsize=(8, 4))
    loss_axis.plot(steps, history["loss"], color="tab:blue", linewidth=1, label="training loss")
    loss_axis.set_ylabel("loss", color="tab:blue")
    sparsity_axis = loss_axis.twinx()
    sparsity_axis.plot(steps, history["head_sparsity"], color="tab:red", label="heads removed")
    sparsity_axis.plot(steps, history["channel_sparsity"], color="tab:orange", linestyle="--", label="channels removed")
    sparsity_axis.set_ylabel("fraction removed (pruned layers)")
    sparsity_axis.set_ylim(0, 1)
    for axis in (loss_axis, time_axis) if timed else (loss_axis,):
        for step in history["pruning_steps"]:
            axis.axvline(step, color="grey", alpha=0.25, linewidth=0.8)
    lines = loss_axis.get_legend_handles_labels()[0] + sparsity_axis.get_legend_handles_labels()[0]
    labels = loss_axis.get_legend_handles_labels()[1] + sparsity_axis.get_legend_handles_labels()[1]
    loss_axis.legend(lines, labels, loc="upper right", fontsize=8)
    loss_axis.set_title("LoRAPrune: loss and sparsity (grey lines: pruning steps)")
    if timed:
        time_axis.plot(steps, history["step_seconds"], color="tab:purple", linewidth=1, label="step time")
        time_axis.set_ylabel("seconds per step", color="tab:purple")
        time_axis.set_ylim(bottom=0)
        size_axis = time_axis.twinx()
        size_axis.plot(steps, [n / 1e6 for n in history["parameters"]], color="tab:green", label="parameters")
        size_axis.set_ylabel("parameters (M)", color="tab:green")
        time_axis.set_title("step time and the model's size (--shrink progressive: it falls at each pruning step)")
        time_axis.set_xlabel("optimizer step")
    else:
        loss_axis.set_xlabel("optimizer step")
    _save(fig, path)


def plot_kept(layers: list[dict], dense_heads: int, dense_channels: int, path: Path) -> None:
    """Bars of kept heads and kept MLP channels per layer; skipped layers hatched."""
    index = [layer["index"] for layer in layers]
    fig, (heads_axis, channels_axis) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    for axis, key, dense in ((heads_axis, "heads", dense_heads), (channels_axis, "channels", dense_channels)):
        bars = axis.bar(index, [layer[key] for layer in layers], color="tab:green")
        for bar, layer in zip(bars, layers, strict=True):
            if not layer["pruned"]:
                bar.set_hatch("//")
                bar.set_color("lightgrey")
        axis.axhline(dense, color="black", linewidth=0.8, linestyle=":")
        axis.set_ylabel(f"kept {key}\n(of {dense})")
    channels_axis.set_xlabel("layer (grey: not pruned)")
    heads_axis.set_title("Kept groups per layer")
    _save(fig, path)


def plot_scores(scores: dict[str, Tensor], prunable: list[int], path: Path) -> None:
    """Box plots of the final moving-average group scores of each pruned layer: kept groups (green)
    beside removed ones (red; their averages decay once masked, as their gradients are zero)."""
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    for axis, kind in zip(axes, ("head", "channel"), strict=True):
        score, alive = scores[f"{kind}_score"], scores[f"{kind}_alive"].bool()
        for offset, keep, color in ((-0.2, True, "tab:green"), (0.2, False, "tab:red")):
            data = [score[i][alive[i] == keep].numpy() for i in prunable]
            boxes = axis.boxplot(
                data, positions=[i + offset for i in prunable], widths=0.35, showfliers=False, patch_artist=True
            )
            for box in boxes["boxes"]:
                box.set_facecolor(color)
                box.set_alpha(0.6)
        axis.set_ylabel(f"{kind} score")
    axes[1].set_xticks(prunable, [str(i) for i in prunable])
    axes[1].set_xlabel("layer (green: kept, red: removed)")
    axes[0].set_title("Final group scores (moving average) per pruned layer")
    _save(fig, path)


def plot_diagnosis(result: dict, path: Path) -> None:
    """Per layer, one line per measured step: the estimate's mean cosine to the true gradient,
    and the Spearman correlation of lora and gradient head and channel scores."""

    def mean_cosine(row: dict) -> float:
        return _mean(m["cosine"] for m in row["modules"].values())

    panels = (
        ("cosine(estimate, dL/dW0)\nmean over modules", mean_cosine),
        ("Spearman lora vs gradient,\nheads", lambda row: row["heads"]["spearman"]),
        ("Spearman lora vs gradient,\nchannels", lambda row: row["channels"]["spearman"]),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 7.5), sharex=True)
    colors = plt.cm.viridis([i / max(len(result["points"]) - 1, 1) for i in range(len(result["points"]))])
    for axis, (label, value) in zip(axes, panels, strict=True):
        for point, color in zip(result["points"], colors, strict=True):
            layers = point["layers"]
            axis.plot([r["layer"] for r in layers], [value(r) for r in layers], marker=".", color=color,
                      label=f"step {point['step']}")  # fmt: skip
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_ylabel(label)
        axis.set_ylim(-1, 1)
    axes[0].legend(fontsize=8, ncol=len(result["points"]))
    axes[-1].set_xlabel("layer")
    axes[0].set_title("How well the LoRA-guided estimate matches the true gradient, per layer")
    _save(fig, path)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
