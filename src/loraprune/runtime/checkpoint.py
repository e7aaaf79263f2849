"""Checkpoints of a running prune, so that a crash, a kill or Ctrl-C loses at most a few steps.

The output folder OUT is written only at the end, atomically, so checkpoints live beside it:

    OUT.checkpoints/
        step-000040/           one complete checkpoint, renamed into place from .step-000040.partial-*
            state.safetensors  LoRA factors, AdamW moments, masks, score averages, RNG states
            state.json         step, counters, data position, history, optimizer settings and the run
                               (model, data, output, config): everything `--resume` needs
            COMPLETE           written last: the size of each file above
        step-000038/           the previous one, removed only once a newer one is complete
        teacher/               the dense model's top-k for distillation, made before the first step
                               (teacher_cache.py; elsewhere with --teacher-cache): `--resume` reads it
                               back, and a run stopped while it is computed goes on from its partial

`--resume` continues from the newest checkpoint whose files match its COMPLETE marker; a damaged
newer one is skipped with a warning. The folder is removed once the pruned model is saved.
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import LoraPruneError, write_error
from . import fsdp

SUFFIX = ".checkpoints"
TENSORS_FILE, STATE_FILE, MARKER = "state.safetensors", "state.json", "COMPLETE"
FORMAT = 1
_STEP = re.compile(r"^step-(\d+)$")


class Interrupted(LoraPruneError):
    """Ctrl-C during training, after a checkpoint was saved, or while the dense model's top-k is computed
    (what is done is kept: teacher_cache.py): the CLI exits 130, as shells do."""

    exit_code = 130


def checkpoint_dir(output: str | Path) -> Path:
    """Where the checkpoints of a run writing to `output` live."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def resume_command(directory: str | Path) -> str:
    return f"loraprune prune --resume {directory}"


def check_no_checkpoints(directory: Path, overwrite: bool) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's, unless overwriting them."""
    if not overwrite and has_checkpoints(directory):
        raise LoraPruneError(
            f"{directory} holds checkpoints of an earlier run: continue it with `{resume_command(directory)}`, "
            "or pass --overwrite to start again"
        )


def partial_folder(kept: Path) -> Path:
    """Where what goes into the kept folder `kept` is written until it is complete."""
    return kept.with_name(f".{kept.name}.partial")


def has_checkpoints(directory: Path) -> bool:
    """Whether `directory` holds step-NNNNNN folders (complete or not): a run to continue, not start."""
    return directory.is_dir() and bool(_steps(directory))


def _steps(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-NNNNNN folder, newest first, complete or not."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _fsync(path: Path) -> None:
    # the rename is the commit: the files must be on disk before it, not just in the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Writes checkpoints of one run every `every` steps and at its last step (if `every` is set),
    and at the end of the step during which Ctrl-C was pressed (inside `catching_interrupts`)."""

    def __init__(self, directory: str | Path, run: dict, every: int | None = None, keep: int = 2, replace=False):
        self.directory, self.run, self.every, self.keep = Path(directory), run, every, keep
        self.replace = replace  # a fresh run under --overwrite: its first save removes older checkpoints
        self.interrupted = False
        self.last: Path | None = None  # newest checkpoint written or resumed from
        self.kept: list[Path] = []  # kept_folder's

    def kept_folder(self, name: str) -> Path:
        """The folder `name` among the checkpoints, for what the run computes once before training and
        `--resume` should read back (the dense model's top-k: teacher_cache.py), with its work in
        progress inside. What it holds says what it was computed from: its user reads it back only if
        that is what it would compute, whichever run left it."""
        folder = self.directory / name
        self.kept.append(folder)
        return folder

    def abandon(self) -> None:
        """The run failed: with no checkpoint to resume from, nothing will read the kept folders."""
        if not has_checkpoints(self.directory):
            for folder in self.kept:
                shutil.rmtree(folder, ignore_errors=True)

    def due(self, step: int, last_step: int) -> bool:
        return self.interrupted or (self.every is not None and (step % self.every == 0 or step == last_step))

    def save(self, step: int, model: nn.Module, optimizer, pruner, sampler, history, extra=None) -> Path | None:
        """Write the state after `step` as one more complete checkpoint; keep the `keep` newest.
        `extra`: more tensors to save (several processes: the other ranks' RNG states).
        Every rank calls it (FSDP gathers the shards); rank 0 alone writes, and returns the folder."""
        from . import distributed

        tensors, state = _collect(model, optimizer, pruner, sampler)
        if not distributed.is_main():
            return None
        tensors.update({key: t.detach().cpu().contiguous() for key, t in (extra or {}).items()})
        state.update(format=FORMAT, step=step, run=self.run, history=asdict(history))
        state["world_size"] = distributed.world_size()  # the data sharding and the global batch depend on it
        final = self.directory / f"step-{step:06d}"
        staging = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(".step-*.partial-*"):  # from a run killed mid-write
                shutil.rmtree(leftover, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=self.directory))
            save_file(tensors, str(staging / TENSORS_FILE))
            (staging / STATE_FILE).write_text(json.dumps(state))
            sizes = {name: (staging / name).stat().st_size for name in (TENSORS_FILE, STATE_FILE)}
            (staging / MARKER).write_text(json.dumps(sizes))
            for name in (TENSORS_FILE, STATE_FILE, MARKER):
                _fsync(staging / name)
            if final.exists():  # a damaged checkpoint of this step, skipped when resuming
                shutil.rmtree(final)
            staging.rename(final)
        except OSError as error:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            kept = f"the previous checkpoint {self.last} is intact" if self.last else "no earlier checkpoint exists"
            raise write_error(error, f"writing checkpoint {final}", kept) from error
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.replace and self.last is None:
            for _, folder in _steps(self.directory):
                if folder != final:
                    shutil.rmtree(folder, ignore_errors=True)
        self.last = final
        for old_step, folder in _steps(self.directory):
            # newer folders belong to a timeline abandoned at resume (they were damaged)
            if old_step > step or (old_step < step and folder not in self._newest_complete()):
                shutil.rmtree(folder, ignore_errors=True)
        return final

    def _newest_complete(self) -> list[Path]:
        return [folder for _, folder in _steps(self.directory) if (folder / MARKER).is_file()][: self.keep]

    @contextmanager
    def catching_interrupts(self):
        """While inside, the first Ctrl-C only sets `interrupted` (the loop saves and stops after the
        step); a second one raises KeyboardInterrupt at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            print("\nloraprune: interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr)  # fmt: skip

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def interrupted_error(self, step: int, steps: int) -> Interrupted:
        return Interrupted(
            f"interrupted at step {step} of {steps}; checkpoint saved in {self.last}; "
            f"continue with: {resume_command(self.directory)}"
        )


def _collect(model: nn.Module, optimizer, pruner, sampler) -> tuple[dict[str, Tensor], dict]:
    """Split the training state into tensors (for safetensors) and JSON values."""
    if not hasattr(sampler, "state_dict"):
        raise TypeError("checkpointing needs a batch source with state_dict() (a data.BatchSampler)")
    # whole tensors (FSDP: gathered from the ranks, a collective), so any run can resume them
    tensors = {f"lora/{name}": fsdp.whole(p) for name, p in model.named_parameters() if "lora_" in name}
    optim = optimizer.state_dict()
    json_optim = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{key}"] = fsdp.whole(value)
            else:
                json_optim[f"{index}/{key}"] = value
    json_pruner = {}
    for key, value in pruner.state_dict().items():
        if isinstance(value, Tensor):
            tensors[f"pruner/{key}"] = value
        else:
            json_pruner[key] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = cuda_state
    tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    state = {
        "optimizer": {"param_groups": optim["param_groups"], "values": json_optim},
        "lora_names": [name for name, p in model.named_parameters() if "lora_" in name],
        "pruner": json_pruner,
        "sampler": sampler.state_dict(),
    }
    return tensors, state


@dataclass
class Checkpoint:
    """A complete checkpoint, read back: `restore()` puts a fresh run into its state."""

    path: Path
    state: dict
    tensors: dict[str, Tensor]

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def run(self) -> dict:
        return self.state["run"]

    def restore(self, model: nn.Module, optimizer, pruner, sampler, history) -> int:
        """Load LoRA factors, optimizer, pruner, data position, history and RNG states; return the step."""
        from . import distributed

        saved_world, world = self.state.get("world_size", 1), distributed.world_size()
        if saved_world != world:
            raise LoraPruneError(
                f"checkpoint {self.path} was written by a run of {saved_world} process(es) and this one has {world}: "
                f"resume it with the same number of processes (--batch-size is per process)"
            )
        # masks and scores first: under --shrink progressive they give the fresh (dense) model the shapes
        # the checkpoint's LoRA factors and moments have (the optimizer's parameters are replaced too)
        pruner_state = {key[len("pruner/") :]: t for key, t in self.tensors.items() if key.startswith("pruner/")}
        pruner.load_state_dict({**pruner_state, **self.state["pruner"]})
        pruner.shrink_dead(optimizer)
        if "shapes" in pruner_state and not pruner.shapes().equal(pruner_state["shapes"]):
            raise LoraPruneError(
                f"checkpoint {self.path} holds layers of other shapes than its masks give this model "
                f"(--shrink {pruner.config.shrink}); resume it with the settings it was written with"
            )
        params = dict(model.named_parameters())
        names = [name for name in params if "lora_" in name]
        if names != self.state["lora_names"]:
            raise LoraPruneError(f"checkpoint {self.path} was made with other LoRA layers than this model has")
        with torch.no_grad():
            for name in names:  # FSDP: this rank's rows into its shard
                fsdp.local(params[name]).copy_(fsdp.rows_held(self.tensors[f"lora/{name}"], params[name]))
        optim_state: dict[int, dict] = {}
        for key, value in self.tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                optim_state.setdefault(int(index), {})[name] = value
        for key, value in self.state["optimizer"]["values"].items():
            index, name = key.split("/", 1)
            optim_state.setdefault(int(index), {})[name] = value
        ordered = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's indices
        for index, values in optim_state.items():  # FSDP: moments split like their parameter
            for name, value in values.items():
                if isinstance(value, Tensor) and value.shape == ordered[index].shape:
                    values[name] = fsdp.shard_like(value, ordered[index])
        groups = self.state["optimizer"]["param_groups"]
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]  # JSON made it a list
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        sampler.load_state_dict(self.state["sampler"])
        for key, values in self.state["history"].items():
            setattr(history, key, list(values))
        torch.set_rng_state(self.tensors["rng/cpu"])
        cuda = [self.tensors[key] for key in sorted(self.tensors) if key.startswith("rng/cuda/")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        distributed.restore_rng(self.tensors)  # ranks other than 0: their own dropout RNG
        return self.step


def _read(folder: Path) -> Checkpoint:
    """Read one checkpoint folder, or raise ValueError saying why it is not complete."""
    if not (folder / MARKER).is_file():
        raise ValueError(f"{folder.name} has no {MARKER} marker (it was being written when the run stopped)")
    sizes = json.loads((folder / MARKER).read_text())
    for name, size in sizes.items():
        actual = (folder / name).stat().st_size if (folder / name).is_file() else None
        if actual != size:
            raise ValueError(f"{name} is {actual} bytes, expected {size} (truncated?)")
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{folder.name} has checkpoint format {state.get('format')!r}, not {FORMAT}")
    return Checkpoint(folder, state, load_file(str(folder / TENSORS_FILE)))


def find_run(path: str | Path) -> Path:
    """The checkpoint folder `--resume PATH` means: PATH itself, or PATH.checkpoints for an output PATH."""
    path = Path(path)
    for candidate in (path, checkpoint_dir(path)):
        if candidate.is_dir() and any(_STEP.match(p.name) or p.name.startswith(".step-") for p in candidate.iterdir()):
            return candidate
    if not path.exists():
        raise LoraPruneError(f"--resume {path}: no such folder (nor {checkpoint_dir(path)})")
    if (path / "loraprune.json").is_file():
        raise LoraPruneError(f"--resume {path}: this run is finished (its pruned model is there); nothing to resume")
    raise LoraPruneError(
        f"--resume {path} is not a loraprune run: it holds no step-NNNNNN checkpoint folders "
        f"(they are written to OUT{SUFFIX} by --checkpoint-every K or Ctrl-C)"
    )


def latest(path: str | Path) -> Checkpoint:
    """The newest complete checkpoint of the run in `path`; damaged newer ones are skipped with a warning."""
    directory = find_run(path)
    problems = []
    for _, folder in _steps(directory):
        try:
            return _read(folder)
        except Exception as error:  # OSError, ValueError, JSON and safetensors errors alike: a damaged folder
            problems.append(f"{folder.name}: {(str(error).splitlines() or [type(error).__name__])[0]}")
            print(f"loraprune: warning: skipping checkpoint {folder}: {problems[-1]}", file=sys.stderr)
    if problems:
        raise LoraPruneError(f"--resume {directory}: no complete checkpoint ({'; '.join(problems)})")
    raise LoraPruneError(
        f"--resume {directory}: the run stopped before its first checkpoint was complete; "
        "start it again without --resume"
    )
