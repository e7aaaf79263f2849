"""Scale: peak memory and step time of LoRAPrune at the shapes of published 0.36B-7B models, on CPU.

The paper's memory claim (LoRA-guided 18.3 GB vs true-gradient 38.6 GB on LLaMA-7B) is about
sizes where dL/dW0 is as large as the model. Models are built from their published configurations,
typed in below (nothing is downloaded; random weights are enough for memory and time), directly in
bf16 on the meta device and then filled, so a 7B model never needs float32 memory.

For every size and criterion (lora, sketch, gradient) one fresh process measures, in turn, each
point (batch x sequence, gradient checkpointing off/on): the peak RSS of LoRAPrune steps (forward,
backward, score update, AdamW step; the RSS high-water mark is reset before each point, after the
previous point's memory is returned to the system), the median step time, and the share of the
step spent in the score update. The AdamW state exists before measuring (one step on zero
gradients, which leaves the factors unchanged), so the first measured step holds everything a
run holds. Before a point is run, the memory pre-flight of `loraprune prune` (`estimate` against
MemAvailable) decides whether it fits; a point that does not is not run and shows its estimate.

Each size writes bench/results/scale-<size>.json as soon as it is done (a run can be resumed size
by size: `--sizes` and `--skip-done`); the table and the plot are built from every such file
present (`--render-only`). This module is also the shared core of gpu_scale.py and memory.py:
building a model of a shape, one measured LoRAPrune step, peak memory of a device, children.
"""

import ctypes
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import common, publish, scale_report
from .shapes import SHAPES, SIZES, model_config

NAME = "scale"
GiB = 2**30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build(config, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """A model of `config` with random weights, made on the meta device and materialised on `device`
    in `dtype`: no float32 copy, and no slow per-layer init (weights are copied from a small random
    pool at random offsets: fine for memory and time, meaningless for quality)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives a tied LM head its own copy: 0.5-0.7 GiB more at the Llama-3.2 shapes
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 22, generator=g) * 0.02).to(dtype=dtype, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            if p.dim() == 1:  # norms 1, biases 0
                flat.fill_(1.0 if "norm" in name else 0.0)
                continue
            for start in range(0, flat.numel(), len(pool)):
                n = min(len(pool), flat.numel() - start)
                offset = int(torch.randint(0, len(pool) - n + 1, (1,), generator=g))
                flat[start : start + n].copy_(pool[offset : offset + n])
    for name, module in list(model.named_modules()):  # non-persistent buffers: to_empty left them garbage
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            parent, _, child = name.rpartition(".")
            with torch.device(device):
                model.get_submodule(parent).register_module(child, type(module)(config=module.config))
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def release(device: str = "cpu") -> None:
    """Return freed memory to the system (glibc keeps freed small blocks otherwise), then reset the peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_peak()


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM back to the current RSS
            f.write("5")
    except OSError:
        pass


def peak_bytes(device: str) -> int:
    """Peak since the last reset: CUDA allocations, or the process's RSS high-water mark."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    hwm = rss_kib("VmHWM")
    return (hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Stepper:
    """LoRA, a Pruner and AdamW on a model, as `prune()` sets them up; `measure` runs steps."""

    def __init__(self, model, criterion: str, seed: int = 0, lora_r: int = 8):
        from loraprune import PruneConfig
        from loraprune.archs import arch_for
        from loraprune.pipeline.lora import attach_lora
        from loraprune.pipeline.pruner import Pruner
        from loraprune.pipeline.train import lora_optimizer

        self.base, self.criterion = model, criterion
        config = PruneConfig(ratio=0.5, criterion=criterion, seed=seed, lora_r=lora_r, lora_alpha=2.0 * lora_r)
        arch = arch_for(model.config)
        self.model = attach_lora(model, arch, config)
        self.pruner = Pruner(self.model.get_base_model(), arch, config)
        self.optimizer = lora_optimizer(self.model, lr=1e-4)
        lora = [p for group in self.optimizer.param_groups for p in group["params"]]
        for p in lora:  # AdamW's state now, so that the first measured step holds all of a run's memory
            p.grad = torch.zeros_like(p)
        self.optimizer.step()  # zero gradients, no weight decay: the factors do not change
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()

    def checkpointing(self, on: bool) -> None:
        from loraprune.pipeline.train import is_activation_checkpointing, set_activation_checkpointing

        if on or is_activation_checkpointing(self.base):  # as prune() does
            set_activation_checkpointing(self.base, on)

    def measure(self, batch: torch.Tensor, steps: int, device: str) -> dict:
        """`steps` LoRAPrune steps on `batch`: peak memory (reset first), median step and scoring time."""
        from loraprune.tasks.causal_lm import causal_lm_loss

        release(device)
        before = peak_bytes(device)
        step_s, score_s = [], []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            causal_lm_loss(self.model, batch).backward()
            sync(device)
            scoring = time.perf_counter()
            self.pruner.update_scores()
            sync(device)
            score_s.append(time.perf_counter() - scoring)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync(device)
            step_s.append(time.perf_counter() - start)
        step, score = statistics.median(step_s), statistics.median(score_s)
        return {"peak_bytes": peak_bytes(device), "start_bytes": before, "step_s": step_s, "median_step_s": step,
                "median_score_s": score, "score_share": score / step}  # fmt: skip


def points(text: str) -> list[tuple[int, int, bool]]:
    """'1x128:off,1x512:on' -> [(1, 128, False), (1, 512, True)]"""
    out = []
    for part in filter(None, text.split(",")):
        shape, _, ckpt = part.partition(":")
        b, s = common.shapes(shape)[0]
        out.append((b, s, ckpt == "on"))
    return out


def point_name(b: int, s: int, ckpt: bool) -> str:
    return f"{b}x{s}:{'on' if ckpt else 'off'}"


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--criteria", default="lora,gradient,sketch")
    p.add_argument("--points", default="1x128:on,1x128:off,1x512:on,1x512:off",
                   help="BxS:checkpointing (off/on), in order; one process a size and criterion")  # fmt: skip
    p.add_argument("--steps", type=int, default=2, help="measured steps per point (median time)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--skip-done", action="store_true", help="skip sizes whose JSON is already in --results")
    p.add_argument("--render-only", action="store_true", help="only rebuild the table and plot from the JSON present")
    p.add_argument("--child", default="", help="internal: SIZE,CRITERION of one child process")
    return p


def child(args) -> None:
    """One size and criterion: print 'RESULT {json}' after each point (a later crash keeps them)."""
    from loraprune.tools.preflight import return_freed_memory

    return_freed_memory()  # as `loraprune prune` does on a run near the RAM limit
    size, criterion = args.child.split(",")
    runtime = rss_kib("VmRSS") * 1024
    started = time.perf_counter()
    model = build(model_config(size), DTYPES[args.dtype])
    built_s = time.perf_counter() - started
    stepper = Stepper(model, criterion, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    for b, s, ckpt in points(args.points):
        stepper.checkpointing(ckpt)
        batch = torch.randint(0, model.config.vocab_size, (b, s), generator=g)
        row = {"size": size, "criterion": criterion, "point": point_name(b, s, ckpt), "batch": b, "seq_len": s,
               "checkpointing": ckpt, "runtime_bytes": runtime, "build_s": built_s, "steps": args.steps}  # fmt: skip
        row.update(stepper.measure(batch, args.steps, "cpu"))
        print("RESULT " + json.dumps(row), flush=True)


def run_size(args, size: str) -> list[dict]:
    """Every criterion and point of one size: measured in children where the pre-flight says it fits."""
    from loraprune.tools.estimate import available_bytes, estimate

    config = model_config(size)
    rows = []
    for criterion in filter(None, args.criteria.split(",")):
        todo, skipped = [], []
        for b, s, ckpt in points(args.points):
            est = estimate(config, b, s, dtype=args.dtype, criterion=criterion, gradient_checkpointing=ckpt)
            row = {"size": size, "criterion": criterion, "point": point_name(b, s, ckpt), "batch": b, "seq_len": s,
                   "checkpointing": ckpt, "estimate_bytes": est.peak, "estimate": est.parts(),
                   "available_bytes": available_bytes("cpu")}  # fmt: skip
            (todo if est.peak <= row["available_bytes"] else skipped).append(row)
        for row in skipped:
            row["fits"] = False
            print(f"[{NAME}] {size} {criterion} {row['point']}: does not fit (estimate "
                  f"{row['estimate_bytes'] / GiB:.1f} GiB, available {row['available_bytes'] / GiB:.1f} GiB)",
                  flush=True)  # fmt: skip
        if todo:
            cmd = [sys.executable, "-m", f"bench.{NAME}", "--child", f"{size},{criterion}", "--dtype", args.dtype,
                   "--steps", str(args.steps), "--seed", str(args.seed), "--threads", str(args.threads),
                   "--points", ",".join(r["point"] for r in todo)]  # fmt: skip
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.ROOT)
            by_point = {r["point"]: r for r in todo}
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    measured = json.loads(line[len("RESULT ") :])
                    row = by_point[measured["point"]]
                    row.update(measured, fits=True)
                    print(f"[{NAME}] {size} {criterion} {row['point']}: peak {row['peak_bytes'] / GiB:.2f} GiB "
                          f"(estimate {row['estimate_bytes'] / GiB:.2f}), step {row['median_step_s']:.1f} s, scoring "
                          f"{row['score_share']:.1%} ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
            error = proc.stderr.read()
            if proc.wait() != 0:
                for row in todo:
                    if "peak_bytes" not in row:
                        row.update(fits=True, failed=f"exit {proc.returncode}: {error[-500:]}")
                print(
                    f"[{NAME}] {size} {criterion}: child failed (exit {proc.returncode}): {error[-2000:]}", flush=True
                )
        rows += todo + skipped
    return rows


def parameters(config) -> dict:
    from loraprune.tools.estimate import model_counts

    return model_counts(config)


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    if args.child:
        child(args)
        return {}
    results = Path(args.results)
    if not args.render_only:
        for size in filter(None, args.sizes.split(",")):
            if args.skip_done and (results / f"{NAME}-{size}.json").exists():
                print(f"[{NAME}] {size}: already in {results}, skipped", flush=True)
                continue
            started = time.perf_counter()
            print(f"[{NAME}] {size}: {parameters(model_config(size))['parameters'] / 1e9:.2f}B parameters", flush=True)
            rows = run_size(args, size)
            info = common.machine()
            payload = {"benchmark": NAME, "size": size, "label": args.label, "args": vars(args), "machine": info,
                       "command": common.command(argv, f"bench.{NAME}"), "config": SHAPES[size][1],
                       "model_type": SHAPES[size][0], "counts": parameters(model_config(size)), "rows": rows,
                       "seconds": time.perf_counter() - started}  # fmt: skip
            results.mkdir(parents=True, exist_ok=True)
            (results / f"{NAME}-{size}.json").write_text(json.dumps(payload, indent=2) + "\n")
            print(f"[{NAME}] {size} done in {time.perf_counter() - started:.0f} s", flush=True)
    return render(args)


def render(args) -> dict:
    """After a run (or --render-only): the plot from every scale-*.json in --results, then the page."""
    rows, payloads = scale_report.load_rows(Path(args.results))
    if not rows:
        print("[scale] no scale-*.json in", args.results)
        return {}
    scale_report.plot(args, rows, payloads)
    publish.write_page(args, "scale", "memory-scale", scale_report.TITLE)
    return {"rows": rows, "numbers": scale_report.tables(rows)[2]}


if __name__ == "__main__":
    main()
