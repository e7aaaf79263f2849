"""The command-line jobs as functions: load → prune → evaluate → save → reload, and eval."""

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from . import distributed, fsdp
from .api import check_compatible, prune
from .checkpoint import Checkpoint, Checkpointer, check_no_checkpoints, checkpoint_dir
from .config import PruneConfig
from .data import load_text, tokenize, windows
from .errors import LoraPruneError
from .evaluate import count_parameters, count_prunable, greedy_generate, perplexity
from .export import check_output, save_pruned
from .load import load_config, load_model
from .modeling_pruned import LAYOUT_KEY
from .report import format_summary

PROMPT = "the company said it expects"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prune_and_save(
    model: str,
    data: str,
    output: Path,
    config: PruneConfig,
    overwrite: bool = False,
    evaluate: bool = True,
    eval_batch_size: int = 8,
    eval_windows: int | None = None,
    progress: bool = True,
    dtype: str = "float32",
    quantize_bits: int | None = None,
    checkpoint_every: int | None = None,
    run: dict | None = None,
    resume: Checkpoint | None = None,
) -> dict:
    """Prune `model` on `data`'s train split, compare perplexity on its test split, save to `output`,
    then reload the folder with stock transformers and print a greedy sample from it.

    Checkpoints go to OUT.checkpoints every `checkpoint_every` steps and on Ctrl-C (checkpoint.py),
    recording `run` (the settings `--resume` restores); `resume` continues from one. The folder is
    removed once the output is saved."""
    started = time.perf_counter()
    check_output(output, overwrite)  # every check that needs no model comes first
    task = model_task(model, config.task)
    # torchrun / accelerate launch: every rank trains (DDP), rank 0 alone evaluates, prints and writes
    main = not distributed.init() or distributed.is_main()
    if not main:
        evaluate = progress = False
    if (distributed.active() or fsdp.requested(config.fsdp)) and (task.name != "causal-lm" or quantize_bits):
        what = f"--load-in-{quantize_bits}bit" if quantize_bits is not None else f"the {task.name} task"
        raise LoraPruneError(
            f"several processes and FSDP support causal LMs without 8-/4-bit loading so far, not {what}: "
            "run it in one process without --fsdp"
        )
    if task.name != "causal-lm":  # encoders: their own data, loss and metrics (tasks.py)
        from .task_workflow import prune_and_save_task

        if dtype not in DTYPES:
            raise LoraPruneError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        return prune_and_save_task(
            task,
            model,
            data,
            output,
            config,
            overwrite,
            evaluate,
            eval_batch_size,
            eval_windows,
            progress,
            DTYPES[dtype],
        )
    checkpoints = checkpoint_dir(output)
    if resume is None:
        check_no_checkpoints(checkpoints, overwrite)
    train_text = load_text(data, "train")
    eval_text = load_text(data, "test") if evaluate else None
    if dtype not in DTYPES:
        raise LoraPruneError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    dense_model, tokenizer = load_model(model, DTYPES[dtype], quantize_bits)
    if distributed.device() is not None:  # several processes on GPUs: each rank on its own
        dense_model.to(distributed.device())
    check_compatible(dense_model.config, config)
    run = run if run is not None else {"model": model, "data": data, "output": str(output), **asdict(config)}
    checkpointer = Checkpointer(checkpoints, run, every=checkpoint_every, replace=resume is None)

    evaluation = None
    if evaluate:
        eval_set = windows(tokenize(tokenizer, eval_text), config.seq_len)[:eval_windows]
        evaluation = {"data": data, "split": "test", "seq_len": config.seq_len}
        evaluation["dense"] = perplexity(dense_model, eval_set, eval_batch_size, progress=progress)

    pruned, report = prune(
        dense_model, tokenizer, train_text, config, progress=progress, checkpointer=checkpointer, resume=resume
    )
    if evaluate:
        evaluation["pruned"] = perplexity(pruned, eval_set, eval_batch_size, progress=progress)
    report.update(model=model, data=data, evaluation=evaluation)
    report["wall_seconds"] = time.perf_counter() - started
    if resume is not None:
        report["resumed_from_step"] = resume.step
    if not main:
        return report  # the other ranks are done: rank 0 saves (cli.run_prune waits for it)
    save_pruned(pruned, tokenizer, output, report, overwrite=overwrite)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the output is complete: nothing left to resume

    # Prove the folder stands alone: stock transformers, remote code only for per-layer shapes.
    per_layer = hasattr(pruned.config, LAYOUT_KEY)
    reloaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=per_layer, local_files_only=True)
    probe = torch.randint(0, pruned.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        drift = (reloaded(input_ids=probe).logits - pruned(input_ids=probe).logits).abs().max().item()
    print(format_summary(report))
    how = (
        "AutoModelForCausalLM.from_pretrained("
        + repr(str(output))
        + (", trust_remote_code=True)" if per_layer else ")")
    )
    print(f"\nreloaded with {how}: max |logit difference| vs in-memory model {drift:.2e}")
    print(f"greedy sample: {PROMPT!r} -> {greedy_generate(reloaded, tokenizer, PROMPT, max_new_tokens=20)!r}")
    return report


def model_task(model: str, task: str | None = None):
    """The task to run on a model spec: `task` if given, else its model type's (config only)."""
    from .tasks import TASKS, task_for

    if task is not None:
        return TASKS[task]
    if model == "smollm2" or model.endswith(".gguf"):
        return TASKS["causal-lm"]
    return task_for(load_config(model))


def evaluate_model(
    model: str,
    data: str,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    task: str | None = None,
    reference: str | None = None,
) -> dict:
    """Perplexity on `data`'s test split and parameter counts of a model (an encoder: its task's
    metrics, task_workflow.evaluate_task_model)."""
    found = model_task(model, task)
    if found.name != "causal-lm":
        from .task_workflow import evaluate_task_model

        return evaluate_task_model(found, model, data, seq_len, max(batch_size, 1), max_windows, reference)
    text = load_text(data, "test")
    loaded, tokenizer = load_model(model)
    result = perplexity(loaded, windows(tokenize(tokenizer, text), seq_len)[:max_windows], batch_size, progress=True)
    result.update(model=model, data=data, split="test", parameters=count_parameters(loaded))
    result["prunable_parameters"] = count_prunable(loaded)
    return result
