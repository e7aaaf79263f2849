"""The memory pre-flight of `prune`: the run's estimated peak (estimate.py) against what the device
has free, before any weight is read; a run that does not fit is refused with the flags that would
make it fit. On a run that would fit only with freed memory handed back to the system, glibc is
asked to do so (one process-wide setting, announced)."""

import os
import sys

import torch

from ..errors import LoraPruneError
from .estimate import Estimate, GiB, available_bytes, run_estimate

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 18
# Resident peak over the estimate (which counts live bytes) when glibc keeps freed blocks in its heap:
# the largest measured, the demo's 3.2 GiB against 2.5 GiB with freed memory returned (SmolLM2-360M
# at 1 x 512: 1.25). Returning it costs time (every large block is mapped and zeroed afresh: the
# demo's steps took 1.45x as long), so `prune` asks for it only when the estimate times this factor
# exceeds the free memory: a run that would otherwise not fit.
HEAP_OVERSHOOT = 1.28


def return_freed_memory() -> bool:
    """Make glibc give freed blocks of 256 KiB and more straight back to the system (mmap'ed), as it
    does by default only until the first large free raises its threshold up to 32 MiB. Without this,
    activation-sized blocks freed in backward stay in the heap, fragmented, and a training process's
    resident peak is 10-25% above what it holds live (measured: bench/scale.py); the estimate counts
    what is live. One-way and process-wide (glibc has no call to undo it): `prune` calls it only
    on a run that would not fit otherwise, and says so. False where the C library is not glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def _levers(model_config, config, dtype: str, device: str, processes: int) -> str:
    """The flags that would lower this run's estimate, each with the peak it would give."""
    from dataclasses import replace

    options = []
    if config.criterion == "gradient":  # the same score without dL/dW0
        options.append(("--criterion streamed", config, {"criterion": "streamed"}))
    if config.criterion in ("gradient", "streamed"):  # LoRA's estimate of it keeps no inputs
        options.append(("--criterion lora", config, {"criterion": "lora"}))
    if not config.gradient_checkpointing:
        options.append(("--gradient-checkpointing", config, {"gradient_checkpointing": True}))
    if dtype == "float32":
        options.append(("--dtype bfloat16", config, {"dtype": "bfloat16"}))
    if config.batch_size > 1:
        options.append((f"--batch-size {config.batch_size // 2}", config, {"batch_size": config.batch_size // 2}))
    found = []
    for flag, base, change in options:
        changed = replace(base, **{k: v for k, v in change.items() if k != "dtype"})
        peak = run_estimate(model_config, changed, change.get("dtype", dtype), device).peak * processes
        found.append(f"{flag} ({peak / GiB:.1f} GiB)")
    return ", ".join(found) or "a smaller --seq-len, fewer processes on this machine"


def preflight(model_config, config, dtype: str, device: str = "cpu", processes: int = 1, sharded: bool = False,
              quantize_bits: int | None = None, available: int | None = None) -> tuple[Estimate, int, int]:  # fmt: skip
    """Refuse (LoraPruneError, one line) a run whose expected peak exceeds the free memory; returns
    (estimate of one process, bytes needed, bytes available) otherwise. On CPU the processes share
    the machine's RAM; on GPUs each process has its own device."""
    est = run_estimate(model_config, config, dtype, device, processes if sharded else 1, quantize_bits)
    available = available_bytes(device) if available is None else available
    shared = processes if device == "cpu" else 1
    needed = est.peak * shared
    if needed > available:
        where = "of RAM available" if device == "cpu" else f"free on {device} per process"
        per = f" for {processes} processes" if shared > 1 else ""
        raise LoraPruneError(
            f"this run does not fit in memory: estimated peak {needed / GiB:.1f} GiB{per} ({config.criterion}, "
            f"{dtype}, batch {config.batch_size} x {config.seq_len}, gradient checkpointing "
            f"{'on' if config.gradient_checkpointing else 'off'}) > {available / GiB:.1f} GiB {where}; levers: "
            f"{_levers(model_config, config, dtype, device, shared)}; --no-memory-check runs it anyway"
        )
    return est, needed, available


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def check_memory(model_config, config, run, sharded: bool = False) -> None:
    """The pre-flight of `prune` (job.py), before weights or data are read: the estimate against
    the free memory; then, for a folder without weights, a verdict instead of a failed load."""
    from ..pipeline.load import _resolve

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = run.quantize_bits is not None or (processes > 1 and torch.cuda.is_available())
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if on_gpu else "cpu"
    _, needed, available = preflight(model_config, config, run.dtype, device, processes, sharded, run.quantize_bits)
    if device == "cpu" and needed * HEAP_OVERSHOOT > available and run.return_freed_memory and return_freed_memory():
        print(
            f"loraprune: the estimated peak ({needed / GiB:.1f} GiB) is near the {available / GiB:.1f} GiB available: "
            "glibc now returns freed memory to the system for this process (lower peak, slower steps; "
            "--no-return-freed-memory keeps it off)",
            file=sys.stderr,
        )
    kind, path = _resolve(run.model)
    if kind == "folder" and not any(name.endswith(WEIGHT_FILES) for name in os.listdir(path)):
        raise LoraPruneError(
            f"{path} holds a config but no weights (no {', '.join('*' + w for w in WEIGHT_FILES[:2])}): this run "
            f"would fit in memory (estimated peak {needed / GiB:.1f} GiB, {available / GiB:.1f} GiB available); "
            "put the model's weights and tokenizer in the folder to run it"
        )
