"""Save a pruned model as an ordinary Hugging Face folder, atomically.

Layers of one shape: the family's own config fields, so stock `from_pretrained` loads it.
Per-layer shapes: config.json also carries the layout and an auto_map to modeling_loraprune.py
(a copy of modeling_pruned.py), loaded with `trust_remote_code=True` or `loraprune.load_model`.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from safetensors.torch import save_file
from torch import nn

from ..archs import auto_class_for
from ..errors import LoraPruneError, write_error
from . import modeling_pruned
from .modeling_pruned import LAYOUT_KEY

MODELING_FILE = "modeling_loraprune.py"
SETTINGS_FILE = "loraprune.yaml"
REPORT_FILE = "loraprune.json"  # the run's report (prune()'s, without the scores)
SCORES_FILE = "loraprune_scores.safetensors"  # the final score averages and masks


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output path that exists and is not an empty folder, unless overwriting."""
    if output.exists() and not output.is_dir():
        raise LoraPruneError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LoraPruneError(f"output folder {output} exists and is not empty; pass --overwrite or choose another")


def pruned_class_name(model: nn.Module) -> str:
    name = f"Pruned{type(model).__name__}"
    if not hasattr(modeling_pruned, name):
        raise LoraPruneError(f"per-layer shapes of {type(model).__name__} cannot be exported; use --uniform")
    return name


def save_pruned(model: nn.Module, tokenizer, output: str | Path, report: dict, overwrite: bool = False,
                extras: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Write weights (safetensors), config, tokenizer and loraprune.json to `output`, plus the final
    scores when `report` comes from `prune()`; `extras(folder)` adds more files (the job: report.md
    with plots). Everything goes to a temporary folder beside it first, renamed into place only when
    complete."""
    with staged_folder(Path(output), overwrite, "saving the pruned model") as staging:
        if hasattr(model.config, LAYOUT_KEY):
            auto_class = auto_class_for(model.config, report.get("task")).__name__  # the auto_map key
            model.config.auto_map = {auto_class: f"{MODELING_FILE[:-3]}.{pruned_class_name(model)}"}
            shutil.copyfile(modeling_pruned.__file__, staging / MODELING_FILE)
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:  # a tokenizer, or an image processor for an image model
            tokenizer.save_pretrained(staging)
        scores = report.get("scores")
        (staging / REPORT_FILE).write_text(json.dumps({k: v for k, v in report.items() if k != "scores"}, indent=2))
        if scores is not None:
            save_file({name: tensor.contiguous() for name, tensor in scores.items()}, str(staging / SCORES_FILE))
        if "config" in report:  # the resolved settings, reusable as `prune --config`
            settings = {"model": report.get("model"), "data": report.get("data"), **report["config"]}
            (staging / SETTINGS_FILE).write_text(yaml.safe_dump(settings, sort_keys=False))
        if extras is not None:
            extras(staging)
    return Path(output)


@contextlib.contextmanager
def staged_folder(output: Path, overwrite: bool, what: str) -> Iterator[Path]:
    """A temporary folder beside `output` to write into; renamed to `output` when the block
    completes, removed (and `output` untouched) when it fails. `what` names the job in errors."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        _replace(staging, output)
    except OSError as error:  # disk full, quota, permissions: say so in one line
        shutil.rmtree(staging, ignore_errors=True)
        kept = f"the previous {output} is intact" if output.exists() else f"nothing was written to {output}"
        raise write_error(error, f"{what} to {output}", kept) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, output: Path) -> None:
    """Move `staging` to `output`; an old `output` is removed only once the new one is in place."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old)
