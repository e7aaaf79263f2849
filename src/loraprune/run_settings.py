"""Settings of a run that are not the method (prune_config.py holds those): what to prune, where to
write it, how to load, evaluate and checkpoint; and `eval`'s. Typed, validated where they are
built, each error naming the flag.

`resolve()` layers them as the command line does, so the Python API gets the same: defaults,
then a YAML file (`--config`), then the given values; `--resume` restores a checkpointed run's
settings and refuses given ones that contradict them.
"""

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import LoraPruneError
from .pipeline.llamacpp_tools import QUANTIZED
from .pipeline.scoring import check_criterion
from .pipeline.texts import check_spec
from .prune_config import TASK_NAMES, PruneConfig, setting

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# what a resumed run may set differently from its checkpoint: none of it changes the result
RESUME_MAY_CHANGE = {"quiet", "evaluate", "eval_data", "eval_batch_size", "eval_windows", "checkpoint_every",
                     "max_nan_steps", "gradient_checkpointing", "overwrite", "memory_check",
                     "return_freed_memory", "gguf", "teacher_cache"}  # fmt: skip
REQUIRED = ("model", "output")
PATHS = ("model", "data", "output", "teacher_cache")  # recorded as absolute paths where they are files or folders


def _require_positive(settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise LoraPruneError(f"--{name.replace('_', '-')} must be a positive integer (got {value})")


@dataclass
class RunSettings:
    """`prune`'s settings besides the method's: model, data, output, loading, evaluation, checkpoints."""

    model: str | None = setting(None, "'smollm2', a .gguf file or a local model folder (required)")
    data: str | None = setting(
        None,
        "text to tune on: 'ptb', 'gcide', 'foldoc', 'jargon', 'pydoc', a .txt or .jsonl file, or a mix like "
        "gcide*3+foldoc (docs/evaluation.md); 'digits' for a ViT. None: gcide+foldoc (general English, "
        "`make texts`) for causal LMs; required for the other tasks",
    )
    output: str | None = setting(None, "folder to write the pruned model to (required)")
    overwrite: bool = setting(False, "replace a non-empty output folder")
    evaluate: bool = setting(True, "evaluate the dense and the pruned model on the test split", flag="--eval")
    eval_data: str | None = setting(
        None,
        "comma-separated texts (names, files or mixes) on which to compare the dense and the pruned model "
        "besides --data's test split; default for causal LMs: ptb,pydoc",
    )
    eval_batch_size: int = setting(8, "windows (or examples) per evaluation batch")
    eval_windows: int | None = setting(None, "evaluate only the first N windows (or examples); all by default")
    quiet: bool = setting(False, "no progress bars")
    dtype: str = setting(
        "float32", "dtype of the base weights (scores are always accumulated in float32)", choices=DTYPE_NAMES
    )
    load_in_8bit: bool = setting(False, "load the base weights in 8 bits through bitsandbytes (CUDA GPU only)")
    load_in_4bit: bool = setting(False, "load the base weights in 4 bits through bitsandbytes (CUDA GPU only)")
    checkpoint_every: int | None = setting(
        None, "save a checkpoint to OUT.checkpoints every K steps (Ctrl-C always saves one)"
    )
    teacher_cache: str | None = setting(
        None,
        "keep the dense model's top-k (--distill-top-k) in this folder after the run, one subfolder per model, "
        "text sample, K and temperature, and read it back in later runs (another --ratio: the same windows) "
        "instead of computing it; by default it is kept among the checkpoints and removed with them",
    )
    gguf: str | None = setting(None, "also write the pruned model to this GGUF file (f32) for llama.cpp")
    memory_check: bool = setting(
        True,
        "before loading, refuse a run whose estimated peak memory (loraprune estimate) exceeds the free "
        "RAM (GPU memory per process)",
        flag="--memory-check",
    )
    return_freed_memory: bool = setting(
        True,
        "when the estimated peak is within the heap's overshoot of the free RAM, make glibc return freed "
        "memory to the system (lower peak, slower steps; process-wide, and said on stderr when set)",
        flag="--return-freed-memory",
    )

    def __post_init__(self):
        missing = [f"--{name}" for name in REQUIRED if getattr(self, name) is None]
        if missing:
            raise LoraPruneError(f"{', '.join(missing)} required (on the command line or in --config)")
        if self.dtype not in DTYPE_NAMES:
            raise LoraPruneError(f"--dtype must be one of {', '.join(DTYPE_NAMES)} (got {self.dtype!r})")
        if self.load_in_8bit and self.load_in_4bit:
            raise LoraPruneError("--load-in-8bit and --load-in-4bit exclude each other: choose one")
        _require_positive(self, "eval_batch_size", "eval_windows", "checkpoint_every")
        if self.eval_data is not None:
            eval_list(self.eval_data)

    @property
    def quantize_bits(self) -> int | None:
        return 8 if self.load_in_8bit else 4 if self.load_in_4bit else None


@dataclass
class EvalSettings:
    """`eval`'s settings: a model's metrics on a dataset's test split, or lm-eval harness tasks."""

    model: str = setting(None, "'smollm2', a .gguf file or a local model folder", required=True)
    data: str | None = setting(
        None, "'ptb' (test split), a .txt or a .jsonl file (with --tasks: local_text's file)"
    )  # fmt: skip
    seq_len: int = setting(128, "tokens per evaluation window")
    task: str | None = setting(
        None,
        "what to measure (default: from the model type: perplexity; a BERT's embeddings vs --reference; "
        "a ViT's accuracy, --data digits)",
        choices=TASK_NAMES,
    )
    reference: str | None = setting(
        None, "embedding task: the dense model to compare with (default: the model a pruned folder was made from)"
    )
    tasks: str | None = setting(
        None,
        "run lm-eval harness tasks instead (comma-separated): ptb_local, local_text (--data FILE), "
        "or a harness task whose dataset is cached; --seq-len tokens per window",
    )
    limit: int | None = setting(None, "with --tasks: the first N documents of each task (all by default)")
    eval_batch_size: int = setting(8, "windows (or examples) per evaluation batch")
    eval_windows: int | None = setting(None, "evaluate only the first N windows (or examples); all by default")
    json: bool = setting(False, "print JSON instead of a table")

    def __post_init__(self):
        if self.model is None:
            raise LoraPruneError("--model is required")
        if self.seq_len < 2:
            raise LoraPruneError(f"--seq-len must be at least 2 (got {self.seq_len})")
        _require_positive(self, "eval_batch_size", "eval_windows")
        if self.limit is not None and self.limit < 1:
            raise LoraPruneError(f"--limit must be at least 1 (got {self.limit})")
        if self.tasks is None:
            if self.limit is not None:
                raise LoraPruneError("--limit applies to --tasks (harness documents); use --eval-windows N here")
            if self.data is None:
                raise LoraPruneError("--data is required (or --tasks for lm-eval harness tasks)")
            return
        if self.task not in (None, "causal-lm"):  # lm-eval scores language models
            raise LoraPruneError(f"--tasks runs lm-eval on causal LMs; it does not combine with --task {self.task}")
        if self.eval_windows is not None:
            raise LoraPruneError("--eval-windows does not apply to --tasks; use --limit N (documents per task)")


def eval_list(value: str, flag: str = "--eval-data") -> list[str]:
    """The texts of a comma-separated list, each checked (check_spec); one error line for a bad one."""
    specs = [spec.strip() for spec in value.split(",")]
    if not value.strip() or not all(specs):
        raise LoraPruneError(f"{flag} {value!r} has an empty entry; give texts separated by commas, e.g. ptb,pydoc")
    for spec in specs:
        check_spec(spec, flag)
    return specs


def field_names(*classes) -> list[str]:
    return [f.name for cls in classes for f in fields(cls)]


def resolve(given: dict, config_file: str | Path | None = None, resume: str | Path | None = None):
    """(PruneConfig, RunSettings, Checkpoint or None) from defaults < `config_file` (YAML) < `given`
    (setting names to values); with `resume`, the checkpointed run's settings replace the defaults,
    and `given` must agree with them."""
    known = field_names(PruneConfig, RunSettings)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise LoraPruneError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if config_file:
        given = read_settings_file(Path(config_file), known) | given
    checkpoint, values = None, {}
    if resume:
        from .runtime.checkpoint import latest

        checkpoint = latest(resume)
        values = {key: value for key, value in agreed_settings(checkpoint, resume, given).items() if key in known}
    values |= given
    config = PruneConfig(**{f.name: values[f.name] for f in fields(PruneConfig) if f.name in values})
    check_criterion(config.criterion)  # the criteria are a pipeline table, which PruneConfig cannot read
    run = RunSettings(**{f.name: values[f.name] for f in fields(RunSettings) if f.name in values})
    return config, run, checkpoint


def record(config: PruneConfig, run: RunSettings) -> dict:
    """The run as a checkpoint records it, for --resume: every setting, paths made absolute."""
    return {key: _normalized(key, value) for key, value in (asdict(run) | asdict(config)).items()}


def agreed_settings(checkpoint, resume, given: dict) -> dict:
    """The settings of the checkpointed run; refuses given settings that differ from them."""
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
    return run


def _normalized(key: str, value):
    # model and data files are recorded as absolute paths, so a run resumes from any folder
    if key in PATHS and isinstance(value, str) and os.path.exists(value):
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
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise LoraPruneError(f"--config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise LoraPruneError(f"--config file {path} must be a mapping of setting: value")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise LoraPruneError(
            f"--config file {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return values


@dataclass
class InspectSettings:
    """`inspect`'s settings: a model's prunable structure from its config."""

    model: str = setting(
        None, "'smollm2', a .gguf file or a local model folder (only its config is read)", positional=True
    )
    skip_layers: str = setting("first10pct,last", "as for prune")
    json: bool = setting(False, "print JSON instead of a table")


@dataclass
class EstimateSettings:
    """`estimate`'s settings: the expected peak memory of a prune, from the config alone."""

    model: str = setting(None, "'smollm2', a .gguf file or a local model folder", required=True)
    batch_size: int = setting(4, "windows per micro-batch")
    seq_len: int = setting(128, "tokens per window")
    lora_r: int = setting(8, "LoRA rank")
    criterion: str | None = setting(None, "only this criterion (default: a column for each)")
    dtype: str = setting("float32", "dtype of the base weights", choices=DTYPE_NAMES)
    gradient_checkpointing: bool = setting(False, "as for prune: recompute activations in backward")
    processes: int = setting(1, "processes of the run (torchrun): on CPU they share the RAM, on GPUs each has one")
    device: str = setting("cpu", "where the run trains: cpu, or cuda (free memory of the current GPU)")
    json: bool = setting(False, "print JSON instead of a table")

    def __post_init__(self):
        _require_positive(self, "batch_size", "seq_len", "lora_r", "processes")
        check_criterion(self.criterion)
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise LoraPruneError(f"--device must be cpu or cuda (got {self.device!r})")


@dataclass
class DiagnoseSettings:
    """`diagnose`'s settings besides the LoRA fine-tuning ones (PruneConfig's batch, lr, rank...)."""

    model: str = setting(None, "'smollm2', a .gguf file or a local model folder", required=True)
    data: str = setting(None, "'ptb', a .txt or a .jsonl file (its train split)", required=True)
    output: str = setting(None, "folder for diagnose.json, diagnose.md, diagnose.png", required=True)
    overwrite: bool = setting(False, "replace a non-empty output folder")
    at_steps: str = setting("0,10,50", "LoRA fine-tuning steps at which to measure")
    probe_batches: int = setting(2, "fixed batches measured each time")
    layers_per_pass: int = setting(1, "layers whose true dL/dW0 one backward pass computes (memory vs time)")
    quiet: bool = setting(False, "no progress bar")

    def __post_init__(self):
        _require_positive(self, "probe_batches", "layers_per_pass")
        self.steps  # noqa: B018 -- fails now on a bad --at-steps

    @property
    def steps(self) -> list[int]:
        """--at-steps as sorted distinct step numbers."""
        try:
            steps = sorted({int(step) for step in self.at_steps.split(",") if step.strip()})
        except ValueError:
            raise LoraPruneError(
                f"--at-steps must be step numbers separated by commas (got {self.at_steps!r})"
            ) from None
        if not steps or steps[0] < 0:
            raise LoraPruneError(f"--at-steps must be step numbers >= 0 (got {self.at_steps!r})")
        return steps


@dataclass
class ExportSettings:
    """`export`'s settings: a saved model in another format."""

    model: str = setting(None, "output folder of `loraprune prune` (or 'smollm2', a .gguf or a model folder)",
                         positional=True)  # fmt: skip
    output: str = setting(None, "file to write, e.g. model.gguf", required=True)
    format: str = setting("gguf", "file format", choices=("gguf",))
    outtype: str = setting(
        "f32",
        "weight type; the quantized ones are made by llama.cpp's llama-quantize ($LORAPRUNE_LLAMACPP or PATH), "
        "which reports any tensor it writes in a fallback type",
        choices=("f32", "f16", "bf16", *QUANTIZED),
    )
    overwrite: bool = setting(False, "replace an existing output file")


@dataclass
class ReportSettings:
    """`report`'s settings."""

    run_dir: str = setting(None, "output folder of `loraprune prune`", positional=True)
