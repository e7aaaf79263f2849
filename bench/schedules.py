"""Schedules: perplexity after pruning along each sparsity schedule, at one ratio and budget.

Every row runs `loraprune.prune()` at the same ratio (default 0.5) and budget; only
PruneConfig.schedule changes: cubic (the paper's), linear, exponential (the same fraction of the
remaining groups at each prune) and oneshot (everything at the first pruning step, then
fine-tuning only). Perplexity on the test and valid splits; the figure shows the fraction of
channels (solid) and heads (dashed) removed at each step, from the run's history.
"""

import time

from loraprune import prune
from loraprune.pipeline.texts import load_text

from . import common, publish

NAME = "schedules"


def arguments():
    p = common.budget_arguments(common.parser(__doc__.splitlines()[0]))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--schedules", default="cubic,linear,exponential,oneshot")
    return p


def plot(args, rows: list[dict]) -> tuple:
    fig, axis = common.pyplot().subplots(figsize=(8, 4))
    for index, row in enumerate(rows):
        history, color = row["history"], f"C{index}"
        steps = range(1, len(history["loss"]) + 1)
        axis.plot(steps, history["channel_sparsity"], color=color, label=f"{row['schedule']}: channels")
        axis.plot(steps, history["head_sparsity"], color=color, linestyle="--", label=f"{row['schedule']}: heads")
    axis.set(xlabel="optimizer step", ylabel="fraction removed (pruned layers)", ylim=(0, 1))
    axis.set_title(f"Sparsity schedules to ratio {args.ratio:g}")
    axis.legend(fontsize=8, ncol=2)
    return common.save_figure(args, NAME, fig, "sparsity per step of each schedule")


def main(argv=None, model=None, tokenizer=None) -> dict:
    args, base, tokenizer = common.prepare(arguments(), argv, model, tokenizer)
    train_text = load_text(args.data, "train")
    evals = common.eval_sets(args, tokenizer, ("test", "valid"))
    rows = []
    for schedule in [s for s in args.schedules.split(",") if s]:
        started = time.perf_counter()
        config = common.budget(args, args.ratio, schedule=schedule)
        pruned, report = prune(common.fresh(base), tokenizer, train_text, config, progress=False)
        row = {
            "schedule": schedule,
            "perplexity": common.perplexities(pruned, evals),
            "final_loss": report["history"]["loss"][-1],
            "pruning_steps": report["history"]["pruning_steps"],
            "removed": report["removed"],  # heads and channels as asked; total parameters by which k/v heads went
            "history": report["history"],
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(f"[schedules] {schedule}: {row['perplexity']} ({row['seconds']:.0f} s)", flush=True)
        del pruned

    figure, _ = plot(args, rows)
    return publish.publish(args, argv, NAME, "6.3 Schedules", {"rows": rows, "figure": figure})


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON), and its figure."""
    args, rows = payload["args"], payload["rows"]
    keys = list(rows[0]["perplexity"])
    figure = results / f"{NAME}-{payload['label']}.png"
    return (
        f"{common.budget_text(args)} Ratio {args['ratio']:g}.\n\n"
        + common.table(
            ["schedule", *[f"ppl {k}" for k in keys], "pruning steps", "removed total", "final train loss"],
            [
                [
                    r["schedule"],
                    *[r["perplexity"][k] for k in keys],
                    len(r["pruning_steps"]),
                    f"{r['removed']['total_parameters']:.1%}",
                    r["final_loss"],
                ]
                for r in rows
            ],
        )  # fmt: skip
        + (f"\n\n{common.image(figure, 'sparsity per step of each schedule', page)}" if figure.exists() else "")
    )


if __name__ == "__main__":
    main()
