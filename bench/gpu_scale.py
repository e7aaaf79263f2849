"""At the paper's scale: a LLaMA-7B-shaped model (random weights) on a GPU, one prepared script.

The paper reports 18.3 GB (LoRA-guided) vs 38.6 GB (true gradient) for a LoRAPrune step of
LLaMA-7B at micro-batch 1 x 2048. Random weights are enough: this measures memory and time,
not quality. In one process, each variant built fresh on the device, in bf16:
1. a LoRAPrune training step (forward, backward, importance update, AdamW) with the `lora`, the
   `gradient` and the `sketch` criterion, with and without gradient checkpointing: peak
   `torch.cuda.max_memory_allocated` (reset after the model is built) and the median step time;
2. forward latency at 1 x 2048 of the dense model and of the same model with 50% of the heads
   and MLP channels of every layer removed (physically: loraprune's shrink).
Sized to finish in about 5 minutes on an H200 (a 15-minute loan leaves room for a rerun):
`python -m bench.gpu_scale --label h200`. `--shape tiny --device cpu` runs the same code in
seconds (the smoke test); on CPU the peak is the process's RSS high-water mark, which only grows.
"""

import statistics
import time

import torch

from loraprune.archs import arch_for
from loraprune.pipeline.groups import LayerGroups
from loraprune.pipeline.shrink import shrink

from . import common, publish
from .scale import DTYPES, Stepper, build, release, sync
from .shapes import model_config

NAME = "gpu_scale"
SHAPES = {"7b": "llama-7b", "tiny": "tiny"}  # LLaMA-1 7B, and the CPU smoke test's toy (shapes.SHAPES)
GB = 1e9  # the paper's GB


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--batch", type=common.shapes, default=[(1, 2048)], help="BxS of the training step")
    p.add_argument("--latency-batch", type=common.shapes, default=[(1, 2048)], help="BxS of the forward timing")
    p.add_argument("--criteria", default="lora,gradient,sketch")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to measure")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per variant (after one warmup)")
    p.add_argument("--rounds", type=int, default=10, help="timed forwards per model")
    return p


def build_shape(args) -> torch.nn.Module:
    """A randomly initialised model of `--shape`, made directly on the device in `--dtype` (scale.build)."""
    return build(model_config(SHAPES[args.shape]), DTYPES[args.dtype], args.device)


def training_step(args, criterion: str, checkpointing: bool, batch: torch.Tensor) -> dict:
    """Peak memory and median time of LoRAPrune steps of a freshly built model (scale.Stepper)."""
    release(args.device)
    model = build_shape(args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    stepper = Stepper(model, criterion, args.seed)
    stepper.checkpointing(checkpointing)
    stepper.measure(batch, 1, args.device)  # warmup
    measured = stepper.measure(batch, args.steps, args.device)
    row = {
        "criterion": criterion,
        "gradient_checkpointing": checkpointing,
        "batch": "x".join(map(str, batch.shape)),
        "peak_GB": measured["peak_bytes"] / GB,
        "weights_GB": weights / GB,
        "median_step_s": measured["median_step_s"],
        "scoring_share": measured["score_share"],
    }
    del model, stepper
    return row


def latency(args, ids: torch.Tensor) -> list[dict]:
    """Median forward time of the dense model and of its 50%-pruned copy, alternated."""
    release(args.device)
    dense = build_shape(args).eval()
    arch = arch_for(dense.config)
    groups = LayerGroups.from_config(dense.config, arch)
    pruned = build_shape(args).eval()
    layers = dense.config.num_hidden_layers
    # every other head and channel: the same shapes as any 50% per-layer pruning of this model
    heads = (torch.arange(groups.heads) % 2 == 0).expand(layers, -1).clone()
    channels = (torch.arange(groups.channels) % 2 == 0).expand(layers, -1).clone()
    shrink(pruned, arch, heads, channels)
    models = {"dense": dense, "50% pruned": pruned}
    samples = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warmup
            model(input_ids=ids, use_cache=False)
        for _, name in common.alternated(list(models), args.rounds):
            sync(args.device)
            start = time.perf_counter()
            models[name](input_ids=ids, use_cache=False)
            sync(args.device)
            samples[name].append(time.perf_counter() - start)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    dense_s = statistics.median(samples["dense"])
    return [
        {
            "model": name,
            "batch": "x".join(map(str, ids.shape)),
            "parameters": params[name],
            "median_forward_s": statistics.median(samples[name]),
            "speedup": dense_s / statistics.median(samples[name]),
        }
        for name in models
    ]


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    started = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    steps = []
    for b, s in args.batch:
        batch = torch.randint(0, 512, (b, s), generator=g).to(args.device)
        for checkpointing in [c == "on" for c in args.checkpointing.split(",") if c]:
            for criterion in [c for c in args.criteria.split(",") if c]:
                steps.append(training_step(args, criterion, checkpointing, batch))
                print(f"[{NAME}] {steps[-1]}", flush=True)
    forwards = []
    for b, s in args.latency_batch:
        forwards += latency(args, torch.randint(0, 512, (b, s), generator=g).to(args.device))
        print(f"[{NAME}] {forwards[-2:]}", flush=True)

    payload = {"benchmark": NAME, "label": args.label, "args": vars(args), "machine": common.machine(),
               "command": common.command(argv, f"bench.{NAME}"), "steps": steps, "forwards": forwards,
               "seconds": time.perf_counter() - started}  # fmt: skip
    common.write_json(args, NAME, payload)
    title = f"GPU: a LLaMA-{args.shape}-shaped model ({args.label})"
    publish.write_page(args, NAME, f"{NAME}-{args.label}", title)
    return payload


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    args, steps = payload["args"], payload["steps"]
    peaks = {}
    for row in steps:
        peaks.setdefault((row["batch"], row["gradient_checkpointing"]), {})[row["criterion"]] = row["peak_GB"]
    step_rows = []
    for r in steps:
        gradient = peaks[(r["batch"], r["gradient_checkpointing"])].get("gradient", float("nan"))
        checkpointing = "on" if r["gradient_checkpointing"] else "off"
        step_rows.append([r["batch"], checkpointing, r["criterion"], r["peak_GB"], r["weights_GB"],
                          r["median_step_s"], r["peak_GB"] / gradient])  # fmt: skip
    peak = "torch.cuda.max_memory_allocated" if args["device"].startswith("cuda") else "the RSS high-water mark"
    return (
        f"LLaMA-{args['shape']}-shaped model, random weights, {args['dtype']} on {args['device']}; peak: {peak}. "
        "The paper (LLaMA-7B, 1 x 2048): 18.3 GB with the LoRA-guided criterion against 38.6 GB with the "
        "gradient, a ratio of 0.47.\n\n"
        + common.table(
            ["batch", "grad. checkpointing", "criterion", "peak GB", "weights GB", "median step s", "peak / gradient"],
            step_rows,
        )
        + "\n\n"
        + common.table(
            ["batch", "model", "parameters", "median forward s", "speedup"],
            [
                [r["batch"], r["model"], f"{r['parameters'] / 1e9:.2f}B", r["median_forward_s"], r["speedup"]]
                for r in payload["forwards"]
            ],
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
