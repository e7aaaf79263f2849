"""Several processes (`torchrun`, `accelerate launch`): data-parallel LoRA fine-tuning with DDP.

Both launchers set RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); with WORLD_SIZE > 1
`init()` joins the process group (nccl with CUDA, gloo without). Every rank holds the whole model;
`wrap()` puts the peft model in DistributedDataParallel, so the LoRA gradients are all-reduced
(averaged) in backward, before `Pruner.update_scores()` reads them: every rank computes the same
scores from the same gradients and removes the same groups. `check_identical()` asserts it at each
pruning step with one all-reduce of a float64 checksum of masks, scores and layer shapes (MAX and MIN).
After a progressive shrink (`--shrink progressive`) the model's parameters are new objects, so
train() wraps it in a new DDP.

Each rank trains on its own slice of every global batch (data.BatchSampler's rank/world_size):
`--batch-size` is per process, the global batch is batch_size x world_size. Rank 0 alone
evaluates, prints, writes checkpoints and the output; the others wait for it at a barrier.
Without the environment variables (or WORLD_SIZE=1) every function here is a no-op.
"""

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import LoraPruneError
from . import fsdp

# rank 0 evaluates the dense model before training and saves + reloads after it while the others
# wait in a collective: the process group's timeout must outlast that (override in seconds)
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "LORAPRUNE_DIST_TIMEOUT", 3600


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one of several (torchrun, accelerate launch), before init."""
    return _env_world_size() > 1


def init(always: bool = False) -> bool:
    """Join the process group the launcher describes (once; with `always` also a group of one, which
    FSDP needs); True when running in several processes."""
    if not dist.is_available() or (_env_world_size() <= 1 and not (always and "RANK" in os.environ)):
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise LoraPruneError(
                f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: start several processes with "
                "`torchrun --nproc_per_node N -m loraprune prune ...` or `accelerate launch -m loraprune prune ...`"
            )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_world_size() > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    """Where this rank's model belongs: its own GPU under nccl; None (leave it) otherwise."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _comm_device() -> torch.device:
    return device() or torch.device("cpu")


def wrap(model: nn.Module) -> nn.Module:
    """`model` in DistributedDataParallel when several processes run (else `model` itself).

    Only parameters that require grad (the LoRA factors; the base weights the 'gradient'
    criterion scores) are all-reduced. Frozen weights and buffers are neither broadcast nor
    synchronised: every rank loaded the same ones."""
    if not active() or any(fsdp.is_sharded(p) for p in model.parameters()):  # FSDP syncs its own gradients
        return model
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [device().index] if device() is not None else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)


def mean(value: float) -> float:
    """The mean of `value` over the ranks (NaN on one rank makes it NaN on all)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.item() / world_size()


def average(t: Tensor) -> Tensor:
    """The mean of `t` over the ranks (`t` itself in one process)."""
    if not active():
        return t
    t = t.contiguous()
    dist.all_reduce(t)
    return t.div_(world_size())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not active():
        return flag
    t = torch.tensor([float(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# masks, scores, and the layers' shapes as the modules have them (--shrink progressive: every rank
# must cut the same rows out, or DDP would all-reduce gradients of different shapes)
CHECKED = ("head_alive", "channel_alive", "head_score", "channel_score", "shapes")


def checksum(state: dict[str, Tensor]) -> Tensor:
    """float64 [2 per tensor]: the plain sum and a position-weighted sum of each of masks and scores,
    so that a flipped mask or a changed score (also a swap of two entries) changes it."""
    values = []
    for name in CHECKED:
        x = state[name].detach().double().flatten().cpu()
        weights = torch.sin(torch.arange(1, len(x) + 1, dtype=torch.float64))  # irregular: swaps show
        values += [x.sum(), (x * weights).sum()]
    return torch.stack(values)


def differences(low: Tensor, high: Tensor) -> list[str]:
    """What differs between the lowest and the highest checksum over the ranks ([] when none)."""
    found = []
    for i, name in enumerate(CHECKED):
        (lo, lo_weighted), (hi, hi_weighted) = low[2 * i : 2 * i + 2].tolist(), high[2 * i : 2 * i + 2].tolist()
        if (lo, lo_weighted) != (hi, hi_weighted):
            found.append(f"{name} (checksums {lo:.17g}..{hi:.17g}, weighted {lo_weighted:.17g}..{hi_weighted:.17g})")
    return found


def check_identical(state: dict[str, Tensor], step: int) -> None:
    """Raise LoraPruneError on every rank if the ranks' masks or scores differ (they must not: the
    scores come from the same all-reduced gradients). Two all-reduces of 10 float64 numbers."""
    if not active():
        return
    local = checksum(state).to(_comm_device())
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differ = differences(low.cpu(), high.cpu())
    if differ:
        raise LoraPruneError(
            f"ranks diverged at step {step}: {'; '.join(differ)} differ between the {world_size()} processes "
            "(all ranks must compute the same scores from the all-reduced LoRA gradients)"
        )


def rng_states() -> dict[str, Tensor]:
    """On rank 0: the RNG states of the other ranks (their LoRA dropout), as checkpoint tensors
    rng/rank{r}/cpu (and /cuda); {} elsewhere. A collective: every rank must call it."""
    if not active():
        return {}
    mine = {"cpu": torch.get_rng_state()}
    if device() is not None:
        mine["cuda"] = torch.cuda.get_rng_state()
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    if not is_main():
        return {}
    return {f"rng/rank{r}/{kind}": state for r, states in enumerate(gathered) if r for kind, state in states.items()}


def restore_rng(tensors: dict[str, Tensor]) -> None:
    """On a rank other than 0: its own RNG states, saved by `rng_states()` (rank 0's are the usual ones)."""
    if rank() == 0:
        return
    prefix = f"rng/rank{rank()}/"
    if prefix + "cpu" in tensors:
        torch.set_rng_state(tensors[prefix + "cpu"])
    if prefix + "cuda" in tensors and device() is not None:
        torch.cuda.set_rng_state(tensors[prefix + "cuda"])


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """Wait until every rank (rank 0: the output written) is done, then leave the process group."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
