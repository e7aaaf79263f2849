"""embedding (BERT sentence encoders): loss 1 − cos(pruned mean-pooled embedding, the dense model's
embedding of the same sentence), the dense embeddings computed once up front (`teacher` in the
training examples); evaluated by the cosine to the dense embeddings and nearest-neighbour agreement
on held-out sentences."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoraPruneError
from ..pipeline.counts import count_parameters
from ..pipeline.data import pad_sentences, trim_padding
from .common import device_of, throughput, to_device


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the token vectors a sentence's attention mask keeps (sentence-transformers' pooling)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, batch: dict) -> Tensor:
    """Mean-pooled last hidden states of a batch of padded sentences (float32)."""
    inputs = trim_padding({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    batch = to_device(inputs, device_of(model))
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


def examples(model, tokenizer, sentences: list[str] | str, config, store=None, progress=False) -> dict:
    """The sentences training will see, padded, with the dense `model`'s embedding of each
    (`teacher`: the loss's target, one forward per sentence as a per-step teacher would cost, but
    from the dense model before it is pruned). Training draws steps × batch size × grad accum
    sentences: when the data has more, a sample of that many (seeded by --seed) is kept, not all
    of it (PTB train has 42k sentences). A text is one sentence per non-empty line. Nothing is kept
    in `store`: the sentences' embeddings take seconds to make again."""
    if isinstance(sentences, str):
        sentences = [line.strip() for line in sentences.split("\n") if line.strip()]
    needed = config.steps * config.batch_size * config.grad_accum
    if len(sentences) > needed:
        picked = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(config.seed))[:needed]
        sentences = [sentences[i] for i in picked.sort().values.tolist()]
    inputs = pad_sentences(tokenizer, sentences, config.seq_len)
    return {**inputs, "teacher": encode(model, inputs)}


def eval_set(teacher, tokenizer, sentences: list[str], seq_len: int, limit: int | None) -> dict:
    inputs = pad_sentences(tokenizer, sentences[:limit], seq_len)
    return inputs if teacher is None else {**inputs, "teacher": encode(teacher, inputs)}


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


def timed_pass(model, eval_set: dict, batch_size: int = 64) -> Tensor:
    return encode(model, {k: eval_set[k] for k in ("input_ids", "attention_mask")}, batch_size)


def evaluate(model, eval_set: dict, batch_size: int = 64, progress: bool = False) -> dict:
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
