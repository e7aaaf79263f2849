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

- causal-lm: next-token loss on token windows; perplexity.
- embedding (BERT sentence encoders): loss 1 − cos(pruned mean-pooled embedding, dense
  embedding of the same sentence), teacher embeddings computed once up front (`teacher` in the
  training examples); evaluated by the
  cosine to the dense model's embeddings and nearest-neighbour agreement on held-out sentences.
- image-classification (ViT): cross-entropy on labels; accuracy.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .archs import TASK_MODELS, task_name
from .config import TASK_NAMES
from .errors import LoraPruneError
from .pipeline.data import (
    bos_token_id,
    load_images,
    load_sentences,
    load_text,
    num_examples,
    pad_sentences,
    tokenize,
    trim_padding,
    windows,
)
from .pipeline.evaluate import count_parameters, greedy_generate, perplexity
from .pipeline.lm_loss import causal_lm_loss as chunked_lm_loss
from .pipeline.lm_loss import distillation_loss, distilled_causal_lm_loss

SPEED_REPEATS = 3  # throughput is the median of this many timings
MIN_TIMING_SECONDS = 0.5  # each timing repeats whole passes over the eval set for at least this long


@dataclass(frozen=True)
class Task:
    name: str  # its Auto class and input processor: archs.TASK_MODELS
    load: Callable[[str, str], Any]  # (data spec, split) -> raw data (text, sentences, images)
    examples: Callable[..., Tensor | dict]  # (dense model, tokenizer, raw, config) -> training examples
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
    # meta device: what the memory estimate traces (tools/memory.py)
    meta_inputs: Callable[[Any, int, int], dict] | None = None

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads such a model."""
        return TASK_MODELS[self.name][0]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


# ---- causal LM ----

PROMPT = "the company said it expects"  # the greedy sample printed after a run


def _lm_forward(model: nn.Module, batch: Tensor):
    batch = batch.to(_device(model))
    return model(input_ids=batch, labels=batch)  # the model's own next-token loss, as transformers computes it


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The next-token loss, without the whole logits in memory (lm_loss.py)."""
    return chunked_lm_loss(model, batch.to(_device(model)))


def _lm_distilled_loss(model: nn.Module, batch: Tensor, teacher, distill: float, temperature: float) -> Tensor | None:
    """The next-token loss mixed with distillation, without the whole logits of either model (lm_loss.py)."""
    return distilled_causal_lm_loss(model, batch.to(_device(model)), teacher.run, distill, temperature)


def _own_loss(output, batch, dense) -> Tensor:
    return output.loss


def _logits(output) -> Tensor:
    return output.logits


def _lm_examples(model, tokenizer, text: str, config) -> Tensor:
    return windows(tokenize(tokenizer, text), config.seq_len, bos_token_id(tokenizer))


def _lm_eval_set(model, tokenizer, text: str, seq_len: int, limit: int | None) -> Tensor:
    return windows(tokenize(tokenizer, text), seq_len, bos_token_id(tokenizer))[:limit]


def _lm_evaluate(model, eval_set: Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    return perplexity(model, eval_set, batch_size, progress=progress)


def _lm_probe(model, eval_set) -> dict:
    """16 seeded random token ids: they check the weights whether or not there was an evaluation."""
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(_device(model))}


def _token_inputs(model_config, batch_size: int, seq_len: int) -> dict:
    # no attention mask: a full one is what training batches hold, and masks cannot be built on meta
    return {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")}


def _lm_sample(model, tokenizer) -> str:
    return f"greedy sample: {PROMPT!r} -> {greedy_generate(model, tokenizer, PROMPT, max_new_tokens=20)!r}"


# ---- sentence embeddings ----


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the token vectors a sentence's attention mask keeps (sentence-transformers' pooling)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, batch: dict) -> Tensor:
    """Mean-pooled last hidden states of a batch of padded sentences (float32)."""
    batch = _to(trim_padding({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}), _device(model))
    hidden = model(**batch).last_hidden_state
    return mean_pool(hidden.float(), batch["attention_mask"])


@torch.inference_mode()
def encode(model: nn.Module, inputs: dict, batch_size: int = 64) -> Tensor:
    """Embeddings [n, hidden] of padded sentences, in batches (on the CPU)."""
    was_training = model.training
    model.eval()
    try:
        n = len(inputs["input_ids"])
        parts = [
            embed(model, {k: v[i : i + batch_size] for k, v in inputs.items()}).cpu() for i in range(0, n, batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def embedding_loss(embeddings: Tensor, batch: dict, dense: Tensor | None = None) -> Tensor:
    """1 − cosine between the model's embedding and the dense model's (`dense`, else the batch's
    `teacher`, computed up front by the task's examples), per sentence."""
    dense = batch["teacher"] if dense is None else dense
    return 1 - F.cosine_similarity(embeddings, dense.to(embeddings.device), dim=-1).mean()


def _embedding_examples(model, tokenizer, sentences: list[str] | str, config) -> dict:
    """The sentences training will see, padded, with the dense `model`'s embedding of each
    (`teacher`: the loss's target, one forward per sentence as a per-step teacher would cost, but
    from the dense model before it is pruned). Training draws steps × batch size × grad accum
    sentences: when the data has more, a sample of that many (seeded by --seed) is kept, not all
    of it (PTB train has 42k sentences). A text is one sentence per non-empty line."""
    if isinstance(sentences, str):
        sentences = [line.strip() for line in sentences.split("\n") if line.strip()]
    needed = config.steps * config.batch_size * config.grad_accum
    if len(sentences) > needed:
        picked = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(config.seed))[:needed]
        sentences = [sentences[i] for i in picked.sort().values.tolist()]
    inputs = pad_sentences(tokenizer, sentences, config.seq_len)
    return {**inputs, "teacher": encode(model, inputs)}


def _embedding_eval_set(teacher, tokenizer, sentences: list[str], seq_len: int, limit: int | None) -> dict:
    inputs = pad_sentences(tokenizer, sentences[:limit], seq_len)
    return inputs if teacher is None else {**inputs, "teacher": encode(teacher, inputs)}


def _input_probe(model, eval_set: dict | None) -> dict | None:
    """The first few examples' model inputs (no targets, no labels), or None without an eval set."""
    if eval_set is None:
        return None
    names = ("input_ids", "attention_mask", "pixel_values")
    return {k: v[:4].to(_device(model)) for k, v in eval_set.items() if k in names}


def neighbours(embeddings: Tensor, k: int) -> Tensor:
    """Indices [n, k] of each row's k nearest other rows by cosine similarity."""
    normed = F.normalize(embeddings.float(), dim=-1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices


def neighbour_agreement(embeddings: Tensor, reference: Tensor, k: int) -> float:
    """Mean fraction of each sentence's top-k neighbours (among the set) that the reference shares."""
    k = min(k, len(embeddings) - 1)
    if k < 1:
        raise LoraPruneError("neighbour agreement needs at least two sentences")
    mine, theirs = neighbours(embeddings, k), neighbours(reference, k)
    shared = (mine[:, :, None] == theirs[:, None, :]).any(-1).sum(1)
    return (shared.float() / k).mean().item()


def throughput(run: Callable[[], Any], items: int) -> float:
    """Items per second: median over SPEED_REPEATS timed runs."""
    return statistics.median(_rate(run, items) for _ in range(SPEED_REPEATS))


def _rate(run: Callable[[], Any], items: int) -> float:
    """Items per second of whole passes repeated for at least MIN_TIMING_SECONDS (tiny models
    take milliseconds a pass: one pass alone would time mostly noise)."""
    passes, started = 0, time.perf_counter()
    while True:
        run()
        passes += 1
        elapsed = time.perf_counter() - started
        if elapsed >= MIN_TIMING_SECONDS:
            return passes * items / elapsed


def _embedding_pass(model, eval_set: dict, batch_size: int = 64) -> Tensor:
    return encode(model, {k: eval_set[k] for k in ("input_ids", "attention_mask")}, batch_size)


def paired_speeds(task: Task, models: list[nn.Module], eval_set, batch_size: int = 64) -> list[float]:
    """Examples per second of each model, timed in alternation (A, B, A, B, ...) and each the median
    of SPEED_REPEATS passes, so that load from other processes on a shared machine hits all alike."""
    items = num_examples(eval_set)
    rates: list[list[float]] = [[] for _ in models]
    for model in models:
        task.timed_pass(model, eval_set, batch_size)  # warm-up
    for _ in range(SPEED_REPEATS):
        for model, model_rates in zip(models, rates, strict=True):
            model_rates.append(_rate(lambda model=model: task.timed_pass(model, eval_set, batch_size), items))
    return [statistics.median(model_rates) for model_rates in rates]


def _embedding_evaluate(model, eval_set: dict, batch_size: int = 64, progress: bool = False) -> dict:
    inputs = {k: eval_set[k] for k in ("input_ids", "attention_mask")}
    embeddings = encode(model, inputs, batch_size)
    n = len(embeddings)
    result = {"sentences": n, "parameters": count_parameters(model)}
    result["sentences_per_second"] = throughput(lambda: encode(model, inputs, batch_size), n)
    teacher = eval_set.get("teacher")
    if teacher is not None:
        result["cosine_to_dense"] = F.cosine_similarity(embeddings, teacher, dim=-1).mean().item()
        result["top1_agreement"] = neighbour_agreement(embeddings, teacher, 1)
        result["top5_agreement"] = neighbour_agreement(embeddings, teacher, 5)
    return result


# ---- image classification ----


def _classify(model: nn.Module, batch: dict):
    return model(**_to(batch, _device(model)))  # with labels: the model's own cross-entropy


def _image_examples(model, processor, images: tuple[Tensor, Tensor], config) -> dict:
    pixel_values, labels = images
    return {"pixel_values": pixel_values, "labels": labels}


def _image_inputs(model_config, batch_size: int, seq_len: int) -> dict:
    size, channels = model_config.image_size, model_config.num_channels
    pixel_values = torch.zeros(batch_size, channels, size, size, device="meta")
    return {"pixel_values": pixel_values, "labels": torch.zeros(batch_size, dtype=torch.long, device="meta")}


def _image_eval_set(model, processor, images: tuple[Tensor, Tensor], seq_len: int, limit: int | None) -> dict:
    pixel_values, labels = images
    return {"pixel_values": pixel_values[:limit], "labels": labels[:limit]}


@torch.inference_mode()
def _predict(model, pixel_values: Tensor, batch_size: int) -> Tensor:
    device = _device(model)
    return torch.cat(
        [
            model(pixel_values=pixel_values[i : i + batch_size].to(device)).logits.argmax(-1).cpu()
            for i in range(0, len(pixel_values), batch_size)
        ]
    )


def _image_pass(model, eval_set: dict, batch_size: int = 64) -> Tensor:
    model.eval()
    return _predict(model, eval_set["pixel_values"], batch_size)


def _image_evaluate(model, eval_set: dict, batch_size: int = 64, progress: bool = False) -> dict:
    was_training = model.training
    model.eval()
    try:
        pixel_values, labels = eval_set["pixel_values"], eval_set["labels"]
        predictions = _predict(model, pixel_values, batch_size)
        rate = throughput(lambda: _predict(model, pixel_values, batch_size), len(labels))
    finally:
        model.train(was_training)
    return {
        "accuracy": (predictions == labels).float().mean().item(),
        "images": len(labels),
        "images_per_second": rate,
        "parameters": count_parameters(model),
    }


TASKS: dict[str, Task] = {
    "causal-lm": Task(
        "causal-lm",
        load_text,
        _lm_examples,
        _lm_forward,
        _own_loss,
        _lm_eval_set,
        _lm_evaluate,
        _lm_probe,
        metrics=(
            ("perplexity", "{data} {split} perplexity ({windows})", ".2f"),
            ("tokens", "  tokens scored", "d"),
        ),
        sample=_lm_sample,
        multi_process=True,
        logits=_logits,
        direct_loss=causal_lm_loss,
        distilled_loss=_lm_distilled_loss,
        meta_inputs=_token_inputs,
    ),
    "embedding": Task(
        "embedding",
        load_sentences,
        _embedding_examples,
        embed,
        embedding_loss,
        _embedding_eval_set,
        _embedding_evaluate,
        _input_probe,
        heading="{data} {split} ({task}):",
        metrics=(
            ("cosine_to_dense", "mean cosine to the dense embedding", ".4f"),
            ("top1_agreement", "top-1 neighbour agreement with dense", ".3f"),
            ("top5_agreement", "top-5 neighbour agreement with dense", ".3f"),
            ("sentences_per_second", "encode speed, sentences/s", ".0f"),
            ("sentences", "held-out sentences", "d"),
        ),
        timed_pass=_embedding_pass,
        speed_key="sentences_per_second",
        compares_to_dense=True,
        meta_inputs=_token_inputs,
    ),
    "image-classification": Task(
        "image-classification",
        load_images,
        _image_examples,
        _classify,
        _own_loss,
        _image_eval_set,
        _image_evaluate,
        _input_probe,
        heading="{data} {split} ({task}):",
        metrics=(
            ("accuracy", "test accuracy", ".4f"),
            ("images_per_second", "speed, images/s", ".0f"),
            ("images", "test images", "d"),
        ),
        timed_pass=_image_pass,
        speed_key="images_per_second",
        logits=_logits,
        meta_inputs=_image_inputs,
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
