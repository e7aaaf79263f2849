"""Moving-average sensitivity: perplexity and ranking stability for several score averages λ.

At one ratio (default 0.5) and the shared budget, each λ (PruneConfig.ema) runs the loop of
`loraprune.prune()`, whose `on_pruning_step` callback shows the pruner after each pruning
step; then test perplexity. Pruning only ever removes, so a mask cannot flip back; what can flip
is the *removal set*: the groups that the current moving-average scores rank lowest at the final
ratio (in each pruned layer, live and dead groups alike, heads per pool as the pruner ranks them).
The flip rate between consecutive pruning steps is the size of the symmetric difference of their
removal sets over the number of groups (heads and channels of the pruned layers; at most
2 x ratio). "Final vs first" is the fraction of groups whose final alive/dead status differs from
the first pruning step's removal set: how far the final mask moved from the first decision.
"""

import statistics
import time
from itertools import pairwise

import torch
from torch import Tensor

from loraprune import prune
from loraprune.pipeline.texts import load_text

from . import common, publish

NAME = "ema"


def arguments():
    p = common.budget_arguments(common.parser(__doc__.splitlines()[0]))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--emas", type=common.floats, default=[0.0, 0.5, 0.9, 0.99], help="moving-average factors λ")
    return p


def _lowest(score: Tensor, pool: Tensor, count: int) -> Tensor:
    # the pruner's order: a stable sort, so ties go to the lower index
    return pool[torch.argsort(score[pool], stable=True)[:count]]


def removal_set(pruner, ratio: float) -> tuple[Tensor, Tensor]:
    """The groups the current scores rank lowest at `ratio`, as bool tensors over the pruned layers:
    ([layers, heads], [layers, channels])."""
    g, uniform, rows = pruner.groups, pruner.config.uniform, pruner.prunable
    heads = torch.zeros(len(rows), g.heads, dtype=torch.bool)
    channels = torch.zeros(len(rows), g.channels, dtype=torch.bool)
    for row, i in enumerate(rows):
        for pool, target in zip(g.head_pools(uniform), g.head_targets(ratio, uniform), strict=True):
            heads[row, _lowest(pruner.head_score[i], pool, target)] = True
        channels[row, _lowest(pruner.channel_score[i], torch.arange(g.channels), g.channel_target(ratio))] = True
    return heads, channels


class Trace:
    """`on_pruning_step` callback: the removal set at each pruning step, and the latest masks' dead groups."""

    def __init__(self, ratio: float):
        self.ratio, self.sets, self.dead = ratio, [], None

    def __call__(self, step: int, pruner) -> None:
        self.sets.append(removal_set(pruner, self.ratio))
        rows = pruner.prunable
        self.dead = (~pruner.head_alive[rows], ~pruner.channel_alive[rows])


def moved(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> float:
    """Fraction of the groups that are in exactly one of two sets (given as matching bool tensors)."""
    return sum((x ^ y).sum().item() for x, y in zip(a, b, strict=True)) / sum(x.numel() for x in a)


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None  # one pruning step: nothing to compare


def main(argv=None, model=None, tokenizer=None) -> dict:
    args, base, tokenizer = common.prepare(arguments(), argv, model, tokenizer)
    train_text = load_text(args.data, "train")
    evals = common.eval_sets(args, tokenizer, ("test",))
    rows = []
    for lam in args.emas:
        started = time.perf_counter()
        trace = Trace(args.ratio)
        config = common.budget(args, args.ratio, ema=lam)
        pruned, report = prune(common.fresh(base), tokenizer, train_text, config, progress=False, on_pruning_step=trace)
        history = report["history"]
        pairs = list(pairwise(trace.sets))
        row = {
            "ema": lam,
            "perplexity": common.perplexities(pruned, evals),
            "flip_rates": [moved(a, b) for a, b in pairs],
            "head_flip_rates": [moved(a[:1], b[:1]) for a, b in pairs],
            "final_vs_first": moved(trace.dead, trace.sets[0]),
            "pruning_steps": history["pruning_steps"],
            "final_loss": history["loss"][-1],
            "seconds": time.perf_counter() - started,
        }
        row.update(mean_flip_rate=_mean(row["flip_rates"]), mean_head_flip_rate=_mean(row["head_flip_rates"]))
        rows.append(row)
        print(f"[ema] λ={lam:g}: {row['perplexity']}, mean flip rate {row['mean_flip_rate']}", flush=True)
        del pruned

    return publish.publish(args, argv, NAME, "6.2 Moving-average sensitivity (λ)", {"rows": rows})


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    args, rows = payload["args"], payload["rows"]
    key = next(iter(rows[0]["perplexity"]))
    return (
        f"{common.budget_text(args)} Ratio {args['ratio']:g}; flip rates are fractions of all groups of the pruned "
        f"layers (heads and channels), at most {2 * args['ratio']:g}.\n\n"
        + common.table(
            [
                "λ",
                f"ppl {key}",
                "mean flip rate (all groups)",
                "mean flip rate (heads)",
                "final vs first",
                "pruning steps",
                "final train loss",
            ],
            [
                [
                    r["ema"],
                    r["perplexity"][key],
                    r["mean_flip_rate"],
                    r["mean_head_flip_rate"],
                    r["final_vs_first"],
                    len(r["pruning_steps"]),
                    r["final_loss"],
                ]
                for r in rows
            ],
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
