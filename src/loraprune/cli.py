"""`loraprune prune|eval|inspect|estimate|diagnose|report`: a table of subcommands, each a thin
call of a typed Python function.

Every flag is a field of a settings dataclass (prune_config.py, run_settings.py; `lora_r` is `--lora-r`),
its help the field's. A LoraPruneError anywhere becomes one line on stderr and exit status 2.
"""

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .errors import LoraPruneError
from .prune_config import PruneConfig
from .run_settings import (
    DiagnoseSettings,
    EstimateSettings,
    EvalSettings,
    ExportSettings,
    InspectSettings,
    ReportSettings,
    RunSettings,
)


def prune_command(config: PruneConfig, run: RunSettings, resume) -> None:
    from .job import prune_job
    from .runtime import distributed

    if run.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    prune_job(config, run, resume)
    distributed.finish()  # several processes: the others wait here until rank 0 has written the output


def eval_command(settings: EvalSettings) -> None:
    from .job import evaluate_job
    from .tools.harness import format_harness, harness_eval
    from .tools.report import format_eval

    started = time.perf_counter()
    if settings.tasks is not None:
        s = settings
        result = harness_eval(s.model, s.tasks, s.data, s.seq_len, s.eval_batch_size, s.limit)
    else:
        result = evaluate_job(settings)
    result["seconds"] = time.perf_counter() - started
    table = format_harness if settings.tasks is not None else format_eval
    print(json.dumps(result, indent=2) if settings.json else table(result))


def inspect_command(settings: InspectSettings) -> None:
    from .pipeline.load import load_config
    from .tools.inspect_model import describe, format_description

    info = describe(load_config(settings.model), settings.skip_layers)
    print(json.dumps(info, indent=2) if settings.json else format_description(settings.model, info))


def estimate_command(settings: EstimateSettings) -> None:
    from .pipeline.load import load_config
    from .tools.estimate import estimate_report

    print(estimate_report(load_config(settings.model), settings))


def diagnose_command(settings: DiagnoseSettings, training: PruneConfig) -> None:
    from .tools.diagnose import run_diagnose

    run_diagnose(settings, training)


def export_command(settings: ExportSettings) -> None:
    from .pipeline.gguf_export import describe_export, export_gguf

    s = settings
    print(describe_export(export_gguf(s.model, Path(s.output), s.outtype, overwrite=s.overwrite)))


def report_command(settings: ReportSettings) -> None:
    from .tools.report import write_report

    print(f"wrote {write_report(Path(settings.run_dir))}")


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[..., None]  # called with one instance of each settings class (prune: and the checkpoint)
    settings: tuple  # dataclasses whose fields are the flags; (dataclass, names): only those fields
    layered: bool = False  # defaults < --config YAML < typed flags, and --resume (settings.resolve)


DIAGNOSE_TRAINING = ("batch_size", "seq_len", "lr", "lora_r", "lora_alpha", "seed")
COMMANDS = {
    "prune": Command("prune a model while fine-tuning LoRA, then save it", prune_command,
                     (RunSettings, PruneConfig), layered=True),
    "eval": Command("a model's perplexity (or its task's metrics) and parameters", eval_command, (EvalSettings,)),
    "export": Command("write a saved model in another format (GGUF for llama.cpp)", export_command,
                      (ExportSettings,)),
    "report": Command("rebuild report.md and its plots in a run folder", report_command, (ReportSettings,)),
    "estimate": Command("expected peak memory of a prune per criterion, and what is free (reads the config only)",
                        estimate_command,
                        (EstimateSettings,)),
    "diagnose": Command("how well the LoRA gradient estimate matches the true gradient, as LoRA trains",
                        diagnose_command, (DiagnoseSettings, (PruneConfig, DIAGNOSE_TRAINING))),
    "inspect": Command("a model's prunable structure and what each --ratio removes", inspect_command,
                       (InspectSettings,)),
}  # fmt: skip


def _settings_fields(entry) -> list:
    cls, only = entry if isinstance(entry, tuple) else (entry, None)
    return [f for f in fields(cls) if only is None or f.name in only]


def _add_flags(parser: argparse.ArgumentParser, entry, layered: bool) -> None:
    # layered: defaults are suppressed, so a flag the user did not type cannot hide --config's value
    for f in _settings_fields(entry):
        meta, default = f.metadata, f.default if f.default is not MISSING else None
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta["help"])
            continue
        kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))  # X | None -> X
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        options = {"dest": f.name, "default": argparse.SUPPRESS if layered else default}
        options["help"] = meta["help"] + ("" if meta.get("required") else f" (default: {default})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), required=meta.get("required", False),
                                **options)  # fmt: skip


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2, like every other bad input (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"loraprune: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="loraprune", description="LoRA-guided structured pruning of transformers")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help)
        if command.layered:
            sub.add_argument("--config", help="YAML file of settings (flag or field names); typed flags override it")
            sub.add_argument("--resume", help="continue the run checkpointed in this folder (OUT.checkpoints, or "
                             "OUT); other flags default to the run's and must not contradict them")  # fmt: skip
        for entry in command.settings:
            _add_flags(sub, entry, command.layered)
    return parser


def run_command(args: argparse.Namespace) -> None:
    command = COMMANDS[args.command]
    if command.layered:
        from .run_settings import resolve

        given = {key: value for key, value in vars(args).items() if key not in ("command", "config", "resume")}
        config, run, checkpoint = resolve(given, args.config, args.resume)
        return command.run(config, run, checkpoint)
    values = vars(args)
    instances = []
    for entry in command.settings:
        cls = entry[0] if isinstance(entry, tuple) else entry
        instances.append(cls(**{f.name: values[f.name] for f in _settings_fields(entry)}))
    command.run(*instances)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0), or a bad flag (2, its line printed): a code, as below
        return done.code
    # transformers/peft deprecation notices say nothing actionable to a user of the CLI
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        run_command(args)
    except LoraPruneError as error:
        code = getattr(error, "exit_code", 2)  # 130 after Ctrl-C saved a checkpoint
        print(f"loraprune: {'' if code == 130 else 'error: '}{error}", file=sys.stderr)
        return code
    except KeyboardInterrupt:  # Ctrl-C outside training (or twice): nothing to save
        print("loraprune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
