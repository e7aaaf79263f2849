"""Recovery after pruning: test perplexity right after pruning at each ratio, and after fine-tuning
the pruned model further with a fresh LoRA.

Each ratio runs `loraprune.prune()` with the shared budget (ratio 0 is the dense model with the
same LoRA budget), then fine-tunes the smaller, merged model for --recovery-steps more steps with
a fresh LoRA (plain peft LoRA, no pruning: the same batch, window length, lr and LoRA settings; the
data stream continues where pruning stopped) and merges it. The dense model as shipped is the
reference point. The figure plots perplexity against the total parameters kept.
"""

import time

import torch
from matplotlib.ticker import LogFormatter
from torch import nn

from loraprune import prune
from loraprune.archs import arch_for
from loraprune.pipeline.counts import count_parameters
from loraprune.pipeline.data import BatchSampler
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.texts import load_text
from loraprune.pipeline.train import lora_optimizer
from loraprune.tasks.causal_lm import causal_lm_loss

from . import common, publish

NAME = "recovery"


def arguments():
    p = common.budget_arguments(common.parser(__doc__.splitlines()[0]))
    p.add_argument("--ratios", type=common.floats, default=[0.1, 0.2, 0.3, 0.5, 0.7], help="ratio 0 is always run")
    p.add_argument("--recovery-steps", type=int, default=120, help="LoRA fine-tuning steps after pruning")
    return p


def recover(model: nn.Module, train_windows: torch.Tensor, args) -> tuple[nn.Module, list[float]]:
    """Fine-tune `model` (pruned and merged) with a fresh LoRA; returns it merged, and the losses."""
    config = common.budget(args, 0.0)
    peft_model = attach_lora(model, arch_for(model.config), config)
    optimizer = lora_optimizer(peft_model, config.lr)
    torch.manual_seed(config.seed)  # LoRA dropout
    batches = BatchSampler(train_windows, config.batch_size, seed=config.seed)
    for _ in range(args.steps):  # prune() drew these batches from the same sampler: continue after them
        next(batches)
    device = next(peft_model.parameters()).device
    peft_model.train()
    losses = []
    for _ in range(args.recovery_steps):
        loss = causal_lm_loss(peft_model, next(batches).to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model = peft_model.merge_and_unload()
    model.eval()
    return model, losses


def plot(args, shipped: dict, rows: list[dict], key: str) -> tuple:
    fig, axis = common.pyplot().subplots(figsize=(7, 4.5))
    params = [r["parameters"] / 1e6 for r in rows]
    for stage, marker in (("after pruning", "o"), ("after recovery", "s")):
        axis.plot(params, [r["perplexity"][stage] for r in rows], marker=marker, label=stage)
    for r, x in zip(rows, params, strict=True):
        point = (x, r["perplexity"]["after pruning"])
        axis.annotate(f"{r['ratio']:g}", point, fontsize=8, xytext=(3, 3), textcoords="offset points")
    axis.plot(shipped["parameters"] / 1e6, shipped["perplexity"], "k*", markersize=10, label="dense, as shipped")
    axis.set_yscale("log")
    # plain numbers, on the minor ticks too: a few points often span less than a decade
    axis.yaxis.set_major_formatter(LogFormatter())
    axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    axis.set(xlabel="parameters kept, total (M)", ylabel=f"perplexity, {key}")
    axis.set_title(f"Recovery: {args.recovery_steps} LoRA steps after pruning (labels: ratio)")
    axis.legend(fontsize=8)
    return common.save_figure(args, NAME, fig, "perplexity vs parameters kept, after pruning and after recovery")


def main(argv=None, model=None, tokenizer=None) -> dict:
    args, base, tokenizer = common.prepare(arguments(), argv, model, tokenizer)
    train_text = load_text(args.data, "train")
    train_windows = common.token_windows(tokenizer, args.data, "train", args.seq_len)
    evals = common.eval_sets(args, tokenizer, ("test",))
    key = next(iter(evals))
    dense = count_parameters(base)
    shipped = {"parameters": dense, "perplexity": common.perplexities(base, evals)[key]}
    rows = []
    for ratio in sorted({0.0, *args.ratios}):
        started = time.perf_counter()
        config = common.budget(args, ratio)
        pruned, report = prune(common.fresh(base), tokenizer, train_text, config, progress=False)
        after_pruning = common.perplexities(pruned, evals)[key]
        recovered, losses = recover(pruned, train_windows, args)
        after_recovery = common.perplexities(recovered, evals)[key]
        row = {
            "ratio": ratio,
            "parameters": count_parameters(recovered),
            "kept": count_parameters(recovered) / dense,
            "perplexity": {"after pruning": after_pruning, "after recovery": after_recovery},
            "final_loss": {"pruning": report["history"]["loss"][-1], "recovery": losses[-1] if losses else None},
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(f"[recovery] ratio {ratio:g}: {row['perplexity']} ({row['seconds']:.0f} s)", flush=True)
        del pruned, recovered

    figure, _ = plot(args, shipped, rows, key)
    results = {"dense_as_shipped": shipped, "rows": rows, "figure": figure}
    return publish.publish(args, argv, NAME, "6.4 Recovery after pruning", results)


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON), and its figure."""
    args, rows, shipped = payload["args"], payload["rows"], payload["dense_as_shipped"]
    key = f"test@{args['eval_seq']}"
    figure = results / f"{NAME}-{payload['label']}.png"
    caption = "perplexity vs parameters kept, after pruning and after recovery"
    return (
        f"{common.budget_text(args)} Recovery: {args['recovery_steps']} further steps with a fresh LoRA, same "
        f"settings, no pruning. Ratio 0 is the dense model with the same LoRA budget; the dense model as "
        f"shipped has perplexity {shipped['perplexity']:.4g} ({shipped['parameters'] / 1e6:.2f}M parameters).\n\n"
        + common.table(
            ["ratio", "params total", "kept", f"ppl {key} after pruning", "after recovery", "final recovery loss"],
            [
                [
                    r["ratio"],
                    f"{r['parameters'] / 1e6:.2f}M",
                    f"{r['kept']:.1%}",
                    r["perplexity"]["after pruning"],
                    r["perplexity"]["after recovery"],
                    r["final_loss"]["recovery"],
                ]
                for r in rows
            ],
        )  # fmt: skip
        + (f"\n\n{common.image(figure, caption, page)}" if figure.exists() else "")
    )


if __name__ == "__main__":
    main()
