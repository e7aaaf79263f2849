"""`loraprune prune|eval|report|inspect`: thin commands over the Python functions.

The `prune` flags are PruneConfig's fields (`lora_r` -> `--lora-r`), help text included.
A LoraPruneError anywhere becomes one line on stderr and exit status 2.
"""

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

from .config import PruneConfig
from .errors import LoraPruneError

# `prune` settings that are not PruneConfig fields, with their defaults
RUN_DEFAULTS = {"model": None, "data": None, "output": None, "overwrite": False, "evaluate": True, "quiet": False}
# memory settings of a run (load_model's arguments) and its checkpoints
RUN_DEFAULTS |= {"dtype": "float32", "load_in_8bit": False, "load_in_4bit": False, "checkpoint_every": None}
RUN_DEFAULTS |= {"gguf": None}  # also write OUT as this GGUF file (gguf_export.py)
# what a resumed run may set differently from its checkpoint: none of it changes the result
RESUME_MAY_CHANGE = {"quiet", "evaluate", "eval_batch_size", "eval_windows", "checkpoint_every", "max_nan_steps",
                     "gradient_checkpointing", "overwrite", "gguf"}  # fmt: skip
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
    given = {key: value for key, value in vars(args).items() if key not in ("command", "config", "resume")}
    if getattr(args, "config", None):
        given = read_settings_file(Path(args.config), known=settings.keys()) | given
    if getattr(args, "resume", None):
        settings |= resumed_settings(args.resume, given)
    settings |= given
    missing = [f"--{key}" for key in ("model", "data", "output") if settings[key] is None]
    if missing:
        raise LoraPruneError(f"{', '.join(missing)} required (on the command line or in --config)")
    return settings


def resumed_settings(resume: str, given: dict) -> dict:
    """The settings of the run checkpointed in `resume`; refuses given settings that differ from them."""
    from .checkpoint import latest

    checkpoint = latest(resume)
    run = checkpoint.run
    saved_world, world = checkpoint.state.get("world_size", 1), int(os.environ.get("WORLD_SIZE", "1"))
    if saved_world != world:  # the global batch and each rank's data slice depend on it
        raise LoraPruneError(
            f"--resume {resume}: the run was checkpointed by {saved_world} process(es), this one has {world}; "
            f"resume it with the same number (torchrun --nproc_per_node {saved_world}, or one process for 1)"
        )
    differ = [
        f"--{key.replace('_', '-')} {given[key]!r} (checkpoint: {run[key]!r})"
        for key in sorted(given)
        if key in run and key not in RESUME_MAY_CHANGE and _normalized(key, given[key]) != run[key]
    ]
    if differ:
        raise LoraPruneError(
            f"--resume {resume}: the run was checkpointed with other settings: {', '.join(differ)}; "
            "drop these flags to continue it as it was (--resume alone restores everything)"
        )
    return {**run, "resume_from": checkpoint}


def _normalized(key: str, value):
    # model and data files are recorded as absolute paths, so a run resumes from any folder
    if key in ("model", "data", "output") and isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    return value


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
    prune.add_argument("--gguf", **flag, help="also write the pruned model to this GGUF file (f32) for llama.cpp")
    prune.add_argument(
        "--resume", **flag, help="continue the run checkpointed in this folder (OUT.checkpoints, or OUT); "
        "other flags default to the run's and must not contradict them"
    )  # fmt: skip
    prune.add_argument(
        "--checkpoint-every", type=int, **flag, help="save a checkpoint to OUT.checkpoints every K steps "
        "(Ctrl-C always saves one)"
    )  # fmt: skip
    prune.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), **flag,
        help="dtype of the base weights (scores are always accumulated in float32; default: float32)",
    )  # fmt: skip
    for bits in (8, 4):
        prune.add_argument(
            f"--load-in-{bits}bit", action="store_true", **flag,
            help=f"load the base weights in {bits} bits through bitsandbytes (CUDA GPU only)",
        )  # fmt: skip
    _add_config_flags(prune)
    _add_eval_flags(prune, default=argparse.SUPPRESS)

    evaluate = commands.add_parser("eval", help="perplexity and parameters of a model")
    evaluate.add_argument("--model", required=True, help="'smollm2', a .gguf file or a local model folder")
    evaluate.add_argument(
        "--data", default=None, help="'ptb' (test split), a .txt or a .jsonl file (with --tasks: local_text's file)"
    )
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation window (default: 128)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument(
        "--task",
        choices=("causal-lm", "embedding", "image-classification"),
        default=None,
        help="what to measure (default: from the model type: perplexity; a BERT's embeddings vs --reference; "
        "a ViT's accuracy, --data digits)",
    )
    evaluate.add_argument(
        "--reference",
        default=None,
        help="embedding task: the dense model to compare with (default: the model a pruned folder was made from)",
    )
    evaluate.add_argument(
        "--tasks",
        default=None,
        help="run lm-eval harness tasks instead (comma-separated): ptb_local, local_text (--data FILE), "
        "or a harness task whose dataset is cached; --seq-len tokens per window",
    )
    evaluate.add_argument(
        "--limit", type=int, default=None, help="with --tasks: the first N documents of each task (all by default)"
    )
    _add_eval_flags(evaluate)

    report = commands.add_parser("report", help="rebuild report.md and its plots in a run folder")
    report.add_argument("run_dir", help="output folder of `loraprune prune`")

    estimate = commands.add_parser("estimate", help="expected peak memory of a prune per dtype (reads the config only)")
    estimate.add_argument("--model", required=True, help="'smollm2', a .gguf file or a local model folder")
    estimate.add_argument("--batch-size", type=int, default=4, help="windows per micro-batch (default: 4)")
    estimate.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")
    estimate.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")

    diagnose = commands.add_parser(
        "diagnose", help="how well the LoRA gradient estimate matches the true gradient, as LoRA trains"
    )
    diagnose.add_argument("--model", required=True, help="'smollm2', a .gguf file or a local causal-LM folder")
    diagnose.add_argument("--data", required=True, help="'ptb', a .txt or a .jsonl file (its train split)")
    diagnose.add_argument("--output", required=True, help="folder for diagnose.json, diagnose.md, diagnose.png")
    diagnose.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    diagnose.add_argument(
        "--at-steps", default="0,10,50", help="LoRA fine-tuning steps at which to measure (default: 0,10,50)"
    )
    diagnose.add_argument("--probe-batches", type=int, default=2, help="fixed batches measured each time (default: 2)")
    diagnose.add_argument(
        "--layers-per-pass", type=int, default=1,
        help="layers whose true dL/dW0 one backward pass computes (memory vs time; default: 1)",
    )  # fmt: skip
    for name in ("batch_size", "seq_len", "lr", "lora_r", "lora_alpha", "seed"):
        f = next(f for f in fields(PruneConfig) if f.name == name)
        diagnose.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default,
                              help=f"{f.metadata['help']} (default: {f.default})")  # fmt: skip
    diagnose.add_argument("--quiet", action="store_true", help="no progress bar")

    export = commands.add_parser("export", help="write a saved model in another format (GGUF for llama.cpp)")
    export.add_argument("model", help="output folder of `loraprune prune` (or 'smollm2', a .gguf or a model folder)")
    export.add_argument("--format", choices=("gguf",), default="gguf", help="file format (default: gguf)")
    export.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32", help="weight type")
    export.add_argument("--output", required=True, help="file to write, e.g. model.gguf")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")

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
        elif args.command == "estimate":
            run_estimate(args)
        elif args.command == "diagnose":
            run_diagnose(args)
        elif args.command == "export":
            run_export(args)
        else:
            from .report import write_report

            print(f"wrote {write_report(Path(args.run_dir))}")
    except LoraPruneError as error:
        code = getattr(error, "exit_code", 2)  # 130 after Ctrl-C saved a checkpoint
        print(f"loraprune: {'' if code == 130 else 'error: '}{error}", file=sys.stderr)
        return code
    except KeyboardInterrupt:  # Ctrl-C outside training (or twice): nothing to save
        print("loraprune: interrupted", file=sys.stderr)
        return 130
    return 0


def run_prune(args: argparse.Namespace) -> None:
    # Validate everything cheap before loading anything; write nothing until the end.
    from .workflow import prune_and_save

    settings = prune_settings(args)
    config = PruneConfig(**{f.name: settings[f.name] for f in fields(PruneConfig)})
    if settings["quiet"]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if settings["load_in_8bit"] and settings["load_in_4bit"]:
        raise LoraPruneError("--load-in-8bit and --load-in-4bit exclude each other: choose one")
    every = settings["checkpoint_every"]
    if every is not None and every < 1:
        raise LoraPruneError(f"--checkpoint-every must be a positive integer (got {every})")
    if settings["gguf"] is not None:
        from .gguf_export import check_gguf_output

        check_gguf_output(Path(settings["gguf"]), settings["overwrite"])
    # the run as a checkpoint records it, for --resume: every setting, paths made absolute
    run = {key: _normalized(key, value) for key, value in settings.items() if key != "resume_from"}
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
        dtype=settings["dtype"],
        quantize_bits=8 if settings["load_in_8bit"] else 4 if settings["load_in_4bit"] else None,
        checkpoint_every=every,
        run=run,
        resume=settings.get("resume_from"),
    )
    from . import distributed

    if settings["gguf"] is not None and distributed.is_main():
        export_to_gguf(settings["output"], settings["gguf"], "f32", settings["overwrite"])
    distributed.finish()  # several processes: the others wait here until rank 0 has written the output


def run_export(args: argparse.Namespace) -> None:
    export_to_gguf(args.model, args.output, args.outtype, args.overwrite)


def export_to_gguf(model: str, output: str, outtype: str, overwrite: bool) -> None:
    from .gguf_export import export_gguf

    result = export_gguf(model, Path(output), outtype, overwrite=overwrite)
    kind = "per-layer shapes" if result["per_layer"] else "one shape for all layers"
    print(
        f"wrote {result['output']}: {result['architecture']} ({kind}), {result['outtype']}, {result['bytes']:,} bytes"
    )
    for warning in result["warnings"]:
        print(f"loraprune: warning: {warning}", file=sys.stderr)


def run_diagnose(args: argparse.Namespace) -> None:
    from .data import load_text, tokenize, windows
    from .diagnose import diagnose, format_diagnosis
    from .export import check_output, staged_folder
    from .load import load_model
    from .plots import plot_diagnosis
    from .workflow import model_task

    try:
        at_steps = sorted({int(step) for step in args.at_steps.split(",") if step.strip()})
    except ValueError:
        raise LoraPruneError(f"--at-steps must be step numbers separated by commas (got {args.at_steps!r})") from None
    if not at_steps or at_steps[0] < 0:
        raise LoraPruneError(f"--at-steps must be step numbers >= 0 (got {args.at_steps!r})")
    for name in ("probe_batches", "layers_per_pass"):
        if getattr(args, name) < 1:
            raise LoraPruneError(f"--{name.replace('_', '-')} must be a positive integer (got {getattr(args, name)})")
    output = Path(args.output)
    check_output(output, args.overwrite)
    if model_task(args.model).name != "causal-lm":
        raise LoraPruneError(f"diagnose measures causal LMs so far; {args.model} is not one")
    config = PruneConfig(ratio=0.0, steps=max(at_steps[-1], 1), batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed)  # fmt: skip
    text = load_text(args.data, "train")
    model, tokenizer = load_model(args.model)
    train_windows = windows(tokenize(tokenizer, text), config.seq_len)
    result = diagnose(model, train_windows, config, at_steps, args.probe_batches, args.layers_per_pass,
                      progress=not args.quiet)  # fmt: skip
    result.update(model=args.model, data=args.data)
    tables = format_diagnosis(result)
    with staged_folder(output, args.overwrite, "saving the diagnosis") as staging:
        (staging / "diagnose.json").write_text(json.dumps(result, indent=2))
        plot_diagnosis(result, staging / "diagnose.png")
        title = f"# LoRA gradient estimate: {args.model} on {args.data}\n\n"
        (staging / "diagnose.md").write_text(title + tables + "\n![per-layer agreement](diagnose.png)\n")
    print(tables)
    print(f"wrote {output / 'diagnose.md'}, diagnose.json and diagnose.png")


def run_estimate(args: argparse.Namespace) -> None:
    from .load import load_config
    from .memory import BYTES, estimate, format_estimates

    for name in ("batch_size", "seq_len", "lora_r"):
        if getattr(args, name) < 1:
            raise LoraPruneError(f"--{name.replace('_', '-')} must be a positive integer (got {getattr(args, name)})")
    config = load_config(args.model)
    estimates = [estimate(config, args.batch_size, args.seq_len, args.lora_r, dtype) for dtype in BYTES]
    print(format_estimates(args.model, estimates, args.batch_size, args.seq_len, args.lora_r))


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
    if args.tasks is not None:
        return run_harness_eval(args)
    if args.limit is not None:
        raise LoraPruneError("--limit applies to --tasks (harness documents); use --eval-windows N here")
    if args.data is None:
        raise LoraPruneError("--data is required (or --tasks for lm-eval harness tasks)")
    started = time.perf_counter()
    result = evaluate_model(
        args.model,
        args.data,
        args.seq_len,
        args.eval_batch_size,
        args.eval_windows,
        task=args.task,
        reference=args.reference,
    )
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=2) if args.json else format_eval(result))


def run_harness_eval(args: argparse.Namespace) -> None:
    from .harness import format_harness, harness_eval

    if args.limit is not None and args.limit < 1:
        raise LoraPruneError(f"--limit must be at least 1 (got {args.limit})")
    if args.task not in (None, "causal-lm"):
        raise LoraPruneError(f"--tasks runs lm-eval on causal LMs; it does not combine with --task {args.task}")
    if args.eval_windows is not None:
        raise LoraPruneError("--eval-windows does not apply to --tasks; use --limit N (documents per task)")
    started = time.perf_counter()
    result = harness_eval(args.model, args.tasks, args.data, args.seq_len, args.eval_batch_size, args.limit)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=2) if args.json else format_harness(result))


if __name__ == "__main__":
    sys.exit(main())
