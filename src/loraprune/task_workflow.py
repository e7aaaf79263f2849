"""`prune` and `eval` for the encoder tasks (embedding, image-classification): the same job as
workflow.py's causal-LM path (load → evaluate dense → prune → evaluate pruned → save → reload
with stock transformers), with the task's data, loss and metrics (tasks.py)."""

import json
import time
from pathlib import Path

import torch
import transformers

from .api import check_compatible, prune
from .config import PruneConfig
from .evaluate import count_parameters, count_prunable
from .export import auto_class_name, check_output, save_pruned
from .load import load_model
from .modeling_pruned import LAYOUT_KEY
from .report import REPORT_FILE, format_summary
from .tasks import MIN_TIMING_SECONDS, SPEED_REPEATS, Task, paired_speeds


def model_output(model, batch: dict) -> torch.Tensor:
    """What a model computes on a batch: logits, or the last hidden states."""
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _probe(eval_set: dict) -> dict:
    """The first few examples' model inputs (no targets, no labels)."""
    return {k: v[:4] for k, v in eval_set.items() if k in ("input_ids", "attention_mask", "pixel_values")}


def prune_and_save_task(
    task: Task,
    model: str,
    data: str,
    output: Path,
    config: PruneConfig,
    overwrite: bool = False,
    evaluate: bool = True,
    eval_batch_size: int = 64,
    eval_examples: int | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Prune an encoder on `data`'s train split, compare it with the dense model on the test split,
    save it to `output`, then reload the folder with stock transformers."""
    started = time.perf_counter()
    check_output(output, overwrite)
    train_data = task.load(data, "train")
    test_data = task.load(data, "test") if evaluate else None
    dense_model, tokenizer = load_model(model, dtype, task=task.name)
    check_compatible(dense_model.config, config)

    eval_set = evaluation = None
    if evaluate:  # the dense model's numbers (and the embedding teacher) come before it is pruned in place
        eval_set = task.eval_set(dense_model, tokenizer, test_data, config.seq_len, eval_examples)
        evaluation = {"data": data, "split": "test", "task": task.name}
        evaluation["dense"] = task.evaluate(dense_model, eval_set, eval_batch_size, progress)

    pruned, report = prune(dense_model, tokenizer, train_data, config, progress=progress)
    if evaluate:
        evaluation["pruned"] = task.evaluate(pruned, eval_set, eval_batch_size, progress)
        # speeds again, dense (reloaded: it was pruned in place) and pruned timed in alternation
        dense_again = load_model(model, dtype, task=task.name)[0]
        speeds = paired_speeds(task, [dense_again, pruned], eval_set, eval_batch_size)
        for result, speed in zip((evaluation["dense"], evaluation["pruned"]), speeds, strict=True):
            result[task.speed_key] = speed
        evaluation["speed"] = (
            f"median of {SPEED_REPEATS} timings (each >= {MIN_TIMING_SECONDS} s of whole passes), "
            "dense and pruned alternating"
        )
        del dense_again
    report.update(model=model, data=data, evaluation=evaluation)
    report["wall_seconds"] = time.perf_counter() - started
    save_pruned(pruned, tokenizer, output, report, overwrite=overwrite)

    # Prove the folder stands alone: stock transformers, remote code only for per-layer shapes.
    per_layer = hasattr(pruned.config, LAYOUT_KEY)
    auto = auto_class_name(pruned)
    reloaded = getattr(transformers, auto).from_pretrained(output, trust_remote_code=per_layer, local_files_only=True)
    print(format_summary(report))
    how = f"{auto}.from_pretrained({str(output)!r}" + (", trust_remote_code=True)" if per_layer else ")")
    if eval_set is not None:
        probe = _probe(eval_set)
        with torch.inference_mode():
            drift = (model_output(reloaded, probe) - model_output(pruned, probe)).abs().max().item()
        print(f"\nreloaded with {how}: max |output difference| vs in-memory model {drift:.2e}")
    else:
        print(f"\nreloaded with {how}")
    return report


def evaluate_task_model(
    task: Task,
    model: str,
    data: str,
    seq_len: int = 128,
    batch_size: int = 64,
    max_examples: int | None = None,
    reference: str | None = None,
) -> dict:
    """The task's metrics of a model on `data`'s test split. For embeddings, `reference` is the dense
    model compared with (default: the `model` recorded in a pruned folder's loraprune.json)."""
    loaded, tokenizer = load_model(model, task=task.name)
    test_data = task.load(data, "test")
    if task.name == "embedding":
        report_file = Path(model) / REPORT_FILE
        if reference is None and report_file.is_file():
            reference = json.loads(report_file.read_text()).get("model")
        teacher = load_model(reference, task=task.name)[0] if reference else loaded
        eval_set = task.eval_set(teacher, tokenizer, test_data, seq_len, max_examples)
        if not reference:
            del eval_set["teacher"]  # nothing to compare with
    else:
        eval_set = task.eval_set(loaded, tokenizer, test_data, seq_len, max_examples)
    result = task.evaluate(loaded, eval_set, batch_size)
    result.update(model=model, data=data, split="test", task=task.name, reference=reference)
    result["prunable_parameters"] = count_prunable(loaded)
    result["parameters"] = count_parameters(loaded)
    return result
