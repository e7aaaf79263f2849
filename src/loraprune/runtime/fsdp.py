"""Sharded training with FSDP2 (`fully_shard`): base weights and LoRA factors split over the ranks.

On with `--fsdp` under torchrun, or through accelerate's FSDP config (`accelerate launch
--config_file examples/fsdp.yaml -m loraprune prune ...`, which sets ACCELERATE_USE_FSDP; its
fsdp_reshard_after_forward and fsdp_offload_params are honoured). Each decoder layer is one FSDP
unit and the root holds the embeddings and the head.

FSDP2 splits every parameter by rows (dim 0) into equal chunks, so a projection's W0 rows and
its B rows live on the same rank. A projection's scores are computed there, from those rows and
the small A (r x in, gathered whole), and summed over the ranks (`sum_over_shards`): every rank
ends with the same scores and masks, as under DDP, and no rank ever holds a whole W0.
After training, `gather` collects the whole state on rank 0's CPU and rebuilds a plain model
from it, which shrink and merge then treat like any other. Checkpoints hold whole tensors
(`whole`), so a sharded run resumes from them like any other (`rows_held`, `shard_like`).
"""

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..errors import LoraPruneError

ACCELERATE_ENV = "ACCELERATE_USE_FSDP"


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def requested(flag: bool) -> bool:
    """--fsdp, or accelerate launch with an FSDP config."""
    return flag or _env_flag(ACCELERATE_ENV)


def shard(model: nn.Module, layers: list[nn.Module]) -> None:
    """Shard `model` in place: every layer of `layers` one FSDP unit, then the rest as the root.
    Parameters become DTensors, so build the optimizer after this."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise LoraPruneError(
            "--fsdp needs a launcher: `torchrun --nproc_per_node N -m loraprune prune --fsdp ...` or "
            "`accelerate launch --config_file examples/fsdp.yaml -m loraprune prune ...`"
        )
    options = {
        "reshard_after_forward": _env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        "offload_policy": CPUOffloadPolicy() if _env_flag("FSDP_OFFLOAD_PARAMS") else OffloadPolicy(),
    }
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


def local(t: Tensor | None) -> Tensor | None:
    """This rank's rows of `t` (all of it when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: Tensor | None) -> Tensor | None:
    """All of `t`, gathered from the ranks when it is sharded (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def row_offset(t: Tensor) -> int:
    """The first row of this rank's shard: FSDP2 cuts dim 0 into chunks of ceil(rows / ranks)."""
    if not isinstance(t, DTensor):
        return 0
    mesh = t.device_mesh
    chunk = -(-t.shape[0] // mesh.size())
    return min(mesh.get_local_rank() * chunk, t.shape[0])


def rows_held(full: Tensor, like: Tensor) -> Tensor:
    """The rows of `full` (a whole tensor shaped like `like`) that this rank holds of `like`."""
    if not isinstance(like, DTensor):
        return full
    offset = row_offset(like)
    return full[offset : offset + like.to_local().shape[0]]


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` split as `like` is (a DTensor of this rank's rows), or `full` when `like` is whole."""
    if not isinstance(like, DTensor):
        return full
    local = rows_held(full, like).to(like.to_local().device).clone()
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def sum_over_shards(partial: Tensor, like: Tensor) -> Tensor:
    """Sum `partial` (a score vector from this rank's rows) over the ranks `like` is sharded on."""
    if isinstance(like, DTensor):
        dist.all_reduce(partial, group=like.device_mesh.get_group())
    return partial


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def gather(sharded: nn.Module, rebuild) -> nn.Module | None:
    """The whole of `sharded` as a plain model on rank 0's CPU (None on the other ranks); a collective.

    `rebuild()` makes the same module tree (under the meta device: no memory); it receives the
    gathered parameters, and the buffers (never sharded) are copied from `sharded`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = rebuild()
    plain.load_state_dict(state, assign=True, strict=False)
    for name, buffer in sharded.named_buffers():
        owner, _, attribute = name.rpartition(".")
        setattr(plain.get_submodule(owner), attribute, buffer.detach().cpu())
    left = [name for name, p in plain.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"FSDP gather left parameters unset: {left[:3]}")
    return plain
