"""Tasks: what a model is fine-tuned on while it is pruned, and how it is measured. One entry each.

A task is data + functions: how a dataset split is read, how training examples are made, what
the model computes on a batch and the loss of that, the evaluation, and what proves a saved
folder reloads. The embedding task's loss compares with the dense model's embeddings of the
training sentences, computed once up front (so the model may shrink physically while it trains);
`--distill` (tasks with logits) compares with the dense model's logits, which come from the same
weights with the adapter disabled and the masks lifted (train.DenseTeacher), one forward per step. The
job (job.py) runs every task through the same steps; nothing outside this table and the
architecture table (archs.py) needs to know a task by name. Each family's default task is
`Arch.task`; `--task` overrides it.

Each task's functions live in a module of their own (causal_lm.py, embedding.py, image.py, with
what they share in common.py); this module holds the Task type, the table and what reads it.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..archs import TASK_MODELS, task_name
from ..errors import LoraPruneError
from ..pipeline.data import load_images, load_sentences
from ..pipeline.lm_loss import distillation_loss
from ..pipeline.texts import load_text
from ..prune_config import TASK_NAMES
from . import causal_lm, embedding, image
from .common import input_probe, logits, own_loss, token_inputs


@dataclass(frozen=True)
class Task:
    name: str  # its Auto class and input processor: archs.TASK_MODELS
    load: Callable[[str, str], Any]  # (data spec, split) -> raw data (text, sentences, images)
    # (dense model, tokenizer, raw, config, store, progress) -> training examples; store: a folder of
    # this run where what is costly to make may be kept for --resume, or None; progress: show a bar
    # while something long is computed
    examples: Callable[..., Tensor | dict]
    forward: Callable[[nn.Module, Any], Any]  # (model, batch on the CPU) -> what the loss reads
    loss: Callable[[Any, Any, Any], Tensor]  # (output, batch, the dense model's output or None) -> scalar
    # (teacher or None, tokenizer, raw, seq_len, limit) -> what evaluate reads; the teacher is the
    # dense model where the task compares with it (embedding), unused otherwise
    eval_set: Callable[..., Any]
    evaluate: Callable[..., dict]  # (model, eval set, batch size, progress) -> metrics
    probe: Callable[[nn.Module, Any], dict | None]  # (model, eval set or None) -> inputs for the reload check
    # metrics shown in tables: (key, label, format); labels may name {data}, {split}, {seq_len}, {task}
    metrics: tuple[tuple[str, str, str], ...] = ()
    heading: str | None = None  # a line above the metrics in the summary (the same fields)
    # speed: one timed pass over the eval set, and the metric key it is reported under
    timed_pass: Callable[..., Any] | None = None  # (model, eval set, batch size) -> anything
    speed_key: str | None = None
    sample: Callable[[nn.Module, Any], str] | None = None  # (model, tokenizer) -> text printed after a run
    compares_to_dense: bool = False  # evaluation needs the dense model (eval: --reference)
    logits: Callable[[Any], Tensor] | None = None  # an output's logits, for --distill (None: it does not apply)
    # (model, batch) -> the loss straight from the model, in less memory than forward + loss; used
    # where nothing else reads the output (no teacher, no --distill)
    direct_loss: Callable[[nn.Module, Any], Tensor] | None = None
    # (model, batch, train.DenseTeacher, distill, temperature) -> the --distill loss in less memory
    # than forward + logits, or None where this model cannot (the whole logits are used then)
    distilled_loss: Callable[..., Tensor | None] | None = None
    multi_process: bool = False  # runs under torchrun / accelerate (DDP, FSDP) and with 8-/4-bit weights
    # (model config, batch size, seq len) -> the model's keyword inputs for one training batch, on the
    # meta device: what the memory estimate traces (tools/estimate.py)
    meta_inputs: Callable[[Any, int, int], dict] | None = None
    # texts on which every run compares the dense and the pruned model besides its own data's test
    # split, unless --eval-data names others; and the metric whose pruned/dense ratio tables show
    held_out: tuple[str, ...] = ()
    ratio_key: str | None = None
    top_k_distill: bool = False  # examples carry the dense model's top-k logits under --distill-top-k
    # the recipe a run gets unless its flags say otherwise: the text it tunes on (None: --data is
    # required), the weight of distillation from the dense model, and from how many of its most
    # likely tokens (0: its whole distribution)
    default_data: str | None = None
    default_distill: float = 0.0
    default_distill_top_k: int = 0

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads such a model."""
        return TASK_MODELS[self.name][0]


TASKS: dict[str, Task] = {
    "causal-lm": Task(
        "causal-lm",
        load_text,
        causal_lm.examples,
        causal_lm.forward,
        own_loss,
        causal_lm.eval_set,
        causal_lm.evaluate,
        causal_lm.probe,
        metrics=(
            ("perplexity", "{data} {split} perplexity ({windows})", ".2f"),
            ("tokens", "  tokens scored", "d"),
        ),
        sample=causal_lm.sample,
        multi_process=True,
        logits=logits,
        direct_loss=causal_lm.causal_lm_loss,
        distilled_loss=causal_lm.distilled_loss,
        meta_inputs=token_inputs,
        held_out=("ptb", "pydoc"),
        ratio_key="perplexity",
        top_k_distill=True,
        # general English, distilled from the dense model: what keeps the model's ability on text it
        # was not tuned on, on three seeds (docs/benchmarks/recipes.md#general); top-256 matches the
        # whole logits there
        default_data="gcide+foldoc",
        default_distill=0.9,
        default_distill_top_k=256,
    ),
    "embedding": Task(
        "embedding",
        load_sentences,
        embedding.examples,
        embedding.embed,
        embedding.embedding_loss,
        embedding.eval_set,
        embedding.evaluate,
        input_probe,
        heading="{data} {split} ({task}):",
        metrics=(
            ("cosine_to_dense", "mean cosine to the dense embedding", ".4f"),
            ("top1_agreement", "top-1 neighbour agreement with dense", ".3f"),
            ("top5_agreement", "top-5 neighbour agreement with dense", ".3f"),
            ("sentences_per_second", "encode speed, sentences/s", ".0f"),
            ("sentences", "held-out sentences", "d"),
        ),
        timed_pass=embedding.timed_pass,
        speed_key="sentences_per_second",
        compares_to_dense=True,
        meta_inputs=token_inputs,
    ),
    "image-classification": Task(
        "image-classification",
        load_images,
        image.examples,
        image.forward,
        own_loss,
        image.eval_set,
        image.evaluate,
        input_probe,
        heading="{data} {split} ({task}):",
        metrics=(
            ("accuracy", "test accuracy", ".4f"),
            ("images_per_second", "speed, images/s", ".0f"),
            ("images", "test images", "d"),
        ),
        timed_pass=image.timed_pass,
        speed_key="images_per_second",
        logits=logits,
        meta_inputs=image.meta_inputs,
    ),
}


assert tuple(TASKS) == TASK_NAMES  # the names config validates --task against


def objective(task: Task, teacher=None, distill: float = 0.0, temperature: float = 1.0):
    """The loss train() minimises on (model, batch): the task's, mixed with distillation from the
    dense model when `distill` > 0. `teacher(batch)` is the dense model's output (train.DenseTeacher),
    needed by tasks whose loss compares with it and by distillation."""
    if teacher is None and not distill and task.direct_loss is not None:
        return task.direct_loss

    def loss(model: nn.Module, batch) -> Tensor:
        if distill and task.distilled_loss is not None:
            value = task.distilled_loss(model, batch, teacher, distill, temperature)
            if value is not None:
                return value
        output = task.forward(model, batch)
        dense = teacher(batch) if teacher is not None else None
        value = task.loss(output, batch, dense)
        if distill:
            kl = distillation_loss(task.logits(output), task.logits(dense), temperature)
            value = (1 - distill) * value + distill * kl
        return value

    return loss


def task_for(model_config, name: str | None = None) -> Task:
    """The task called `name`, or the default of the model's family."""
    name = task_name(model_config, name)
    if name not in TASKS:
        raise LoraPruneError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def model_output(model: nn.Module, inputs: dict) -> tuple[str, Tensor]:
    """What a model computes on its inputs, named: ("logit", logits) or ("output", last hidden states)."""
    out = model(**inputs)
    return ("logit", out.logits) if hasattr(out, "logits") else ("output", out.last_hidden_state)


def metric_rows(task_name: str, *results: dict | None, fields: dict | None = None) -> list[tuple[str, ...]]:
    """(label, value per result) for each of the task's metrics present in any result; labels are
    filled in from `fields` (data, split, seq_len, task)."""
    rows = []
    for key, label, fmt in TASKS[task_name].metrics:
        values = [format(result[key], fmt) if result and key in result else "" for result in results]
        if any(values):
            rows.append((label.format(**(fields or {})), *values))
    return rows
