"""The dense model's top-k next-token distribution for every training window, computed once before
LoRA is attached (`--distill-top-k K`): distillation then needs no teacher forward per step and no
dense copy of the weights, so the model may shrink physically while it trains.

Each position keeps the ids (int32) of its K most likely tokens and K + 1 log-probabilities (float16,
at the distillation's temperature): those of the K, and that of every other token together, so the
loss keeps the probability the K leave (lm_loss._sparse_kl_and_its_gradient). 6·K + 2 bytes per
position, memory-mapped (10 MB per thousand 128-token windows at K = 64). A run with checkpoints keeps
them in its checkpoint folder (`store`, removed with it), so `--resume` reads them back instead of
running the dense model over every window again:

    OUT.checkpoints/teacher/   ids.npy, log_p.npy and COMPLETE (what they were computed from), renamed
                               into place from .teacher.partial-* once complete
Elsewhere they live in temporary files deleted when the run ends.
"""

import hashlib
import json
import math
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import LoraPruneError, write_error
from .export import staged_folder
from .lm_loss import TINY, chunked_head, head_logits, last_hidden_states, logit_softcap, loss_chunk_tokens

MARKER, FILES = "COMPLETE", ("ids.npy", "log_p.npy")


def memory_mapped(shape: tuple[int, ...], dtype: np.dtype, path: Path | None = None) -> np.memmap:
    """A zeroed array backed by the .npy file `path`, or by an anonymous temporary file (gone once the
    array is freed)."""
    if path is not None:  # inside a staged folder, whose errors name `path`
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        return np.memmap(tempfile.TemporaryFile(), dtype=dtype, mode="w+", shape=shape)
    except OSError as error:
        where = tempfile.gettempdir()
        raise write_error(error, f"writing the dense model's top-k to {where}", "training did not start") from error


def fingerprint(windows: Tensor, k: int, temperature: float) -> dict:
    """What stored targets were computed from, beside the model (a resumed run's is its checkpoint's)."""
    digest = hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"windows_sha256": digest, "shape": list(windows.shape), "k": k, "temperature": temperature}


def stored_targets(store: Path, made_from: dict) -> tuple[Tensor, Tensor] | None:
    """The targets in `store` if they are complete and were made from `made_from`, else None."""
    marker = store / MARKER
    if not marker.is_file() or json.loads(marker.read_text()) != made_from:
        return None
    # copy-on-write: the tensors are writable, the files never change
    ids, log_p = (torch.from_numpy(np.load(store / name, mmap_mode="c")) for name in FILES)
    return ids, log_p


@torch.no_grad()
def top_k_targets(model: nn.Module, windows: Tensor, k: int, temperature: float = 1.0,
                  batch_size: int = 8, store: Path | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(ids int32 [windows, tokens, k], log-probabilities float16 [windows, tokens, k + 1]): the dense
    `model`'s top-k next tokens at every position of `windows` [n, tokens] and their log-probabilities
    at `temperature`, then the log-probability of all the other tokens; memory-mapped. With `store`
    (a folder that belongs to this run), those it holds from the same windows are read back, and new
    ones are kept there. A progress bar shows on a terminal."""
    made_from = fingerprint(windows, k, temperature)
    if store is not None and (found := stored_targets(store, made_from)) is not None:
        return found
    head = chunked_head(model)
    if head is None:
        raise LoraPruneError("--distill-top-k reads the output embedding directly; this model's is sharded "
                             "or quantized: use --distill without --distill-top-k")  # fmt: skip
    n, tokens = windows.shape
    shapes = ((n, tokens, k), np.int32), ((n, tokens, k + 1), np.float16)
    keeping = staged_folder(store, True, f"writing the dense model's top-{k}") if store else nullcontext()
    with keeping as staging:  # renamed to `store` once complete
        arrays = [memory_mapped(shape, dtype, staging and staging / name)
                  for (shape, dtype), name in zip(shapes, FILES, strict=True)]  # fmt: skip
        ids, log_p = map(torch.from_numpy, arrays)
        _fill(model, head, windows, temperature, batch_size, ids, log_p)
        if staging is not None:
            for array in arrays:
                array.flush()
            (staging / MARKER).write_text(json.dumps(made_from))
    return ids, log_p


def _fill(model: nn.Module, head: nn.Module, windows: Tensor, temperature: float, batch_size: int,
          ids: Tensor, log_p: Tensor) -> None:  # fmt: skip
    """Write the dense `model`'s top-k (k = ids.shape[-1]) of every window into `ids` and `log_p`."""
    n, tokens = windows.shape
    k, vocab = ids.shape[-1], head.weight.shape[0]
    device, softcap, was_training = head.weight.device, logit_softcap(model), model.training
    rows = loss_chunk_tokens(vocab)
    model.eval()
    try:
        for start in tqdm(range(0, n, batch_size), desc=f"dense model's top-{k}", disable=None):
            batch = windows[start : start + batch_size].to(device)
            hidden = last_hidden_states(model, head, batch, use_cache=False)
            flat = hidden.reshape(-1, hidden.shape[-1])
            batch_ids, batch_log_p = [], []
            for first in range(0, len(flat), rows):
                logits = head_logits(flat[first : first + rows], head.weight, head.bias, softcap)[0]
                log_probs = torch.log_softmax(logits / temperature, dim=-1)
                top = torch.topk(log_probs, k, dim=-1)
                rest = log_probs.scatter_(1, top.indices, float("-inf")).logsumexp(-1, keepdim=True)
                batch_ids.append(top.indices)
                batch_log_p.append(torch.cat([top.values, rest.clamp(min=math.log(TINY))], dim=-1))
            ids[start : start + len(batch)] = torch.cat(batch_ids).view(len(batch), tokens, k).to(torch.int32).cpu()
            log_p[start : start + len(batch)] = torch.cat(batch_log_p).view(len(batch), tokens, k + 1).half().cpu()
    finally:
        model.train(was_training)
