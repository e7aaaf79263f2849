"""How good is the LoRA gradient estimate? `loraprune diagnose` (no pruning).

LoRAPrune scores with G_W ≈ G_B·A + B·G_A − G_B·G_A instead of the true dL/dW0 (docs/method.md#lora-guided-criterion).
This fine-tunes LoRA as the method does and, at chosen steps, compares the two on the same fixed
probe batches (dropout off):
- per module: cosine similarity and relative error ‖Ĝ − G‖ / ‖G‖ of the estimate Ĝ to the
  true gradient G, which is computed for comparison only, a few layers per backward pass so
  that it fits (`layers_per_pass`);
- per layer: Spearman rank correlation of the group scores of the `lora` and the `gradient`
  criteria (heads, channels), and the overlap of their bottom-k groups at 10%, 25%, 50%; and,
  as the baseline the estimate must beat, the Spearman correlation of `magnitude` (|W0 + s·B·A|,
  no gradient at all) with `gradient`, and for comparison that of one draw of `sketch` (sketch.py).

At step 0, B = 0, so G_A = s·Bᵀ·G = 0 and the estimate is G_B·A = s·G·AᵀA: the true gradient
seen through the r directions of A's random rows (cosine about sqrt(r / in) for a gradient with
no preferred direction), and the merged weight is W0. Later the estimate is s·(G·AᵀA + B·Bᵀ·G)
less a small cross term: still G seen through 2r directions, which training turns towards G's.
"""

import json

import torch
from torch import Tensor, nn

from ..archs import Arch, arch_for
from ..pipeline.data import BatchSampler
from ..pipeline.groups import LayerGroups, summed_dim
from ..pipeline.importance import lora_gradient_estimate, lora_guided, magnitude, weight_gradient
from ..pipeline.lora import attach_lora
from ..pipeline.pruner import group_scores
from ..pipeline.scoring import read_factors
from ..pipeline.sketch import SketchScores
from ..pipeline.train import lora_optimizer
from ..prune_config import PruneConfig, round_half_up
from ..tasks import objective

BOTTOM_FRACTIONS = (0.1, 0.25, 0.5)
SPEARMANS = ("spearman", "magnitude_spearman", "sketch_spearman")  # lora, magnitude, sketch vs gradient


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors (ties broken by position: scores are floats)."""

    def ranks(x: Tensor) -> Tensor:
        return torch.argsort(torch.argsort(x, stable=True)).double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def bottom_overlap(a: Tensor, b: Tensor, fraction: float) -> float:
    """|lowest k of a ∩ lowest k of b| / k, k = fraction of the groups (at least one)."""
    k = max(1, round_half_up(fraction * len(a)))
    lowest_a, lowest_b = set(torch.argsort(a)[:k].tolist()), set(torch.argsort(b)[:k].tolist())
    return len(lowest_a & lowest_b) / k


@torch.no_grad()
def estimate_error(module: nn.Module, block_rows: int = 1024) -> dict[str, float]:
    """Cosine and relative error of the LoRA estimate to the true dL/dW0 (both must be in .grad)."""
    dot = estimate_sq = true_sq = 0.0
    for start in range(0, module.base_layer.weight.shape[0], block_rows):
        f = read_factors(module, slice(start, start + block_rows))
        estimate, true = lora_gradient_estimate(f).double(), f.weight_grad.double()
        dot += (estimate * true).sum().item()
        estimate_sq += estimate.square().sum().item()
        true_sq += true.square().sum().item()
    error_sq = max(estimate_sq + true_sq - 2 * dot, 0.0)
    return {
        "cosine": dot / max((estimate_sq * true_sq) ** 0.5, 1e-300),
        "relative_error": (error_sq / max(true_sq, 1e-300)) ** 0.5,
    }


def measure(
    model: nn.Module,
    arch: Arch,
    groups: LayerGroups,
    probe: list,
    normalize: bool,
    loss_fn,
    layers_per_pass: int = 1,
) -> list[dict]:
    """Per layer: estimate error per module, and lora-vs-gradient group-score agreement.

    The LoRA gradients come from the same backward passes as the true ones (summed over the
    probe batches), so both describe the same loss."""
    layers = arch.layers_of(model)
    was_training = model.training
    model.eval()  # no dropout: the estimate and the truth see the same function
    results = []
    for first in range(0, len(layers), layers_per_pass):
        chunk = range(first, min(first + layers_per_pass, len(layers)))
        modules = {m: summed_dim(role) for i in chunk for role, m in arch.projections(layers[i]).items()}
        for m in modules:
            m.base_layer.weight.requires_grad_(True)
        sketch = SketchScores(seed=first, rank=next(iter(modules)).lora_A["default"].weight.shape[0])
        sketch.attach(modules)  # one draw of the sketch criterion's directions, on the same passes
        model.zero_grad(set_to_none=True)
        for batch in probe:
            loss_fn(model, batch).backward()
        all_heads = torch.ones(groups.heads, dtype=torch.bool)
        for i in chunk:
            projections = arch.projections(layers[i])
            true = group_scores(projections, groups, weight_gradient, all_heads, normalize)
            others = {
                name: group_scores(projections, groups, criterion, all_heads, normalize)
                for name, criterion in (("lora", lora_guided), ("magnitude", magnitude), ("sketch", sketch))
            }
            row = {"layer": i, "modules": {role: estimate_error(m) for role, m in projections.items()}}
            for k, kind in enumerate(("heads", "channels")):
                lora = others["lora"][k]
                row[kind] = {f"{name}_spearman": spearman(others[name][k], true[k]) for name in ("magnitude", "sketch")}
                row[kind]["spearman"] = spearman(lora, true[k])
                row[kind].update({f"bottom_{f:g}": bottom_overlap(lora, true[k], f) for f in BOTTOM_FRACTIONS})
            results.append(row)
        sketch.detach()
        for m in modules:
            m.base_layer.weight.grad = None
            m.base_layer.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return results


def summarize(layers: list[dict]) -> dict:
    """Means over layers (and per module role) of one measurement."""

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    roles = layers[0]["modules"].keys()
    summary = {
        f"{stat}/{role}": mean(row["modules"][role][stat] for row in layers)
        for stat in ("cosine", "relative_error")
        for role in roles
    }
    for kind in ("heads", "channels"):
        for key in layers[0][kind]:
            summary[f"{kind}/{key}"] = mean(row[kind][key] for row in layers)
    return summary


def diagnose(
    model: nn.Module,
    train_windows,
    config: PruneConfig,
    task,
    at_steps: list[int],
    probe_batches: int = 2,
    layers_per_pass: int = 1,
    progress: bool = True,
) -> dict:
    """Fine-tune LoRA on `train_windows` (no pruning; config's lr, batch, LoRA settings) on the
    task's loss (tasks/) and measure the estimate at each of `at_steps` (0: before any step) on fixed
    probe batches."""
    from tqdm.auto import tqdm

    arch = arch_for(model.config)
    groups = LayerGroups.from_config(model.config, arch)
    peft_model = attach_lora(model, arch, config)
    base = peft_model.get_base_model()
    loss_fn = objective(task)
    # the probe: fixed batches, drawn with another seed than the training stream
    probe_sampler = iter(BatchSampler(train_windows, config.batch_size, seed=config.seed + 1))
    probe = [next(probe_sampler) for _ in range(probe_batches)]
    batches = iter(BatchSampler(train_windows, config.batch_size, seed=config.seed))
    optimizer = lora_optimizer(peft_model, config.lr)

    points, step = [], 0
    steps = sorted(set(at_steps))
    bar = tqdm(total=steps[-1] + len(steps), desc="diagnose", disable=not progress, dynamic_ncols=True)
    peft_model.train()
    for target in steps:
        while step < target:
            loss_fn(peft_model, next(batches)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
        layers = measure(base, arch, groups, probe, config.normalize, loss_fn, layers_per_pass)
        b_norm = sum(m.lora_B["default"].weight.norm().item() ** 2 for m in _lora_modules(base, arch)) ** 0.5
        points.append({"step": step, "lora_B_norm": b_norm, "summary": summarize(layers), "layers": layers})
        bar.update()
    bar.close()
    return {
        "model_type": model.config.model_type,
        "config": {"lr": config.lr, "batch_size": config.batch_size, "seq_len": config.seq_len},
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "scaling": config.lora_alpha / config.lora_r},
        "probe_batches": probe_batches,
        "points": points,
    }


def run_diagnose(settings, training: PruneConfig) -> dict:
    """`loraprune diagnose`: fine-tune `settings.model` on `settings.data` with `training`'s LoRA
    settings, measure at `settings.at_steps`, and write diagnose.json, diagnose.md, diagnose.png."""
    from dataclasses import replace
    from pathlib import Path

    from ..pipeline.export import check_output, staged_folder
    from ..pipeline.load import load_config, load_model
    from ..tasks import task_for
    from .plots import plot_diagnosis

    output, at_steps = Path(settings.output), settings.steps
    check_output(output, settings.overwrite)
    config = replace(training, ratio=0.0, steps=max(at_steps[-1], 1))
    task = task_for(load_config(settings.model), config.task)
    data = task.load(settings.data, "train")
    model, tokenizer = load_model(settings.model, task=task.name)
    examples = task.examples(model, tokenizer, data, config, progress=not settings.quiet)
    result = diagnose(model, examples, config, task, at_steps, settings.probe_batches,
                      settings.layers_per_pass, progress=not settings.quiet)  # fmt: skip
    result.update(model=settings.model, data=settings.data)
    tables = format_diagnosis(result)
    with staged_folder(output, settings.overwrite, "saving the diagnosis") as staging:
        (staging / "diagnose.json").write_text(json.dumps(result, indent=2))
        plot_diagnosis(result, staging / "diagnose.png")
        title = f"# LoRA gradient estimate: {settings.model} on {settings.data}\n\n"
        (staging / "diagnose.md").write_text(title + tables + "\n![per-layer agreement](diagnose.png)\n")
    print(tables)
    print(f"wrote {output / 'diagnose.md'}, diagnose.json and diagnose.png")
    return result


def _lora_modules(model: nn.Module, arch: Arch) -> list[nn.Module]:
    return [m for layer in arch.layers_of(model) for m in arch.projections(layer).values()]


def format_diagnosis(result: dict) -> str:
    """Two markdown tables, a row per measured step: the estimate, and the rankings it gives."""
    from .report import markdown_table

    points = result["points"]
    roles = [key.split("/")[1] for key in points[0]["summary"] if key.startswith("cosine/")]
    estimate = markdown_table(
        ["step", "norm of B", *[f"cos {role}" for role in roles], "rel. error (mean)"],
        [
            [p["step"], p["lora_B_norm"], *[p["summary"][f"cosine/{role}"] for role in roles],
             sum(p["summary"][f"relative_error/{role}"] for role in roles) / len(roles)]
            for p in points
        ],
    )  # fmt: skip
    overlaps = [f"bottom_{f:g}" for f in BOTTOM_FRACTIONS]

    def spearmans(summary: dict, kind: str) -> str:
        return " / ".join(f"{summary[f'{kind}/{name}']:.3g}" for name in SPEARMANS)

    ranking = markdown_table(
        ["step", "Spearman heads", "Spearman channels"]
        + [f"heads bottom {f:.0%}" for f in BOTTOM_FRACTIONS]
        + [f"channels bottom {f:.0%}" for f in BOTTOM_FRACTIONS],
        [
            [p["step"], spearmans(p["summary"], "heads"), spearmans(p["summary"], "channels")]
            + [p["summary"][f"heads/{key}"] for key in overlaps]
            + [p["summary"][f"channels/{key}"] for key in overlaps]
            for p in points
        ],
    )
    return (
        "Estimate G_B·A + B·G_A − G_B·G_A vs the true dL/dW0 (means over layers):\n\n"
        f"{estimate}\n\nGroup scores vs the gradient criterion's (means over layers). Spearman: lora / magnitude "
        "(no gradient at all) / sketch (one draw of its random directions; training averages many); bottom k%: "
        f"overlap of the k% lowest-scored groups of each layer, lora vs gradient:\n\n{ranking}\n"
    )
