"""Memory: peak memory of LoRAPrune training steps (forward, backward, importance update,
optimizer step) with the `lora` criterion vs the vanilla `gradient` criterion (true dL/dW0).

Each (criterion, batch) runs in a fresh subprocess. On CPU the peak is the process's peak RSS
(VmHWM, reset via /proc/self/clear_refs after loading, so loading's transients do not count);
on CUDA it is torch.cuda.max_memory_allocated. The breakdown is computed from shapes: base
weights, LoRA factors, their gradients, AdamW state, the base-weight gradients the `gradient`
criterion needs, and the tensors autograd saves for backward (counted once per storage by a
saved-tensors hook on one extra forward). With `--distill ALPHA` the `--distill-criterion` is also
measured with self-distillation from the dense model (its loss as `prune` builds it; with
`--distill-top-k K` from the dense model's top-K, computed before the peak is reset). Each row also
gives what `loraprune estimate` predicts for it.
"""

import json
import subprocess
import sys

import torch

from . import common, publish
from .scale import release, reset_peak, rss_kib

NAME = "memory"
MiB = 2**20


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--criteria", default="lora,gradient,sketch")
    p.add_argument("--batches", type=common.shapes, default=[(1, 128), (4, 128)], help="BxS list")
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--distill", type=float, default=0.0, help="also measure --distill ALPHA (0: no)")
    p.add_argument("--distill-criterion", default="lora", help="the criterion measured with --distill")
    p.add_argument(
        "--distill-top-k",
        type=int,
        default=0,
        help="with --distill: from the dense model's top-K computed up front (0: the live teacher)",
    )
    p.add_argument("--child", default="", help="internal: criterion,B,S,distill,top-k of one child run")
    return p


def child(args) -> dict:
    from loraprune import PruneConfig, load_model
    from loraprune.archs import arch_for
    from loraprune.pipeline.lora import attach_lora
    from loraprune.pipeline.pruner import Pruner
    from loraprune.pruning import training_loss
    from loraprune.tasks import TASKS
    from loraprune.tools.estimate import run_estimate
    from loraprune.tools.preflight import return_freed_memory

    return_freed_memory()  # as `loraprune prune` does on a run near the RAM limit
    criterion, b, s, distill, top_k = args.child.split(",")
    b, s, distill, top_k = int(b), int(s), float(distill), int(top_k)
    cuda = args.device.startswith("cuda")
    runtime_kib = rss_kib("VmRSS")
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    batch = common.token_windows(tokenizer, args.data, "train", s, b)
    if len(batch) < b:
        batch = batch.repeat((b + len(batch) - 1) // len(batch), 1)[:b]
    batch = batch.to(args.device)  # (top-k targets stay on the host, as in a run)
    config = PruneConfig(criterion=criterion, batch_size=b, seq_len=s, seed=args.seed, distill=distill,
                         distill_top_k=top_k)  # fmt: skip
    if top_k:  # as causal_lm.examples makes the batch: computed before training, memory-mapped
        from loraprune.pipeline.teacher_cache import top_k_targets

        ids, log_p = top_k_targets(model, batch, top_k)
        batch = {"input_ids": batch, "teacher_ids": ids, "teacher_log_p": log_p}
    arch = arch_for(model.config)
    peft_model = attach_lora(model, arch, config)
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    loss_fn = training_loss(TASKS["causal-lm"], peft_model, pruner, config)
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.AdamW(lora, lr=1e-4, weight_decay=0.0)
    peft_model.train()
    release()  # freed memory back to the system, and the peak (VmHWM) reset to the current RSS
    loaded_kib = rss_kib("VmRSS")
    reset_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded_cuda = torch.cuda.memory_allocated()
    for _ in range(args.steps):  # the body of loraprune.pipeline.train.train, one optimizer step
        loss_fn(peft_model, batch).backward()
        pruner.update_scores()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak_kib = rss_kib("VmHWM")
    out = {"criterion": criterion, "distill": distill, "distill_top_k": top_k, "batch": b, "seq_len": s,
           "device": args.device}  # fmt: skip
    estimate = run_estimate(model.config, config, "float32", args.device)
    out["estimated_peak_MiB"] = estimate.peak / MiB
    out["measured"] = {
        "runtime_rss_MiB": runtime_kib / 1024,
        "loaded_rss_MiB": loaded_kib / 1024,
        "peak_rss_MiB": peak_kib / 1024,
        "peak_above_runtime_MiB": (peak_kib - runtime_kib) / 1024,
    }
    if cuda:
        torch.cuda.synchronize()
        out["measured"]["cuda_loaded_MiB"] = loaded_cuda / MiB
        out["measured"]["cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / MiB

    # breakdown from shapes
    def size(ps):
        return sum(p.numel() * p.element_size() for p in ps)

    base = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    saved = {}
    # weights reach the hook as views (e.g. W.t()): count only storages that are not parameters'
    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            st = t.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(peft_model, batch)
    del loss
    weight_grads = size(pruner.scored_weights)
    out["breakdown_MiB"] = {
        "base weights": size(base) / MiB,
        "LoRA factors": size(lora) / MiB,
        "LoRA gradients": size(lora) / MiB,
        "AdamW state": 2 * size(lora) / MiB,
        "base-weight gradients (dL/dW0)": weight_grads / MiB,
        "saved activations": sum(saved.values()) / MiB,
        "loss transients (a chunk of logits)": estimate.loss_transient / MiB,
    }
    out["breakdown_total_MiB"] = sum(out["breakdown_MiB"].values())
    out["parameters"] = {"base": sum(p.numel() for p in base), "lora": sum(p.numel() for p in lora)}
    return out


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return {}
    variants = [(c, 0.0) for c in args.criteria.split(",") if c]
    variants += [(args.distill_criterion, args.distill)] if args.distill else []
    runs = []
    for b, s in args.batches:
        for _, (criterion, distill) in common.alternated(variants, 1):
            cmd = [sys.executable, "-m", "bench.memory", "--model", args.model, "--data", args.data]
            cmd += ["--steps", str(args.steps), "--device", args.device, "--seed", str(args.seed)]
            top_k = args.distill_top_k if distill else 0
            cmd += ["--threads", str(args.threads), "--child", f"{criterion},{b},{s},{distill},{top_k}"]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise RuntimeError(f"memory child {criterion} {b}x{s} failed:\n{done.stderr[-3000:]}")
            run = json.loads(lines[-1][len("RESULT ") :])
            runs.append(run)
            print(f"[memory] {criterion} {b}x{s}: {run['measured']}", flush=True)

    key = "cuda_peak_MiB" if args.device.startswith("cuda") else "peak_rss_MiB"
    ratios = []
    for b, s in args.batches:
        at = {r["criterion"]: r for r in runs if (r["batch"], r["seq_len"]) == (b, s) and not r["distill"]}
        if "lora" in at and "gradient" in at:
            lo, gr = at["lora"]["measured"], at["gradient"]["measured"]
            ratios.append(
                {
                    "batch": f"{b}x{s}",
                    "peak_ratio": lo[key] / gr[key],
                    "peak_above_runtime_ratio": lo["peak_above_runtime_MiB"] / gr["peak_above_runtime_MiB"],
                    "met": lo[key] / gr[key] <= 0.5,
                }
            )
    return publish.publish(args, argv, NAME, "2. Memory: lora vs gradient criterion", {"runs": runs, "ratios": ratios})


def mib(value: float | None) -> str:
    """MiB as the tables show them: whole above 100, one decimal below."""
    return "" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON)."""
    args, runs = payload["args"], payload["runs"]
    parts = list(runs[0]["breakdown_MiB"])
    cuda = args["device"].startswith("cuda")
    rows = []
    for r in runs:
        m = r["measured"]
        rows.append(
            [
                r["criterion"]
                + (f", distill {r['distill']:g}" if r.get("distill") else "")
                + (f", top-{r['distill_top_k']}" if r.get("distill_top_k") else ""),
                f"{r['batch']}x{r['seq_len']}",
                *[mib(v) for v in (m.get("cuda_peak_MiB", m["peak_rss_MiB"]), r.get("estimated_peak_MiB"))],
                *[mib(v) for v in (m["peak_above_runtime_MiB"], *[r["breakdown_MiB"][k] for k in parts])],
                mib(r["breakdown_total_MiB"]),
            ]
        )
    ratios = [[r["batch"], r["peak_ratio"], r["peak_above_runtime_ratio"]] for r in payload["ratios"]]
    return (
        f"{args['steps']} training steps per fresh process (forward, backward, importance update, AdamW step), "
        f"LoRA r=8 on all 7 projections, float32, device {args['device']}; MiB. 'above runtime': the peak less the "
        "RSS of the bare Python and torch process before loading; 'estimate': what `loraprune estimate` expects "
        "for the same run; 'sum of parts': the breakdown's sum, counted from the shapes.\n\n"
        + common.table(
            [
                "criterion",
                "batch",
                "peak CUDA alloc" if cuda else "peak RSS",
                "estimate",
                "above runtime",
                *parts,
                "sum of parts",
            ],
            rows,
        )  # fmt: skip
        + (
            "\n\n" + common.table(["batch", "peak lora / peak gradient", "same, above runtime"], ratios)
            if ratios
            else ""
        )
    )


if __name__ == "__main__":
    main()
