"""Inference speed: dense vs pruned models (per-layer and --uniform), forward latency, greedy
generation throughput, and analytic MACs per token.

Pruned models come from `loraprune.prune()` with a short budget (the speed depends only on the
shapes, which the ratio fixes): every --ratios x --layouts, or the recipes given as
NAME=CRITERION:RATIO[:setting=value,...] (bench.recipes' form, e.g. layer or hidden-size cuts);
--save keeps each one as a model folder (for bench.serving in llama.cpp). Forward latency: median
over rounds of model(input_ids) with use_cache=False under inference_mode, every variant timed in
turn (order reversed every round) in one process. MACs per token: every nn.Linear (LM head included) plus attention's
QK^T and AV at the average causal context (S+1)/2. The MAC-limit speedup is dense MACs / pruned
MACs at that shape; we report achieved speedup / limit.
"""

from pathlib import Path

import torch

from loraprune import PruneConfig, prune
from loraprune.pipeline.export import save_pruned
from loraprune.pipeline.texts import load_text

from . import common, publish
from .recipes import parse_run

NAME = "speed"


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--ratios", type=common.floats, default=[0.2, 0.5])
    p.add_argument("--layouts", default="per-layer,uniform")
    p.add_argument("--shapes", type=common.shapes, default=[(1, 128), (1, 512), (8, 128)], help="BxS list")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy generation length")
    p.add_argument("--gen-rounds", type=int, default=3)
    p.add_argument("--prune-steps", type=int, default=10, help="fine-tuning steps used to make each pruned model")
    p.add_argument("--save", help="folder to save each pruned model in (one sub-folder per variant)")
    p.add_argument("recipes", nargs="*", help="NAME=CRITERION:RATIO[:setting=value,...] instead of the grid")
    return p


def variant_configs(args) -> dict[str, PruneConfig]:
    """The pruned variants: the recipes given, or every ratio x layout."""
    brief = dict(steps=args.prune_steps, batch_size=1, prune_freq=1, seed=args.seed, distill=0.0)
    if args.recipes:
        runs = [parse_run(spec) for spec in args.recipes]
        return {name: PruneConfig(**{**brief, "criterion": criterion, "ratio": ratio, **settings})
                for name, criterion, ratio, settings in runs}  # fmt: skip
    layouts = [x for x in args.layouts.split(",") if x]
    return {f"{ratio:g} {layout}": PruneConfig(ratio=ratio, uniform=layout == "uniform", **brief)
            for ratio in args.ratios for layout in layouts}  # fmt: skip


def macs_per_token(model, head_dim: int, seq_len: int) -> dict:
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    heads = [m.out_features // head_dim for n, m in model.named_modules() if n.endswith("q_proj")]
    attention = sum(2 * h * head_dim * (seq_len + 1) / 2 for h in heads)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    base, tokenizer = common.load(args, model, tokenizer)
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    train_text = load_text(args.data, "train")
    variants = {"dense": common.fresh(base).eval()}
    for name, config in variant_configs(args).items():
        pruned, report = prune(common.fresh(base), tokenizer, train_text, config, progress=False)
        variants[name] = pruned.eval()
        if args.save:
            save_pruned(pruned, tokenizer, Path(args.save) / name.replace(" ", "-"), report)
    names = list(variants)

    g = torch.Generator().manual_seed(args.seed)
    inputs = {(b, s): torch.randint(0, cfg.vocab_size, (b, s), generator=g) for b, s in args.shapes}
    timer = common.Timer()

    def forward(m, ids):
        with torch.inference_mode():
            m(input_ids=ids, use_cache=False)

    for shape, ids in inputs.items():
        for name in names:  # one untimed warmup each
            forward(variants[name], ids)
        for _, name in common.alternated(names, args.rounds):
            timer.time(f"{name} {shape}", forward, variants[name], ids)

    prompt = common.token_windows(tokenizer, args.data, "test", 16, 1)

    def generate(m):
        with torch.inference_mode():
            m.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    for name in names:
        generate(variants[name])
    for _, name in common.alternated(names, args.gen_rounds):
        timer.time(f"{name} generate", generate, variants[name])

    rows = []
    for name in names:
        for b, s in args.shapes:
            dense_macs = macs_per_token(variants["dense"], head_dim, s)["total"]
            macs = macs_per_token(variants[name], head_dim, s)
            speedup = timer.median(f"dense {(b, s)}") / timer.median(f"{name} {(b, s)}")
            limit = dense_macs / macs["total"]
            rows.append(
                {
                    "variant": name,
                    "shape": f"{b}x{s}",
                    "median_s": timer.median(f"{name} {(b, s)}"),
                    "macs_per_token": macs,
                    "speedup": speedup,
                    "mac_limit": limit,
                    "achieved_over_limit": (speedup - 1) / (limit - 1) if limit > 1 else None,
                    "speedup_over_limit": speedup / limit,
                }
            )
        tps = args.new_tokens / timer.median(f"{name} generate")
        rows.append({"variant": name, "shape": f"generate {args.new_tokens}", "tokens_per_s": tps})
    dense_tps = next(r["tokens_per_s"] for r in rows if r["variant"] == "dense" and "tokens_per_s" in r)
    for r in rows:
        if "tokens_per_s" in r:
            r["speedup"] = r["tokens_per_s"] / dense_tps
        print(f"[speed] {r}", flush=True)

    params = {n: sum(p.numel() for p in m.parameters()) for n, m in variants.items()}
    return publish.publish(args, argv, NAME, "4. Inference speed: dense vs pruned", {"rows": rows, "params": params})


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    args, rows = payload["args"], payload["rows"]
    fwd = [
        [
            r["variant"],
            r["shape"],
            r["median_s"] * 1e3,
            f"{r['macs_per_token']['total'] / 1e6:.4g}M",
            r["speedup"],
            r["mac_limit"],
            f"{r['speedup_over_limit']:.0%}",
        ]
        for r in rows
        if "median_s" in r
    ]
    gen = [[r["variant"], r["tokens_per_s"], r["speedup"]] for r in rows if "tokens_per_s" in r]
    return (
        f"Model `{args.get('model', common.DEFAULT_MODEL)}`; {args['rounds']} alternated rounds per shape (medians); "
        "the pruned models come from "
        f"{args['prune_steps']} steps of `prune()` (the ratio fixes their shapes); greedy generation of "
        f"{args['new_tokens']} tokens from a 16-token prompt, {args['gen_rounds']} rounds. MACs per token count the "
        "LM head and attention at the mean causal context; the MAC limit is dense MACs / pruned MACs.\n\n"
        + common.table(["model", "shape", "median ms", "MACs/token", "speedup", "MAC limit", "speedup / limit"], fwd)
        + "\n\n"
        + common.table(["model", "greedy tokens/s (median)", "speedup"], gen)
    )


if __name__ == "__main__":
    main()
