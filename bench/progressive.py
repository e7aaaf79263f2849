"""Progressive shrinking: wall time, memory and perplexity of `--shrink progressive` vs `--shrink end`.

`end` (the masked run) keeps every layer dense until training ends; `progressive` cuts the dead
heads and channels out at each pruning step, so later steps run on a smaller model. Both run the
same budget, one fresh process per run (so that each has its own peak memory), the two modes
alternated (ABBA over rounds). Reported per run: the pruning loop's wall time (train(), which
includes the shrinks), the sum of the per-step times, the parameter count per step, the peak RSS
per phase (load; set-up: examples, LoRA, Pruner; pruning loop; final shrink + merge; evaluation;
each phase's peak is VmHWM after a reset at its start, via /proc/self/clear_refs), and
perplexity on the first --eval-windows test windows.
"""

import json
import statistics
import subprocess
import sys
import time

from . import common, publish
from .scale import reset_peak, rss_kib

NAME = "progressive"
MODES = ("end", "progressive")
# the flags a child run inherits from its parent
CHILD_FLAGS = (
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "prune_freq",
    "eval_windows",
    "eval_seq",
    "seed",
    "threads",
    "criterion",
)


def arguments():
    p = common.budget_arguments(common.parser(__doc__.splitlines()[0]))
    p.add_argument("--ratios", type=common.floats, default=[0.5, 0.2])
    p.add_argument("--rounds", type=int, default=1, help="runs of each mode per ratio (alternated)")
    p.add_argument("--criterion", default="streamed", help="scoring criterion of every run (default: the tool's)")
    p.add_argument("--child", default="", help="internal: ratio,mode of one child run")
    p.add_argument("--in-process", action="store_true",
                   help="every run in this process on copies of one loaded model (no reload per run; peak RSS "
                        "per phase then also holds what earlier runs left in the heap)")  # fmt: skip
    return p


class Phases:
    """Peak RSS (VmHWM) of consecutive phases of one process, in MiB."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.current = None

    def start(self, name: str) -> None:
        self.stop()
        reset_peak()  # the phase's peak starts from the current RSS
        self.current, self.started[name] = name, time.perf_counter()

    def stop(self) -> None:
        if self.current is not None:
            self.peaks[self.current] = rss_kib("VmHWM") / 1024
            self.started[self.current] = time.perf_counter() - self.started[self.current]
            self.current = None


def child(args, ratio: float, mode: str, loaded=None) -> dict:
    """One run of `mode` at `ratio`: on a fresh load of the model, or on a copy of `loaded` (model, tokenizer)."""
    import torch

    import loraprune.pruning as pruning
    from loraprune import load_model, prune
    from loraprune.pipeline.evaluate import perplexity
    from loraprune.pipeline.texts import load_text

    phases = Phases()
    phases.start("load")
    model, tokenizer = load_model(args.model) if loaded is None else (common.fresh(loaded[0]), loaded[1])
    text = load_text(args.data, "train")
    eval_set = common.token_windows(tokenizer, args.data, "test", args.eval_seq, args.eval_windows or None)
    phases.start("set-up")
    real_train = pruning.train

    def timed_train(*a, **kw):  # the pruning loop, its own phase
        phases.start("pruning loop")
        try:
            return real_train(*a, **kw)
        finally:
            phases.start("shrink + merge")

    pruning.train = timed_train
    config = common.budget(args, float(ratio), args.criterion, shrink=mode)
    torch.manual_seed(args.seed)
    try:
        pruned, report = prune(model, tokenizer, text, config, progress=False)
    finally:
        pruning.train = real_train
    phases.start("evaluation")
    ppl = perplexity(pruned, eval_set)
    phases.stop()
    history = report["history"]
    return {
        "ratio": float(ratio),
        "mode": mode,
        "loop_seconds": phases.started["pruning loop"],
        "step_seconds_sum": sum(history["step_seconds"]),
        "step_seconds": history["step_seconds"],
        "parameters": history["parameters"],
        "pruning_steps": history["pruning_steps"],
        "peak_rss_MiB": phases.peaks,
        "phase_seconds": phases.started,
        "perplexity": ppl["perplexity"],
        "eval_tokens": ppl["tokens"],
        "parameters_after": report["parameters"]["after"]["total"],
        "parameters_before": report["parameters"]["before"]["total"],
        "heads_removed": report["removed"]["heads"],
        "final_loss": history["loss"][-1],
    }


def _run_child(args, ratio: float, mode: str) -> dict:
    cmd = [sys.executable, "-m", "bench.progressive", "--model", args.model, "--data", args.data]
    for flag in CHILD_FLAGS:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--child", f"{ratio},{mode}", "--markdown", ""]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"progressive child {ratio} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None, model=None, tokenizer=None) -> dict:
    args = arguments().parse_args(argv)
    common.setup(args)
    if args.child:
        ratio, mode = args.child.split(",")
        print("RESULT " + json.dumps(child(args, float(ratio), mode)), flush=True)
        return {}
    loaded = common.load(args, model, tokenizer) if args.in_process else None
    runs = []
    for i, ratio in enumerate(args.ratios):  # ABBA over rounds, and each ratio starts with the other mode
        for _, mode in common.alternated(list(MODES if i % 2 == 0 else reversed(MODES)), args.rounds):
            run = child(args, ratio, mode, loaded) if args.in_process else _run_child(args, ratio, mode)
            runs.append(run)
            print(f"[progressive] ratio {ratio} {mode}: loop {run['loop_seconds']:.1f} s, "
                  f"ppl {run['perplexity']:.2f}, peaks {run['peak_rss_MiB']}", flush=True)  # fmt: skip

    summary = []
    for ratio in args.ratios:
        at = {mode: [r for r in runs if r["ratio"] == ratio and r["mode"] == mode] for mode in MODES}
        loop = {mode: statistics.median([r["loop_seconds"] for r in at[mode]]) for mode in MODES}
        ppl = {mode: statistics.median([r["perplexity"] for r in at[mode]]) for mode in MODES}
        target = 0.75 if ratio >= 0.5 else 0.9
        summary.append({"ratio": ratio, "loop_ratio": loop["progressive"] / loop["end"], "target": target,
                        "met": loop["progressive"] / loop["end"] <= target,
                        "perplexity_ratio": ppl["progressive"] / ppl["end"]})  # fmt: skip
    title = "8. Progressive shrinking: pruning-loop time, memory and perplexity (`--shrink progressive` vs `end`)"
    return publish.publish(args, argv, NAME, title, {"runs": runs, "summary": summary})


def section(payload: dict, page, results) -> str:
    """The page's section of one run (its JSON): every child run, then progressive against end per ratio."""
    args, runs = payload["args"], payload["runs"]
    rows = []
    for r in runs:
        peaks, steps = r["peak_rss_MiB"], r["step_seconds"]
        tenth = max(1, len(steps) // 10)
        mib = [
            round(peaks[phase]) if phase in peaks else None
            for phase in ("pruning loop", "shrink + merge", "evaluation")
        ]
        rows.append([r["ratio"], r["mode"], round(r["loop_seconds"]), statistics.median(steps[:tenth]),
                     statistics.median(steps[-tenth:]), f"{r['parameters'][-1] / 1e6:.1f}", *mib,
                     f"{r['perplexity']:.2f}"])  # fmt: skip
    summary = []
    for ratio in dict.fromkeys(r["ratio"] for r in runs):
        at = {mode: [r for r in runs if r["ratio"] == ratio and r["mode"] == mode] for mode in MODES}
        loop = {mode: statistics.median([r["loop_seconds"] for r in at[mode]]) for mode in MODES}
        peak = {mode: max(r["peak_rss_MiB"]["pruning loop"] for r in at[mode]) for mode in MODES}
        ppl = {mode: statistics.median([r["perplexity"] for r in at[mode]]) for mode in MODES}
        # the final model's step against a dense one: what shrinking can save at most, the schedule aside
        steps = at["progressive"][0]["step_seconds"]
        tenth = max(1, len(steps) // 10)
        final = statistics.median(steps[-tenth:]) / statistics.median(steps[:tenth])
        peaks = f"{peak['progressive']:.0f} vs {peak['end']:.0f}"
        summary.append([ratio, loop["progressive"] / loop["end"], final, peaks, ppl["progressive"] / ppl["end"]])
    where = (
        "all runs in one process on copies of one loaded model"
        if args.get("in_process")
        else "one fresh process per run"
    )
    return (
        common.budget_text(args, "the test split")
        + f" Criterion `{args.get('criterion', 'lora')}`; {where}, the two modes alternated, {args['rounds']} "
        "run(s) of each per ratio. Step times: medians over the first and the last tenth of the steps.\n\n"
        + common.table(
            [
                "ratio",
                "shrink",
                "loop s",
                "step s (first tenth)",
                "step s (last tenth)",
                "params M (last step)",
                "peak RSS MiB: loop",
                "shrink+merge",
                "evaluation",
                "perplexity",
            ],
            rows,
        )  # fmt: skip
        + "\n\n"
        + common.table(
            [
                "ratio",
                "loop time progressive / end (medians)",
                "last tenth / first tenth of steps (progressive)",
                "loop peak MiB progressive vs end (largest run)",
                "perplexity progressive / end",
            ],
            summary,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main(sys.argv[1:])
