"""Moving-average group scores, masks, and the pruning step (METHOD.md §4-5).

Masks zero the *inputs* of the column-pruned projections (o reads heads, down reads channels).
That is exactly what removing the group does: a pruned head's attention output, or a pruned
channel's activation, no longer reaches the residual stream, whatever q, k, v, gate and up
compute. (Masking q would not do: a zero query still attends uniformly and outputs the mean
of the values.)
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..archs import Arch
from ..config import PruneConfig
from .groups import LayerGroups, head_scores, per_unit
from .importance import Criterion
from .scoring import make_criterion, projection_scores


@torch.no_grad()
def group_scores(
    projections: dict[str, nn.Module],
    groups: LayerGroups,
    criterion: Criterion,
    head_alive: Tensor,
    normalize: bool,
    square: bool = False,
) -> tuple[Tensor, Tensor]:
    """One layer's (head, channel) scores: each projection's element scores (or their squares)
    summed per group (rows of q, k, v, gate, up; columns of o, down), L2-normalised per module if
    `normalize`."""

    parts, row_scores = groups.row_parts(projections), {}

    def score(role: str, dim: int, units: int) -> Tensor:
        if dim == 0:  # columns of o or down
            s = projection_scores(projections[role], criterion, 0, square=square)
        else:  # rows of q, k, v, gate, up: a projection of their own or a row range of a fused one
            name, start, rows = parts[role]
            if name not in row_scores:
                row_scores[name] = projection_scores(projections[name], criterion, 1, square=square)
            s = row_scores[name][start : start + rows]
        s = per_unit(s, units)
        return F.normalize(s, dim=0) if normalize else s

    q, o = score("q", 1, groups.heads), score("o", 0, groups.heads)
    k, v = score("k", 1, groups.kv_heads), score("v", 1, groups.kv_heads)
    heads = head_scores(q, k, v, o, groups, head_alive)
    channels = sum(score(role, 1, groups.channels) for role in ("gate", "up") if role in parts)
    return heads, channels + score("down", 0, groups.channels)


class Pruner:
    """Holds, for every layer, which heads and channels are alive and their score averages."""

    def __init__(self, model: nn.Module, arch: Arch, config: PruneConfig):
        self.arch, self.config = arch, config
        self.layers = arch.layers_of(model)
        self.groups = LayerGroups.from_config(model.config, arch)
        self.criterion = make_criterion(config.criterion, config.seed, config.lora_r)
        skipped = config.skipped_layers(len(self.layers))
        self.prunable = [i for i in range(len(self.layers)) if i not in skipped]
        self.head_pools = self.groups.head_pools(config.uniform)

        n, g = len(self.layers), self.groups
        self.head_alive = torch.ones(n, g.heads, dtype=torch.bool)
        self.channel_alive = torch.ones(n, g.channels, dtype=torch.bool)
        self.head_score = torch.zeros(n, g.heads)  # moving averages, float32
        self.channel_score = torch.zeros(n, g.channels)
        self.score_updates = 0
        self.skipped_updates = 0  # updates dropped because a score was NaN/inf
        self.masks_off = False  # inside masks_lifted(): the hooks pass their inputs through

        device = next(model.parameters()).device
        self.head_masks = torch.ones(n, g.heads * g.head_dim, device=device)
        self.channel_masks = torch.ones(n, g.channels, device=device)
        self.hooks = []
        for i in self.prunable:
            o, down = self.projections(i)["o"], self.projections(i)["down"]
            self.hooks.append(o.register_forward_pre_hook(self._mask_input(self.head_masks[i])))
            self.hooks.append(down.register_forward_pre_hook(self._mask_input(self.channel_masks[i])))

        # the 'gradient' criterion reads the true dL/dW0: the base weights it scores get a .grad
        # (never an optimizer step: train() only optimizes LoRA factors), freed after each update
        for weight in self.scored_weights:
            weight.requires_grad_(True)
        self.criterion.attach([m for i in self.prunable for m in self.projections(i).values()])

    def _mask_input(self, mask: Tensor):
        def hook(module, args):
            if self.masks_off:
                return None
            return (args[0] * mask.to(args[0].dtype), *args[1:])

        return hook

    @contextlib.contextmanager
    def masks_lifted(self):
        """Inside, the model computes as if nothing were pruned (the dense teacher: train.DenseTeacher)."""
        self.masks_off = True
        try:
            yield
        finally:
            self.masks_off = False

    @property
    def scored_weights(self) -> list[nn.Parameter]:
        """The base weights whose true gradient the criterion reads (none for most criteria); looked
        up each time because FSDP replaces the parameter objects when it shards them."""
        if not self.criterion.needs_weight_grad:
            return []
        return [m.base_layer.weight for i in self.prunable for m in self.projections(i).values()]

    def projections(self, i: int) -> dict[str, nn.Module]:
        return self.arch.projections(self.layers[i])

    def layer_scores(self, i: int) -> tuple[Tensor, Tensor]:
        """This step's (head, channel) scores of layer i, by the configured criterion."""
        square = self.config.aggregation == "square"
        return group_scores(
            self.projections(i), self.groups, self.criterion, self.head_alive[i], self.config.normalize, square
        )

    def update_scores(self) -> bool:
        """Fold this step's scores into the moving averages; skip (and count) a non-finite step."""
        self.criterion.synchronize()  # several processes: average what the criterion collected
        try:
            new = [self.layer_scores(i) for i in self.prunable]
        finally:
            self.clear_step_gradients()  # so that the next step's do not add onto this one's
        if not all(torch.isfinite(h).all() and torch.isfinite(c).all() for h, c in new):
            self.skipped_updates += 1
            return False
        lam = self.config.ema
        for i, (heads, channels) in zip(self.prunable, new, strict=True):
            self.head_score[i] = lam * self.head_score[i] + (1 - lam) * heads.cpu()
            self.channel_score[i] = lam * self.channel_score[i] + (1 - lam) * channels.cpu()
        self.score_updates += 1
        return True

    def prune_to(self, sparsity: float) -> None:
        """Raise the prunable layers to `sparsity`, removing the lowest-scored live groups: in every
        layer (allocation 'layer'), or as many in all, anywhere above each layer's floor ('global')."""
        if self.config.allocation == "global":
            heads = self.groups.head_targets(sparsity, uniform=False)[0]  # global excludes --uniform
            self._remove_globally(self.head_alive, self.head_score, heads)
            self._remove_globally(self.channel_alive, self.channel_score, self.groups.channel_target(sparsity))
        for i in self.prunable:
            if self.config.allocation == "layer":
                targets = self.groups.head_targets(sparsity, self.config.uniform)
                for pool, target in zip(self.head_pools, targets, strict=True):
                    _remove_lowest(self.head_alive[i], self.head_score[i], pool, target)
                _remove_lowest(self.channel_alive[i], self.channel_score[i], None, self.groups.channel_target(sparsity))
            self.head_masks[i].copy_(self.head_alive[i].repeat_interleave(self.groups.head_dim))
            self.channel_masks[i].copy_(self.channel_alive[i])

    def _remove_globally(self, alive: Tensor, score: Tensor, per_layer: int) -> None:
        """Mark dead the lowest-scored live groups of all prunable layers until `per_layer` times
        their number are dead, never leaving a layer fewer than --min-keep of its groups."""
        rows = torch.tensor(self.prunable)
        floor = max(1, math.ceil(self.config.min_keep * alive.shape[1]))
        missing = per_layer * len(rows) - int((~alive[rows]).sum())
        live = alive[rows].nonzero()  # (layer position, group) pairs
        order = torch.argsort(score[rows][alive[rows]], stable=True)
        left = alive[rows].sum(1)
        for position, group in live[order].tolist():
            if missing <= 0:
                break
            if left[position] > floor:
                alive[rows[position], group] = False
                left[position] -= 1
                missing -= 1

    def sparsity(self) -> tuple[float, float]:
        """Fraction of heads and of channels removed, over the prunable layers."""
        rows = self.prunable
        return (1 - self.head_alive[rows].float().mean().item(), 1 - self.channel_alive[rows].float().mean().item())

    def state_dict(self) -> dict[str, Tensor | int]:
        """Masks, score averages, counters and the criterion's state: what a checkpoint needs."""
        state = {name: getattr(self, name) for name in ("head_alive", "channel_alive", "head_score", "channel_score")}
        state.update(score_updates=self.score_updates, skipped_updates=self.skipped_updates)
        return state | self.criterion.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values and the masks they imply."""
        for name in ("head_alive", "channel_alive", "head_score", "channel_score"):
            getattr(self, name).copy_(state[name])
        self.score_updates, self.skipped_updates = int(state["score_updates"]), int(state["skipped_updates"])
        self.criterion.load_state_dict(state)
        for i in self.prunable:
            self.head_masks[i].copy_(self.head_alive[i].repeat_interleave(self.groups.head_dim))
            self.channel_masks[i].copy_(self.channel_alive[i])

    def clear_step_gradients(self) -> None:
        """Drop what this step's backward left for scoring: dL/dW0, the criterion's own statistics."""
        for weight in self.scored_weights:
            weight.grad = None
        self.criterion.next_step()

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def close(self) -> None:
        """Remove the masks' (and the criterion's) hooks and freeze the base weights again (after training)."""
        self.remove_hooks()
        self.clear_step_gradients()
        self.criterion.detach()
        for weight in self.scored_weights:
            weight.requires_grad_(False)


def _remove_lowest(alive: Tensor, score: Tensor, pool: Tensor | None, target: int) -> None:
    """Mark dead the lowest-scored live members of `pool` until `target` of them are dead."""
    pool = torch.arange(len(alive)) if pool is None else pool
    live = pool[alive[pool]]
    missing = target - (len(pool) - len(live))
    if missing > 0:
        order = torch.argsort(score[live], stable=True)
        alive[live[order[:missing]]] = False
