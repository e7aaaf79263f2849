"""The dense model's top-k next-token distribution for every training window, computed once before
LoRA is attached (`--distill-top-k K`): distillation then needs no teacher forward per step and no
dense copy of the weights, so the model may shrink physically while it trains.

Each position keeps the ids (int32) of its K most likely tokens and K + 1 log-probabilities (float16,
at the distillation's temperature): those of the K, and that of every other token together, so the
loss keeps the probability the K leave (lm_loss._sparse_kl_and_its_gradient). 6·K + 2 bytes per
position, memory-mapped (10 MB per thousand 128-token windows at K = 64). They are kept in a folder
(`store`): by default the run's checkpoint folder (removed with it), so that neither `--resume` nor a
run stopped while they are computed runs the dense model over the same windows again; with
`--teacher-cache DIR`, DIR, kept after the run for later runs of the same model, text, seed and steps
(another --ratio, say). One folder per computation, named by what it is computed from:

    STORE/<name>/              ids.npy, log_p.npy and COMPLETE (what they were computed from)
    STORE/.<name>.partial/     the same while they are computed, with MADE_FROM and DONE (the windows
                               written so far); renamed to <name>/ once complete
Without a store they live in temporary files deleted when the run ends. What they are computed from
(the weights, the windows, K and the temperature: `fingerprint`) decides whether stored ones are read
back, so they are never another model's or another text's.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import LoraPruneError, write_error
from ..runtime.checkpoint import Interrupted, partial_folder
from .lm_loss import TINY, chunked_head, head_logits, last_hidden_states, logit_softcap, loss_chunk_tokens

MARKER, MADE_FROM, DONE, FILES = "COMPLETE", "MADE_FROM", "DONE", ("ids.npy", "log_p.npy")


def memory_mapped(shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    """A zeroed array backed by an anonymous temporary file (gone once the array is freed)."""
    try:
        return np.memmap(tempfile.TemporaryFile(), dtype=dtype, mode="w+", shape=shape)
    except OSError as error:
        where = tempfile.gettempdir()
        raise write_error(error, f"writing the dense model's top-k to {where}", "training did not start") from error


def fingerprint(model: nn.Module, windows: Tensor, k: int, temperature: float) -> dict:
    """What targets are computed from: `model`'s weights, the windows, k and the temperature. Stored
    targets with the same fingerprint are those this computation would give, whichever run made them."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest = hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"weights_sha256": weights.hexdigest(), "windows_sha256": digest, "shape": list(windows.shape),
            "k": k, "temperature": temperature}  # fmt: skip


def computation_folder(store: Path, made_from: dict) -> Path:
    """The folder in `store` of the targets computed from `made_from` (a fingerprint)."""
    digest = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
    return store / f"top{made_from['k']}-{digest[:16]}"


def stored_targets(store: Path, made_from: dict) -> tuple[Tensor, Tensor] | None:
    """The targets in `store` if they are complete and were made from `made_from`, else None."""
    if _read(store / MARKER) != made_from:
        return None
    # copy-on-write: the tensors are writable, the files never change
    ids, log_p = (torch.from_numpy(np.load(store / name, mmap_mode="c")) for name in FILES)
    return ids, log_p


@torch.no_grad()
def top_k_targets(model: nn.Module, windows: Tensor, k: int, temperature: float = 1.0, batch_size: int = 8,
                  store: Path | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(ids int32 [windows, tokens, k], log-probabilities float16 [windows, tokens, k + 1]): the dense
    `model`'s top-k next tokens at every position of `windows` [n, tokens] and their log-probabilities
    at `temperature`, then the log-probability of all the other tokens; memory-mapped. With `store`
    (a folder among a run's checkpoints, or --teacher-cache), targets made from the same weights and
    windows are read back from it, or from where an earlier run stopped computing them, and new ones
    are kept there. With `progress`, a progress bar on stderr."""
    if store is not None:
        made_from = fingerprint(model, windows, k, temperature)
        store = computation_folder(store, made_from)
        if (found := stored_targets(store, made_from)) is not None:
            return found
    head = chunked_head(model)
    if head is None:
        raise LoraPruneError("--distill-top-k reads the output embedding directly; this model's is sharded "
                             "or quantized: use --distill without --distill-top-k")  # fmt: skip
    n, tokens = windows.shape
    shapes = ((n, tokens, k), np.int32), ((n, tokens, k + 1), np.float16)
    if store is None:
        ids, log_p = (torch.from_numpy(memory_mapped(shape, dtype)) for shape, dtype in shapes)
        _fill(model, head, windows, temperature, batch_size, ids, log_p, progress=progress)
        return ids, log_p
    _fill_kept(model, head, windows, temperature, batch_size, shapes, store, made_from, progress)
    return stored_targets(store, made_from)


def _fill_kept(model: nn.Module, head: nn.Module, windows: Tensor, temperature: float, batch_size: int,
               shapes: tuple, store: Path, made_from: dict, progress: bool) -> None:  # fmt: skip
    """Compute the targets into the folder beside `store` (checkpoint.partial_folder), going on from
    the windows it holds when they were made from `made_from`, and rename it to `store` once complete.
    Ctrl-C, or a kill, leaves it for the next run; a full disk removes it."""
    partial = partial_folder(store)
    try:
        if _read(partial / MADE_FROM) == made_from:
            done = _read(partial / DONE) or 0
            arrays = [np.lib.format.open_memmap(partial / name, mode="r+") for name in FILES]
        else:  # nothing to go on from: another computation's, or none
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            arrays = [np.lib.format.open_memmap(partial / name, mode="w+", dtype=dtype, shape=shape)
                      for (shape, dtype), name in zip(shapes, FILES, strict=True)]  # fmt: skip
            done = 0
            _write(partial / DONE, done)
            _write(partial / MADE_FROM, made_from)

        def written(windows_done: int) -> None:  # the arrays reach the disk before the count that says so
            for array in arrays:
                array.flush()
            _write(partial / DONE, windows_done)

        ids, log_p = map(torch.from_numpy, arrays)
        _fill(model, head, windows, temperature, batch_size, ids, log_p, start=done, written=written, progress=progress)
        _write(partial / MARKER, made_from)
        shutil.rmtree(store, ignore_errors=True)
        partial.rename(store)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):  # the store too, if this made it and it holds nothing else
            partial.parent.rmdir()
        raise write_error(error, f"writing the dense model's top-k to {partial}", "nothing was kept") from error
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped while computing the dense model's top-k: {_read(partial / DONE) or 0} of {len(windows)} "
            f"windows are kept in {partial}, and the same run started again goes on from there"
        ) from None


def _read(path: Path):
    """What `_write` wrote to `path`, or None if nothing was."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, value) -> None:
    """`value` as JSON to `path`, whole or not at all."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def _fill(model: nn.Module, head: nn.Module, windows: Tensor, temperature: float, batch_size: int,
          ids: Tensor, log_p: Tensor, start: int = 0, written=None, progress: bool = False) -> None:  # fmt: skip
    """Write the dense `model`'s top-k (k = ids.shape[-1]) of every window from `start` on into `ids`
    and `log_p`; `written(windows_done)` after each batch."""
    n, tokens = windows.shape
    k, vocab = ids.shape[-1], head.weight.shape[0]
    device, softcap, was_training = head.weight.device, logit_softcap(model), model.training
    rows = loss_chunk_tokens(vocab)
    model.eval()
    try:
        for first_window in tqdm(range(start, n, batch_size), desc=f"dense model's top-{k}", disable=not progress):
            batch = windows[first_window : first_window + batch_size].to(device)
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
            done = slice(first_window, first_window + len(batch))
            ids[done] = torch.cat(batch_ids).view(len(batch), tokens, k).to(torch.int32).cpu()
            log_p[done] = torch.cat(batch_log_p).view(len(batch), tokens, k + 1).half().cpu()
            if written is not None:
                written(done.stop)
    finally:
        model.train(was_training)
