"""The jobs behind `loraprune prune` and `loraprune eval`, one path for every task (tasks/):
check → load → evaluate dense → prune → evaluate pruned → save → reload with stock transformers."""

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from .errors import LoraPruneError
from .pipeline.counts import count_parameters, count_prunable
from .pipeline.export import REPORT_FILE, check_output, save_pruned
from .pipeline.gguf_export import check_gguf_output, describe_export, export_gguf
from .pipeline.load import load_config, load_model
from .pipeline.modeling_pruned import LAYOUT_KEY
from .pipeline.texts import tuned_on
from .plan import check_compatible
from .prune_config import PruneConfig
from .pruning import prune
from .run_settings import EvalSettings, RunSettings, eval_list, record
from .runtime import distributed
from .runtime.checkpoint import Checkpoint, Checkpointer, check_no_checkpoints, checkpoint_dir
from .tasks import Task, model_output, task_for
from .tasks.common import MIN_TIMING_SECONDS, SPEED_REPEATS, paired_speeds
from .tools.preflight import check_memory
from .tools.report import format_summary, write_report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prune_job(config: PruneConfig, run: RunSettings, resume: Checkpoint | None = None) -> dict:
    """Prune `run.model` on `run.data`'s train split, compare it with the dense model on the test
    split, save it to `run.output`, then reload the folder with stock transformers and print.

    Checkpoints go to OUT.checkpoints every `run.checkpoint_every` steps and on Ctrl-C
    (checkpoint.py); `resume` continues from one. They are removed once the output is saved."""
    started = time.perf_counter()
    output, progress, evaluate = Path(run.output), not run.quiet, run.evaluate
    check_output(output, run.overwrite)  # every check that needs no weights comes first
    if run.gguf is not None:
        check_gguf_output(Path(run.gguf), run.overwrite)
    model_config = load_config(run.model)
    plan = check_compatible(model_config, config, quantized=run.quantize_bits is not None)
    if run.memory_check:  # from the config alone: a run that cannot fit fails in seconds
        check_memory(model_config, plan.config, run, plan.sharded)
    task = plan.task
    run = with_data(run, task)
    # torchrun / accelerate launch: every rank trains (DDP), rank 0 alone evaluates, prints and writes
    main = not distributed.init() or distributed.is_main()
    if not main:
        evaluate = progress = False
    several = distributed.active() or plan.sharded
    if several and not (task.multi_process and run.quantize_bits is None):
        what = f"--load-in-{run.quantize_bits}bit" if run.quantize_bits else f"the {task.name} task"
        raise LoraPruneError(
            f"several processes and FSDP support causal LMs without 8-/4-bit loading so far, not {what}: "
            "run it in one process without --fsdp"
        )
    teacher_cache = None if run.teacher_cache is None else Path(run.teacher_cache)
    if teacher_cache and not (task.top_k_distill and plan.config.distill and plan.config.distill_top_k):
        raise LoraPruneError("--teacher-cache keeps the dense model's top-k, which only a causal LM's --distill with "
                             "--distill-top-k computes")  # fmt: skip
    if teacher_cache and several:
        raise LoraPruneError("--teacher-cache is read and written by one process: run without it")
    checkpoints = checkpoint_dir(output)
    if resume is None:
        check_no_checkpoints(checkpoints, run.overwrite)
    other_texts = eval_texts(task, run) if evaluate else []  # checked before anything is loaded or written
    train_data = task.load(run.data, "train")
    test_data = task.load(run.data, "test") if evaluate else None
    model, tokenizer = load_model(run.model, DTYPES[run.dtype], run.quantize_bits, task=task.name)
    if distributed.device() is not None:  # several processes on GPUs: each rank on its own
        model.to(distributed.device())
    checkpointer = Checkpointer(checkpoints, record(config, run), every=run.checkpoint_every, replace=resume is None)

    eval_set = evaluation = None
    if evaluate:  # the dense numbers (and the embedding teacher) come before the model is pruned in place
        eval_set = task.eval_set(model, tokenizer, test_data, plan.config.seq_len, run.eval_windows)
        evaluation = {"data": run.data, "split": "test", "task": task.name, "seq_len": plan.config.seq_len,
                      "tuned_on": True}  # fmt: skip
        evaluation["dense"] = task.evaluate(model, eval_set, run.eval_batch_size, progress)
        other_sets = {spec: task.eval_set(model, tokenizer, task.load(spec, "test"), plan.config.seq_len,
                                          run.eval_windows) for spec in other_texts}  # fmt: skip
        evaluation["other_texts"] = [
            {"data": spec, "split": "test", "tuned_on": tuned_on(spec, run.data),
             "dense": task.evaluate(model, other_sets[spec], run.eval_batch_size, progress)}
            for spec in other_texts
        ]  # fmt: skip

    pruned, report = prune(
        model, tokenizer, train_data, plan, progress, checkpointer, resume, teacher_cache=teacher_cache
    )
    if evaluate:
        evaluation["pruned"] = task.evaluate(pruned, eval_set, run.eval_batch_size, progress)
        for text in evaluation["other_texts"]:
            text["pruned"] = task.evaluate(pruned, other_sets[text["data"]], run.eval_batch_size, progress)
        if task.ratio_key is not None:
            for text in (evaluation, *evaluation["other_texts"]):
                text["ratio"] = text["pruned"][task.ratio_key] / text["dense"][task.ratio_key]
        if task.timed_pass is not None:
            _time_dense_and_pruned(task, run, pruned, eval_set, evaluation)
    report.update(model=run.model, data=run.data, evaluation=evaluation)
    report["wall_seconds"] = time.perf_counter() - started
    if resume is not None:
        report["resumed_from_step"] = resume.step
    if not main:
        return report  # the other ranks are done: rank 0 saves (the CLI waits for it)
    save_pruned(pruned, tokenizer, output, report, overwrite=run.overwrite, extras=write_report)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the output is complete: nothing left to resume
    print(format_summary(report))
    print(_reload_check(task, pruned, tokenizer, output, eval_set))
    if run.gguf is not None:
        print(describe_export(export_gguf(output, Path(run.gguf), "f32", overwrite=run.overwrite)))
    return report


def with_data(run: RunSettings, task: Task) -> RunSettings:
    """`run` with --data decided: the task's default text (causal LMs: general English) where none was given."""
    if run.data is not None:
        return run
    if task.default_data is None:
        raise LoraPruneError(f"--data is required for the {task.name} task")
    return replace(run, data=task.default_data)


def eval_texts(task: Task, run: RunSettings) -> list[str]:
    """The texts besides --data's test split on which the dense and the pruned model are compared:
    --eval-data, or the task's held-out default (causal LMs: ptb, pydoc), without --data itself."""
    if run.eval_data is None:
        return [spec for spec in task.held_out if spec != run.data]
    if not task.held_out:
        raise LoraPruneError(f"--eval-data applies to text tasks with held-out texts, not the {task.name} task")
    return [spec for spec in eval_list(run.eval_data) if spec != run.data]


def _time_dense_and_pruned(task: Task, run: RunSettings, pruned, eval_set, evaluation: dict) -> None:
    """Speeds again, dense (reloaded: it was pruned in place) and pruned timed in alternation."""
    dense = load_model(run.model, DTYPES[run.dtype], task=task.name)[0]
    speeds = paired_speeds(task, [dense, pruned], eval_set, run.eval_batch_size)
    for result, speed in zip((evaluation["dense"], evaluation["pruned"]), speeds, strict=True):
        result[task.speed_key] = speed
    evaluation["speed"] = (
        f"median of {SPEED_REPEATS} timings (each >= {MIN_TIMING_SECONDS} s of whole passes), "
        "dense and pruned alternating"
    )


def _reload_check(task: Task, pruned, tokenizer, output: Path, eval_set) -> str:
    """Prove the folder stands alone: stock transformers, remote code only for per-layer shapes."""
    per_layer = hasattr(pruned.config, LAYOUT_KEY)
    auto = getattr(transformers, task.auto_class)
    reloaded = auto.from_pretrained(output, trust_remote_code=per_layer, local_files_only=True)
    how = f"{task.auto_class}.from_pretrained({str(output)!r}" + (", trust_remote_code=True)" if per_layer else ")")
    probe = task.probe(pruned, eval_set)
    if probe is None:
        return f"\nreloaded with {how}"
    with torch.inference_mode():
        what, theirs = model_output(reloaded, probe)
        drift = (theirs - model_output(pruned, probe)[1]).abs().max().item()
    line = f"\nreloaded with {how}: max |{what} difference| vs in-memory model {drift:.2e}"
    return line if task.sample is None else f"{line}\n{task.sample(reloaded, tokenizer)}"


def evaluate_job(settings: EvalSettings) -> dict:
    """A model's metrics on the test split of each text of `settings.data` (comma-separated for text
    tasks): perplexity and parameter counts for a causal LM, the task's own metrics otherwise
    (tasks/). The reference is `settings.reference`, by default the model a pruned folder's
    loraprune.json names: a task that compares with the dense model needs it, and a causal LM is
    compared with it (both perplexities and their ratio, the texts the run tuned on marked).
    The first text's metrics are the result's own keys; the others are under "other_texts"."""
    task = task_for(load_config(settings.model), settings.task)
    specs = eval_list(settings.data, "--data") if task.held_out else [settings.data]
    tests = [task.load(spec, "test") for spec in specs]  # every text read before any model
    loaded, tokenizer = load_model(settings.model, task=task.name)
    reference, tuning_data = settings.reference, None
    report_file = Path(settings.model) / REPORT_FILE
    if report_file.is_file():
        saved = json.loads(report_file.read_text())
        reference, tuning_data = reference or saved.get("model"), saved.get("data")
    compare = reference is not None and (task.compares_to_dense or task.ratio_key is not None)
    dense = load_model(reference, task=task.name)[0] if compare else None
    texts = []
    for spec, test_data in zip(specs, tests, strict=True):
        teacher = dense if task.compares_to_dense else None
        eval_set = task.eval_set(teacher, tokenizer, test_data, settings.seq_len, settings.eval_windows)
        text = {"data": spec, "split": "test", "tuned_on": tuning_data is not None and tuned_on(spec, tuning_data)}
        text |= task.evaluate(loaded, eval_set, settings.eval_batch_size, progress=not settings.json)
        if dense is not None and task.ratio_key is not None:
            text["pruned"] = {key: value for key, value in text.items() if key not in ("data", "split", "tuned_on")}
            text["dense"] = task.evaluate(dense, eval_set, settings.eval_batch_size, progress=not settings.json)
            text["ratio"] = text["pruned"][task.ratio_key] / text["dense"][task.ratio_key]
        texts.append(text)
    result = texts[0] | {"other_texts": texts[1:], "seq_len": settings.seq_len}
    result.update(model=settings.model, task=task.name, reference=reference if compare else None)
    result.update(parameters=count_parameters(loaded), prunable_parameters=count_prunable(loaded))
    return result
