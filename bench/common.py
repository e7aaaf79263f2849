"""Shared helpers of the benchmark scripts: arguments and the shared fine-tuning budget, machine
info, JSON results and PNG figures (bench/publish.py writes a run's JSON and rebuilds its page in
docs/benchmarks/ from the JSON alone, so a page never shows a number that is not in bench/results).

Timing rule on a shared machine: compared variants are measured side by side, alternated, in
one process; we report medians and ratios, never a lone absolute number as a claim.
"""

import argparse
import copy
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL = "smollm2"  # also what a result measured before --model was recorded ran on
PAGES = ROOT / "docs" / "benchmarks"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec for loraprune.load_model")
    p.add_argument("--data", default="ptb", help="'ptb' or a .txt/.jsonl file (used for every split)")
    p.add_argument("--label", default="custom", help="configuration name (quick, full, ...) in the outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--results", default=str(RESULTS), help="folder of the JSON results")
    p.add_argument(
        "--markdown",
        default=None,
        help="where the page goes: by default docs/benchmarks/<page>.md, rebuilt from every JSON of the "
        "benchmark in --results; a FILE.md gets the page as a marked section instead (several benchmarks can "
        "share one file); '' writes no page",
    )
    return p


# flag -> (type, default) of the fine-tuning budget `budget()` reads
BUDGET_FLAGS = {
    "--steps": (int, 120),
    "--batch-size": (int, 4),
    "--seq-len": (int, 128),
    "--lr": (float, 5e-4),
    "--prune-freq": (int, 10),
}


def budget_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the budget flags and the perplexity flags (--eval-windows, --eval-seq) to `p`."""
    for flag, (kind, default) in BUDGET_FLAGS.items():
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--eval-windows", type=int, default=0, help="first N --eval-seq windows per split (0: all)")
    p.add_argument("--eval-seq", type=int, default=128, help="window length of the perplexity")
    return p


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def shapes(text: str) -> list[tuple[int, int]]:
    """'1x128,8x128' -> [(1, 128), (8, 128)]"""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def load(args, model=None, tokenizer=None):
    """(model, tokenizer): the ones given (run_all loads once) or freshly loaded from args.model."""
    if model is None:
        from loraprune import load_model

        model, tokenizer = load_model(args.model)
    return model, tokenizer


def prepare(parser: argparse.ArgumentParser, argv, model=None, tokenizer=None):
    """(args, model, tokenizer) of a script's main(): parsed arguments, torch threads set, and the
    model given or loaded."""
    args = parser.parse_args(argv)
    setup(args)
    return (args, *load(args, model, tokenizer))


def budget(args, ratio: float, criterion: str = "lora", **overrides):
    """The fine-tuning budget every row of a benchmark shares; `overrides` may change any of it (a
    recipe's batch_size=1,grad_accum=4). The objective is the task loss alone, as in the paper, unless
    `overrides` set distill: a benchmark compares what it varies, not `prune`'s default recipe."""
    from loraprune import PruneConfig

    shared = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                  prune_freq=args.prune_freq, seed=args.seed, distill=0.0)  # fmt: skip
    return PruneConfig(ratio=ratio, criterion=criterion, **(shared | overrides))


def budget_text(args: dict, splits: str = "each split") -> str:
    """The markdown sentence stating the shared budget, from a run's arguments (its JSON's `args`)."""
    a = args if isinstance(args, dict) else vars(args)
    windows = f"the first {a['eval_windows']}" if a.get("eval_windows") else "all"
    return (
        f"Model `{a.get('model', DEFAULT_MODEL)}`, {a['steps']} steps x batch {a['batch_size']} x {a['seq_len']} "
        f"tokens, lr {a['lr']:g}, LoRA r=8 alpha=16 "
        f"dropout 0.05, prune every {a['prune_freq']} steps, seed {a['seed']}, the task loss alone unless a "
        f"recipe sets distill; perplexity over {windows} "
        f"{a.get('eval_seq', 128)}-token windows of {splits}."
    )


def fresh(model):
    """An independent copy of the base model (cheaper than reloading the GGUF)."""
    return copy.deepcopy(model)


def token_windows(tokenizer, data: str, split: str, seq_len: int, limit: int | None = None) -> torch.Tensor:
    from loraprune.pipeline.data import bos_token_id, tokenize, windows
    from loraprune.pipeline.texts import load_text

    w = windows(tokenize(tokenizer, load_text(data, split)), seq_len, bos_token_id(tokenizer))
    return w if not limit else w[:limit]


def eval_sets(args, tokenizer, splits: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{'test@128': windows, ...}: the first --eval-windows --eval-seq windows of each split."""
    return {
        f"{split}@{args.eval_seq}": token_windows(tokenizer, args.data, split, args.eval_seq, args.eval_windows)
        for split in splits
    }


def perplexities(model, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    from loraprune.pipeline.evaluate import perplexity

    return {name: perplexity(model, w)["perplexity"] for name, w in sets.items()}


def code_version() -> dict:
    """The commit of the working tree and whether src/ differs from it: which code a result measures
    (bench/pages.py compares it with the commits that changed what a benchmark measures)."""

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=ROOT, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "src")
    return {"commit": commit, "src_modified": None if status is None else bool(status)}


# taken when a script starts, as the code it imports is the code it measures
CODE = code_version()


# the CPU features that decide matmul speed in torch and llama.cpp (bf16 is fast only with the last four)
SPEED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = [flag for flag in line.split(":", 1)[1].split() if flag in SPEED_FLAGS]
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "loraprune"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        **CODE,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def command(argv: list[str] | None, module: str) -> str:
    """The command that reproduces this run. `--results` pointing at a checkout's bench/results (another
    worktree's, say) is left out: it is the default folder, wherever the run was started; other absolute
    paths inside the folder it was started from are written relative to it, as the command runs there."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--results" in argv and Path(argv[argv.index("--results") + 1]).parts[-2:] == ("bench", "results"):
        i = argv.index("--results")
        del argv[i : i + 2]
    return " ".join([".venv/bin/python", "-m", module, *(shlex.quote(_relative(arg)) for arg in argv)])


def _relative(arg: str) -> str:
    path = Path(arg)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else arg


def write_json(args, name: str, payload: dict) -> Path:
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{args.label}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def table(headers: list[str], rows: list[list]) -> str:
    from loraprune.tools.report import markdown_table

    return markdown_table(headers, rows)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported by the scripts that plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(args, name: str, fig, caption: str) -> tuple[Path, str]:
    """Save `fig` as <results>/<name>-<label>.png; returns its path and caption (`image` shows it on a page)."""
    path = Path(args.results) / f"{name}-{args.label}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path, caption


def image(path: Path, caption: str, page: Path) -> str:
    """The markdown line that shows the figure at `path` on the page at `page` (a relative link)."""
    return f"![{caption}]({Path(os.path.relpath(Path(path).resolve(), Path(page).resolve().parent)).as_posix()})"


class Timer:
    """Collect wall-clock samples per name; medians and ratios."""

    def __init__(self):
        self.samples: dict[str, list[float]] = {}

    def time(self, name: str, fn, *a, **kw):
        start = time.perf_counter()
        out = fn(*a, **kw)
        self.samples.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


def alternated(names: list[str], rounds: int):
    """Yield (round, name) with the order reversed every other round (ABBA...), so a slow
    drift of the machine's load hits every variant alike."""
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            yield r, name
