"""Coupled groups of one decoder layer (docs/method.md#groups), from the model config.

Under grouped-query attention (fewer k/v heads than query heads) our prunable head is one
*query head*: its q rows and the o columns that read it. A k/v head goes with the last query
head that reads it, so its k/v rows' score is shared equally among the live query heads that
read it. For plain multi-head attention this is exactly the paper's head (q, k, v rows + o
columns). Layers whose query heads end up unevenly shared stay valid models through
`modeling_pruned`. With --uniform the heads are pruned evenly inside each k/v group instead,
so stock transformers (which assumes equal groups) loads the result.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..archs import Arch
from ..errors import LoraPruneError
from ..prune_config import round_half_up


@dataclass(frozen=True)
class LayerGroups:
    """Sizes of a layer's groups: query heads (sharing kv_heads k/v heads) and MLP channels."""

    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @classmethod
    def from_config(cls, config, arch: Arch) -> "LayerGroups":
        heads = getattr(config, arch.heads_key)
        kv_heads = getattr(config, arch.kv_heads_key, None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, kv_heads, head_dim, getattr(config, arch.intermediate_key))

    @classmethod
    def held(cls, kv_of_head: Tensor, head_dim: int, channels: int) -> "LayerGroups":
        """The sizes of a layer as it is now (shrunk or not): its query heads, given the k/v head
        each reads (`kv_of_head`, positions in the layer now), and its channels."""
        return cls(len(kv_of_head), int(kv_of_head.max()) + 1, head_dim, channels)

    def row_parts(self, roles) -> dict[str, tuple[str, int, int]]:
        """Where each row-pruned role's rows live, given a layer's projection roles (Arch.projections'
        keys): role -> (projection, first row, rows). A role is a whole projection of its own, or a
        row range of a fused one (Phi-3's qkv: [q | k | v], gate_up: [gate | up])."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if "qkv" in roles:
            parts = {"q": ("qkv", 0, q), "k": ("qkv", q, kv), "v": ("qkv", q + kv, kv)}
        else:
            parts = {"q": ("q", 0, q), "k": ("k", 0, kv), "v": ("v", 0, kv)}
        if "gate_up" in roles:
            parts.update(gate=("gate_up", 0, self.channels), up=("gate_up", self.channels, self.channels))
        else:
            parts.update({role: (role, 0, self.channels) for role in ("gate", "up") if role in roles})
        return parts

    @property
    def heads_per_kv(self) -> int:
        return self.heads // self.kv_heads

    @property
    def kv_of_head(self) -> Tensor:
        """Index of the k/v head each query head reads (stock layout: contiguous groups)."""
        return torch.arange(self.heads) // self.heads_per_kv

    def head_pools(self, uniform: bool) -> list[Tensor]:
        """Sets of heads each pruned to the same fraction: the whole layer, or (uniform GQA)
        each k/v group, so that every group keeps the same number of query heads."""
        if uniform and self.heads_per_kv > 1:
            return list(torch.arange(self.heads).split(self.heads_per_kv))
        return [torch.arange(self.heads)]

    def head_targets(self, sparsity: float, uniform: bool) -> list[int]:
        """How many heads each pool has lost at this sparsity."""
        return [round_half_up(sparsity * len(pool)) for pool in self.head_pools(uniform)]

    def channel_target(self, sparsity: float) -> int:
        return round_half_up(sparsity * self.channels)

    def aligned_removals(self, ratio: float, multiple_of: int) -> tuple[int, int]:
        """(fewer, more): the MLP channels a pruned layer loses at `ratio` when it must keep a multiple
        of `multiple_of` channels: the kept count rounded up, and rounded down (never to 0)."""
        if multiple_of > self.channels:
            raise LoraPruneError(
                f"--multiple-of {multiple_of} exceeds the {self.channels} MLP channels of a layer: it would "
                "empty every pruned layer; use a smaller alignment"
            )
        kept = self.channels - self.channel_target(ratio)
        up = min(-(-kept // multiple_of) * multiple_of, self.channels)
        down = max(kept // multiple_of * multiple_of, multiple_of)
        return self.channels - up, self.channels - down

    def kept_at(self, ratio: float, uniform: bool, multiple_of: int | None = None) -> tuple[int, int | None, int]:
        """(heads, k/v heads, channels) a pruned layer keeps; k/v heads are None when they
        depend on which heads the scores pick. Raises if a layer would lose every head or channel."""
        pools, targets = self.head_pools(uniform), self.head_targets(ratio, uniform)
        if any(target == len(pool) for target, pool in zip(targets, pools, strict=True)):
            where = "k/v group" if len(pools) > 1 else "layer"
            raise LoraPruneError(
                f"--ratio {ratio} would remove every head of a {where} "
                f"({self.heads} heads sharing {self.kv_heads} k/v heads); use a smaller ratio"
            )
        if self.channel_target(ratio) == self.channels:
            raise LoraPruneError(f"--ratio {ratio} would remove every MLP channel of a layer; use a smaller ratio")
        kv_heads = self.kv_heads if len(pools) > 1 else None
        channels = self.channels - self.channel_target(ratio)
        if multiple_of:  # every layer alike (the per-layer choice needs scores): the nearest multiple
            fewer, more = self.aligned_removals(ratio, multiple_of)
            target = self.channel_target(ratio)
            channels = self.channels - (fewer if target - fewer <= more - target else more)
        return self.heads - sum(targets), kv_heads, channels


def summed_dim(role: str) -> int:
    """The dimension a projection's element scores are summed over into its groups: 0 (one score per
    input column) for o and down, which read heads and channels; 1 (per output row) for the rest."""
    return 0 if role in ("o", "down") else 1


def per_unit(scores: Tensor, units: int) -> Tensor:
    """Sum consecutive rows/columns into units: (units * size,) -> (units,)."""
    return scores.view(units, -1).sum(dim=1)


def head_scores(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, groups: LayerGroups, alive: Tensor, kv_of_head: Tensor | None = None
) -> Tensor:
    """One score per query head from per-head q, o and per-kv-head k, v scores; 0 for a dead head.
    `kv_of_head`: the k/v head each query head reads in a shrunk layer (the dense layout when None)."""
    kv = groups.kv_of_head if kv_of_head is None else kv_of_head
    kv, alive = kv.to(q.device), alive.to(q.device)
    readers = torch.bincount(kv[alive], minlength=len(k)).clamp(min=1)
    return torch.where(alive, q + o + (k + v)[kv] / readers[kv], 0.0)
