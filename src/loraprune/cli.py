"""`loraprune prune|eval|report`: thin commands over the Python functions.

The `prune` flags are PruneConfig's fields (`lora_r` -> `--lora-r`), help text included.
A LoraPruneError anywhere becomes one line on stderr and exit status 2.
"""

import argparse
import json
import sys
import time
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from .config import PruneConfig
from .errors import LoraPruneError


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))  # X | None -> X
            parser.add_argument(flag, type=kind, default=f.default if f.default is not MISSING else None, help=help)


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-batch-size", type=int, default=8, help="windows per evaluation batch")
    parser.add_argument(
        "--eval-windows", type=int, default=None, help="evaluate only the first N windows (all by default)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraprune", description="LoRA-guided structured pruning of transformers")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a model while fine-tuning LoRA, then save it")
    prune.add_argument("--model", required=True, help="'smollm2', a .gguf file or a local model folder")
    prune.add_argument("--data", required=True, help="'ptb', a .txt file or a .jsonl file with a 'text' field")
    prune.add_argument("--output", required=True, help="folder to write the pruned model to")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    prune.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip dense/pruned perplexity")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(prune)
    _add_eval_flags(prune)

    evaluate = commands.add_parser("eval", help="perplexity and parameters of a model")
    evaluate.add_argument("--model", required=True, help="'smollm2', a .gguf file or a local model folder")
    evaluate.add_argument("--data", required=True, help="'ptb' (test split), a .txt or a .jsonl file")
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation window (default: 128)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_eval_flags(evaluate)

    report = commands.add_parser("report", help="rebuild report.md and its plots in a run folder")
    report.add_argument("run_dir", help="output folder of `loraprune prune`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers/peft deprecation notices say nothing actionable to a user of the CLI
    warnings.filterwarnings("ignore", category=FutureWarning)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "prune":
            run_prune(args)
        elif args.command == "eval":
            run_eval(args)
        else:
            from .report import write_report

            print(f"wrote {write_report(Path(args.run_dir))}")
    except LoraPruneError as error:
        print(f"loraprune: error: {error}", file=sys.stderr)
        return 2
    return 0


def run_prune(args: argparse.Namespace) -> None:
    # Validate everything cheap before loading anything; write nothing until the end.
    from .workflow import prune_and_save

    config = PruneConfig(**{f.name: getattr(args, f.name) for f in fields(PruneConfig)})
    prune_and_save(
        model=args.model,
        data=args.data,
        output=Path(args.output),
        config=config,
        overwrite=args.overwrite,
        evaluate=args.evaluate,
        eval_batch_size=args.eval_batch_size,
        eval_windows=args.eval_windows,
        progress=not args.quiet,
    )


def run_eval(args: argparse.Namespace) -> None:
    from .report import format_eval
    from .workflow import evaluate_model

    if args.seq_len < 2:
        raise LoraPruneError(f"--seq-len must be at least 2 (got {args.seq_len})")
    started = time.perf_counter()
    result = evaluate_model(args.model, args.data, args.seq_len, args.eval_batch_size, args.eval_windows)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=2) if args.json else format_eval(result))


if __name__ == "__main__":
    sys.exit(main())
