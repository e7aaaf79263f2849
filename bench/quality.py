"""Quality: perplexity after pruning, per criterion and ratio, at an equal fine-tuning budget.

Every row runs `loraprune.prune()` with the same steps, batch, sequence length, seed, lr and LoRA
settings; only `ratio` and `criterion` change. The reference "dense + LoRA" is ratio 0 through
the same loop (nothing removed). "dense, as shipped" is the untouched model, for context.
Perplexity: non-overlapping windows of the test split at 128 tokens (and 512 for ratios >= 0.5
and the dense rows), and the valid split at 128.
"""

import time

from loraprune import prune
from loraprune.archs import arch_for
from loraprune.pipeline.counts import count_parameters, count_prunable
from loraprune.pipeline.evaluate import perplexity
from loraprune.pipeline.texts import load_text

from . import common, publish

NAME = "quality"
TARGETS = [  # (ratio, criterion, other, max ratio of perplexities), from the issue
    (0.5, "lora", "gradient", 1.0),
    (0.5, "lora", "magnitude", 0.7),
    (0.2, "lora", "dense+lora", 1.15),
]


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--ratios", type=common.floats, default=[0.2, 0.5])
    p.add_argument("--criteria", default="lora,gradient,magnitude,random,sketch")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prune-freq", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=0, help="first N --eval-seq windows per split (0: all)")
    p.add_argument("--eval-seq", type=int, default=128, help="window length of the main perplexity")
    p.add_argument("--long-seq", type=int, default=512, help="second window length for the high-ratio rows")
    p.add_argument("--long-from", type=float, default=0.5, help="ratios >= this also get --long-seq perplexity")
    return p


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    base, tokenizer = common.load(args, model, tokenizer)
    arch = arch_for(base.config)
    train_text = load_text(args.data, "train")
    n = args.eval_windows or None
    short = args.eval_seq
    evals = {
        f"test@{short}": common.token_windows(tokenizer, args.data, "test", short, n),
        f"valid@{short}": common.token_windows(tokenizer, args.data, "valid", short, n),
        # the same leading tokens as the short test windows, when limited
        f"test@{args.long_seq}": common.token_windows(
            tokenizer, args.data, "test", args.long_seq, n and max(1, n * short // args.long_seq)
        ),
    }
    criteria = [c for c in args.criteria.split(",") if c]
    runs = [("dense, as shipped", None, None), ("dense+lora", 0.0, "lora")]
    runs += [(f"{c} {r:g}", r, c) for r in args.ratios for c in criteria]

    rows = []
    for name, ratio, criterion in runs:
        started = time.perf_counter()
        model = common.fresh(base)
        report = None
        if ratio is not None:
            config = common.budget(args, ratio, criterion)
            model, report = prune(model, tokenizer, train_text, config, progress=False)
        pruned_s = time.perf_counter() - started
        long_ok = ratio is None or ratio == 0 or ratio >= args.long_from
        ppl = {k: perplexity(model, w) for k, w in evals.items() if long_ok or not k.endswith(f"@{args.long_seq}")}
        row = {
            "name": name,
            "ratio": ratio,
            "criterion": criterion,
            "perplexity": {k: v["perplexity"] for k, v in ppl.items()},
            "tokens": {k: v["tokens"] for k, v in ppl.items()},
            "parameters": {"total": count_parameters(model), "prunable": count_prunable(model, arch)},
            "removed": None if report is None else {k: report["removed"][k] for k in report["removed"]},
            "final_loss": None if report is None else report["history"]["loss"][-1],
            "skipped_score_updates": None if report is None else report["skipped_score_updates"],
            "prune_seconds": pruned_s,
        }
        rows.append(row)
        print(f"[quality] {name}: {row['perplexity']} ({pruned_s:.0f} s)", flush=True)
        del model

    by = {r["name"]: r for r in rows}
    targets = []
    for ratio, crit, other, limit in TARGETS:
        a, b = by.get(f"{crit} {ratio:g}"), by.get(other if other.startswith("dense") else f"{other} {ratio:g}")
        if a and b:
            value = a["perplexity"][f"test@{short}"] / b["perplexity"][f"test@{short}"]
            targets.append(
                {
                    "claim": f"ppl({crit} {ratio:g}) <= {limit}x ppl({other})",
                    "measured": value,
                    "met": value <= limit,
                }
            )
    return publish.publish(args, argv, NAME, "1. Quality: perplexity by criterion and ratio",
                          {"rows": rows, "targets": targets})  # fmt: skip


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    args, rows = payload["args"], payload["rows"]
    keys = list(rows[0]["perplexity"])
    dense = next(r for r in rows if r["name"] == "dense, as shipped")["parameters"]
    table = common.table(
        ["run", *[f"ppl {k}" for k in keys], "params total", "params prunable", "removed total", "final train loss"],
        [
            [
                r["name"],
                *[r["perplexity"].get(k) for k in keys],
                f"{r['parameters']['total'] / 1e6:.2f}M",
                f"{r['parameters']['prunable'] / 1e6:.2f}M",
                f"{1 - r['parameters']['total'] / dense['total']:.1%}",
                r["final_loss"],
            ]
            for r in rows
        ],
    )
    tokens = ", ".join(f"{k}: {v} tokens" for k, v in rows[0]["tokens"].items())
    checks = [[t["claim"], t["measured"], "yes" if t["met"] else "**no**"] for t in payload["targets"]]
    checks = "\n\n" + common.table(["check", "measured", "holds"], checks) if checks else ""
    return f"{common.budget_text(args)} Tokens scored: {tokens}.\n\n{table}{checks}"


if __name__ == "__main__":
    main()
