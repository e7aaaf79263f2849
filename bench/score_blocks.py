"""Score blocks: the time of one score update (`Pruner.update_scores`) by how scoring.py walks a
projection (the rows of a block, reused or fresh buffers), at the shape of a published model.

The model is built as bench/scale.py builds it (random weights in bf16, LoRA on every projection),
one backward gives the LoRA factors their gradients, and then the score update is timed with each
variant in turn, alternated in one process (ABBA), medians reported. `default` is what prune does
(scoring.score_block_rows: a byte budget per block; the transients in reused buffers); `rowsN` is N
rows per block whatever the width (1024 was the block before the byte budget); `fresh` allocates
every transient anew, as scoring did before the reused buffers. `--return-freed-memory` runs it
under the allocator setting of a run near the RAM limit (tools/preflight.return_freed_memory).
"""

import torch

from loraprune.pipeline import importance, scoring
from loraprune.tools.preflight import return_freed_memory

from . import common, publish
from .scale import DTYPES, Stepper, build
from .shapes import SHAPES, model_config

NAME = "score_blocks"


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="llama-3.2-1b", choices=list(SHAPES))
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--criterion", default="lora")
    p.add_argument("--variants", default="default,rows1024,fresh", help="default, rowsN or fresh")
    p.add_argument("--rounds", type=int, default=6, help="timed score updates per variant")
    p.add_argument("--return-freed-memory", action="store_true", help="as a run near the RAM limit")
    return p


def fresh_buffer(scratch, slot, shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def use(variant: str, block_rows, get) -> None:
    """Make scoring walk projections as `variant` says (`block_rows`, `get`: what prune uses)."""
    fixed = variant.startswith("rows") and int(variant.removeprefix("rows"))
    scoring.score_block_rows = (lambda in_features, dtype: fixed) if fixed else block_rows
    importance.Scratch.get = fresh_buffer if variant == "fresh" else get


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    if args.return_freed_memory:
        return_freed_memory()
    stepper = Stepper(build(model_config(args.size), DTYPES[args.dtype]), args.criterion, args.seed)
    batch = torch.randint(0, stepper.base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    from loraprune.tasks.causal_lm import causal_lm_loss

    causal_lm_loss(stepper.model, batch).backward()  # the gradients every timed update reads
    variants, timer = [v for v in args.variants.split(",") if v], common.Timer()
    block_rows, get = scoring.score_block_rows, importance.Scratch.get
    try:
        for r, name in common.alternated(variants, args.rounds + 1):
            use(name, block_rows, get)
            timer.time(name if r else "warmup", stepper.pruner.update_scores)
    finally:
        use("default", block_rows, get)
    base = timer.median(variants[0])
    rows = [{"variant": v, "median_s": timer.median(v), "ratio": timer.median(v) / base, "samples": timer.samples[v]}
            for v in variants]  # fmt: skip
    for row in rows:
        print(f"[{NAME}] {args.size} {row['variant']}: {row['median_s']:.3f} s, x{row['ratio']:.2f}", flush=True)
    info, cmd = common.machine(), common.command(argv, f"bench.{NAME}")
    payload = {"benchmark": NAME, "label": args.label, "args": vars(args), "machine": info, "command": cmd,
               "block_bytes": scoring.SCORE_BLOCK_BYTES, "rows": rows}  # fmt: skip
    tight = "-tight" if args.return_freed_memory else ""
    common.write_json(args, f"{NAME}-{args.size}{tight}", payload)
    publish.write_page(args, NAME, f"{NAME}-{args.size}{tight}-{args.label}", f"Score blocks: {args.size}{tight}")
    return payload


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    a = payload["args"]
    allocator = (
        "glibc returning every freed block of 256 KiB or more to the system at once, as `prune` sets it on a run "
        "near the RAM limit"
        if a["return_freed_memory"]
        else "glibc's default allocator settings"
    )
    return (
        f"The {a['size']} shape in {a['dtype']}, criterion `{a['criterion']}`, {a['rounds']} timed score updates "
        f"per variant, alternated in one process (medians); {allocator}. Blocks of "
        f"{payload['block_bytes'] // 2**20} MiB by default.\n\n"
        + common.table(
            ["variant", "median s", "vs default"], [[r["variant"], r["median_s"], r["ratio"]] for r in payload["rows"]]
        )
    )


if __name__ == "__main__":
    main()
