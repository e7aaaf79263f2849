"""`loraprune prune|eval|report|inspect`: thin commands over the Python functions.

The `prune` flags are PruneConfig's fields (`lora_r` -> `--lora-r`), help text included.
A LoraPruneError anywhere becomes one line on stderr and exit status 2.
"""

import argparse
import json
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

from .config import PruneConfig
from .errors import LoraPruneError

# `prune` settings that are not PruneConfig fields, with their defaults
RUN_DEFAULTS = {"model": None, "data": None, "output": None, "overwrite": False, "evaluate": True, "quiet": False}
EVAL_DEFAULTS = {"eval_batch_size": 8, "eval_windows": None}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    # defaults are suppressed: a flag the user did not type must not hide the --config file's value
    for f in fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))  # X | None -> X
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help)


def prune_settings(args: argparse.Namespace) -> dict:
    """Defaults, then the --config YAML file, then the flags typed on the command line."""
    settings = {f.name: f.default for f in fields(PruneConfig)} | RUN_DEFAULTS | EVAL_DEFAULTS
    given = {key: value for key, value in vars(args).items() if key not in ("command", "config")}
    if getattr(args, "config", None):
        settings |= read_settings_file(Path(args.config), known=settings.keys())
    settings |= given
    missing = [f"--{key}" for key in ("model", "data", "output") if settings[key] is None]
    if missing:
        raise LoraPruneError(f"{', '.join(missing)} required (on the command line or in --config)")
    return settings


def read_settings_file(path: Path, known) -> dict:
    """A YAML mapping of prune settings; keys as flags (lora-r) or fields (lora_r)."""
    import yaml

    if not path.is_file():
        raise LoraPruneError(f"--config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LoraPruneError(f"--config file {path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise LoraPruneError(f"--config file {path} must be a mapping of setting: value")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise LoraPruneError(
            f"--config file {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return values


def _add_eval_flags(parser: argparse.ArgumentParser, default=None) -> None:
    """Evaluation flags; `default` is argparse.SUPPRESS under `prune` (--config may set them)."""
    pick = (lambda value: value) if default is None else (lambda value: default)
    parser.add_argument(
        "--eval-batch-size", type=int, default=pick(8), help="windows per evaluation batch (default: 8)"
    )
    parser.add_argument(
        "--eval-windows", type=int, default=pick(None), help="evaluate only the first N windows (all by default)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraprune", description="LoRA-guided structured pruning of transformers")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a model while fine-tuning LoRA, then save it")
    flag = {"default": argparse.SUPPRESS}
    prune.add_argument("--config", help="YAML file of prune settings (flag or field names); typed flags override it")
    prune.add_argument("--model", **flag, help="'smollm2', a .gguf file or a local model folder (required)")
    prune.add_argument("--data", **flag, help="'ptb', a .txt file or a .jsonl file with a 'text' field (required)")
    prune.add_argument("--output", **flag, help="folder to write the pruned model to (required)")
    prune.add_argument("--overwrite", action="store_true", **flag, help="replace a non-empty output folder")
    prune.add_argument("--no-eval", dest="evaluate", action="store_false", **flag, help="skip dense/pruned perplexity")
    prune.add_argument("--quiet", action="store_true", **flag, help="no progress bars")
    _add_config_flags(prune)
    _add_eval_flags(prune, default=argparse.SUPPRESS)

    evaluate = commands.add_parser("eval", help="perplexity and parameters of a model")
    evaluate.add_argument("--model", required=True, help="'smollm2', a .gguf file or a local model folder")
    evaluate.add_argument("--data", required=True, help="'ptb' (test split), a .txt or a .jsonl file")
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation window (default: 128)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_eval_flags(evaluate)

    report = commands.add_parser("report", help="rebuild report.md and its plots in a run folder")
    report.add_argument("run_dir", help="output folder of `loraprune prune`")

    inspect = commands.add_parser("inspect", help="a model's prunable structure and what each --ratio removes")
    inspect.add_argument("model", help="'smollm2', a .gguf file or a local model folder (only its config is read)")
    inspect.add_argument("--skip-layers", default="first10pct,last", help="as for prune (default: first10pct,last)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers/peft deprecation notices say nothing actionable to a user of the CLI
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.command == "prune":
            run_prune(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "inspect":
            run_inspect(args)
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

    settings = prune_settings(args)
    config = PruneConfig(**{f.name: settings[f.name] for f in fields(PruneConfig)})
    if settings["quiet"]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    prune_and_save(
        model=settings["model"],
        data=settings["data"],
        output=Path(settings["output"]),
        config=config,
        overwrite=settings["overwrite"],
        evaluate=settings["evaluate"],
        eval_batch_size=settings["eval_batch_size"],
        eval_windows=settings["eval_windows"],
        progress=not settings["quiet"],
    )


def run_inspect(args: argparse.Namespace) -> None:
    from .inspect_model import describe, format_description
    from .load import load_config

    info = describe(load_config(args.model), args.skip_layers)
    print(json.dumps(info, indent=2) if args.json else format_description(args.model, info))


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
