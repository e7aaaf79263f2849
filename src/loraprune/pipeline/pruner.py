"""Moving-average group scores, masks, and the pruning step (docs/method.md#moving-average, #masks-and-shrinking).

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
from ..prune_config import PruneConfig, round_half_up
from .depth import LayerRemoval
from .groups import LayerGroups, head_scores, per_unit, summed_dim
from .hidden import HiddenRemoval
from .importance import Criterion, Scratch
from .scoring import make_criterion, projection_scores
from .shrink import move_optimizer_state, shrink_layer


@torch.no_grad()
def group_scores(
    projections: dict[str, nn.Module],
    groups: LayerGroups,
    criterion: Criterion,
    head_alive: Tensor,
    normalize: bool,
    square: bool = False,
    channel_alive: Tensor | None = None,
    kv_of_head: Tensor | None = None,
    scratch: Scratch | None = None,
) -> tuple[Tensor, Tensor]:
    """One layer's (head, channel) scores: each projection's element scores (or their squares)
    summed per group (rows of q, k, v, gate, up; columns of o, down), L2-normalised per module over
    its live groups if `normalize`; a dead group scores 0. `head_alive`, `channel_alive` (all alive
    when None) and `kv_of_head` (the dense layout when None) describe the groups the layer holds now,
    so that a masked layer and the same layer physically shrunk (--shrink progressive) score alike.
    `scratch`: buffers for the scoring transients, shared by the projections (scoring.py)."""
    scratch = Scratch() if scratch is None else scratch
    kv_of_head = groups.kv_of_head if kv_of_head is None else kv_of_head
    if channel_alive is None:
        channel_alive = torch.ones(groups.channels, dtype=torch.bool)
    # the layer as it is now: a fused projection's parts (Phi-3's qkv, gate_up) start where these sizes say
    now = LayerGroups.held(kv_of_head, groups.head_dim, len(channel_alive))
    kv_alive = torch.zeros(now.kv_heads, dtype=torch.bool)
    kv_alive[kv_of_head[head_alive]] = True  # a k/v head lives while a live query head reads it
    parts, row_scores = now.row_parts(projections), {}

    def score(role: str, alive: Tensor) -> Tensor:
        if summed_dim(role) == 0:  # columns of o or down
            s = projection_scores(projections[role], criterion, 0, square=square, scratch=scratch)
        else:  # rows of q, k, v, gate, up: a projection of their own or a row range of a fused one
            name, start, rows = parts[role]
            if name not in row_scores:
                row_scores[name] = projection_scores(projections[name], criterion, 1, square=square, scratch=scratch)
            s = row_scores[name][start : start + rows]
        s = per_unit(s, len(alive))
        s = torch.where(alive.to(s.device), s, 0.0)  # dead groups neither score nor weigh in the norm
        return F.normalize(s, dim=0) if normalize else s

    q, o = score("q", head_alive), score("o", head_alive)
    k, v = score("k", kv_alive), score("v", kv_alive)
    heads = head_scores(q, k, v, o, groups, head_alive, kv_of_head)
    channels = sum(score(role, channel_alive) for role in ("gate", "up") if role in parts)
    return heads, channels + score("down", channel_alive)


class Pruner:
    """Holds, for every layer, which heads and channels are alive and their score averages, and
    (--shrink progressive) which of them the layer still physically holds.

    Everything the Pruner holds is in the dense layout (the original indices), whatever the
    model's shapes: masks, score averages, checkpoints and reports do not change their meaning
    when layers shrink. `head_present` / `channel_present` map a shrunk layer's heads and channels
    back to their dense indices (the i-th True is the layer's i-th head now)."""

    def __init__(self, model: nn.Module, arch: Arch, config: PruneConfig):
        self.arch, self.config = arch, config
        self.layers = arch.layers_of(model)
        self.groups = LayerGroups.from_config(model.config, arch)
        square = config.aggregation == "square"
        self.criterion = make_criterion(config.decided_criterion(), config.seed, config.lora_r, square)
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
        # --layer-ratio: whole prunable layers scored and bypassed (depth.py); their groups stay as they are
        self.depth = LayerRemoval(self.layers, self.prunable, config.layer_ratio, config.layer_score, config.ema,
                                  config.shrink == "progressive")  # fmt: skip
        # --hidden-ratio: channels of the residual stream, masked where they are written (hidden.py)
        self.hidden = HiddenRemoval(model, arch, self.layers, config.hidden_ratio, config.ema)
        # --shrink progressive: dead groups are cut out at each pruning step (shrink_dead), so the
        # model holds live groups only and needs no masks
        self.progressive = config.shrink == "progressive"
        self.head_present = torch.ones(n, g.heads, dtype=torch.bool)
        self.channel_present = torch.ones(n, g.channels, dtype=torch.bool)

        device = next(model.parameters()).device
        self.head_masks = torch.ones(n, g.heads * g.head_dim, device=device)
        self.channel_masks = torch.ones(n, g.channels, device=device)
        self.hooks = []
        for i in [] if self.progressive else self.prunable:
            o, down = self.projections(i)["o"], self.projections(i)["down"]
            self.hooks.append(o.register_forward_pre_hook(self._mask_input(self.head_masks[i])))
            self.hooks.append(down.register_forward_pre_hook(self._mask_input(self.channel_masks[i])))

        # the 'gradient' criterion reads the true dL/dW0: the base weights it scores get a .grad
        # (never an optimizer step: train() only optimizes LoRA factors), freed after each update
        for weight in self.scored_weights:
            weight.requires_grad_(True)
        self.scoring = True  # until stop_scoring: the criterion's hooks and gradients are live
        self.criterion.attach({m: summed_dim(role) for i in self.prunable for role, m in self.projections(i).items()})

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
            with self.depth.lifted_for_teacher(), self.hidden.lifted_for_teacher():
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

    def kv_of_head(self, i: int) -> Tensor:
        """The k/v head (its position in layer i now) that each query head layer i holds reads."""
        return torch.unique(self.groups.kv_of_head[self.head_present[i]], return_inverse=True)[1]

    def layer_scores(self, i: int, scratch: Scratch | None = None) -> tuple[Tensor, Tensor]:
        """This step's (head, channel) scores of layer i, by the configured criterion, in the dense
        layout (0 for dead groups, also for those the layer no longer holds)."""
        square = self.config.aggregation == "square"
        heads_now, channels_now = self.head_present[i], self.channel_present[i]
        heads, channels = group_scores(
            self.projections(i),
            self.groups,
            self.criterion,
            self.head_alive[i][heads_now],
            self.config.normalize,
            square,
            self.channel_alive[i][channels_now],
            self.kv_of_head(i),
            scratch,
        )
        dense_heads, dense_channels = torch.zeros(self.groups.heads), torch.zeros(self.groups.channels)
        dense_heads[heads_now], dense_channels[channels_now] = heads.cpu().float(), channels.cpu().float()
        return dense_heads, dense_channels

    def physical_masks_of(self, i: int) -> tuple[Tensor, Tensor]:
        """Which of the heads and of the channels layer i holds now are alive."""
        return self.head_alive[i][self.head_present[i]], self.channel_alive[i][self.channel_present[i]]

    def physical_masks(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per layer, over the heads and channels it holds now: which are alive, and the k/v head each
        query head reads: what shrink.shrink needs to cut the rest out."""
        masks = [self.physical_masks_of(i) for i in range(len(self.layers))]
        return [h for h, _ in masks], [c for _, c in masks], [self.kv_of_head(i) for i in range(len(self.layers))]

    def shrink_dead(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """--shrink progressive: cut every dead group out of the layers that still hold one (W0, the
        LoRA factors, and the `optimizer`'s moments of those factors), so that training continues
        on the smaller model. True when anything was cut (a DDP wrapper must then be rebuilt)."""
        if not self.progressive:
            return False
        moved = []
        with torch.no_grad():
            for i in self.prunable:
                heads, channels = self.physical_masks_of(i)
                if heads.all() and channels.all():
                    continue
                head_dim, kv_of_head = self.groups.head_dim, self.kv_of_head(i)
                shrink_layer(self.layers[i], self.arch, head_dim, kv_of_head, heads, channels, moved)
                self.head_present[i] = self.head_alive[i]
                self.channel_present[i] = self.channel_alive[i]
        if optimizer is not None:
            move_optimizer_state(optimizer, moved)
        return bool(moved)

    def shapes(self) -> Tensor:
        """[layers, projections]: each projection's output rows and input columns, as the modules
        have them now (checked identical over the ranks and recorded in checkpoints)."""
        rows = []
        for i in range(len(self.layers)):
            rows.append([n for m in self.projections(i).values() for n in (m.out_features, m.in_features)])
        return torch.tensor(rows, dtype=torch.int64)

    def update_scores(self) -> bool:
        """Fold this step's scores into the moving averages; skip (and count) a non-finite step."""
        self.criterion.synchronize()  # several processes: average what the criterion collected
        layer_step, hidden_step = self.depth.step_scores(), self.hidden.step_scores()
        try:
            scratch = Scratch()  # one set of block buffers for the whole update, freed after it
            layers = self.width_layers  # a removed layer's groups get no gradient: they keep their averages
            new = [self.layer_scores(i, scratch) for i in layers]
        finally:
            self.clear_step_gradients()  # so that the next step's do not add onto this one's
        if not all(torch.isfinite(h).all() and torch.isfinite(c).all() for h, c in new):
            self.skipped_updates += 1
            return False
        self.depth.fold(layer_step)
        self.hidden.fold(hidden_step)
        lam = self.config.ema
        for i, (heads, channels) in zip(layers, new, strict=True):
            self.head_score[i] = lam * self.head_score[i] + (1 - lam) * heads.cpu()
            self.channel_score[i] = lam * self.channel_score[i] + (1 - lam) * channels.cpu()
        self.score_updates += 1
        return True

    def prune_to(self, sparsity: float, layers: float = 0.0, hidden: float = 0.0) -> None:
        """Raise the prunable layers to `sparsity`, removing the lowest-scored live groups: in every
        layer (allocation 'layer'), or as many in all, anywhere above each layer's floor ('global');
        remove the lowest-scored whole layers until `layers` of the prunable ones are gone, and
        hidden channels until `hidden` of the hidden size is."""
        self.depth.prune_to(layers)
        self.hidden.prune_to(hidden)
        if self.config.allocation == "global":
            heads = self.groups.head_targets(sparsity, uniform=False)[0]  # global excludes --uniform
            self._remove_globally(self.head_alive, self.head_score, heads)
            self._remove_globally(self.channel_alive, self.channel_score, self.groups.channel_target(sparsity))
        channel_targets = self._channel_targets(sparsity) if self.config.allocation == "layer" else {}
        for i in self.prunable:
            if self.config.allocation == "layer":
                targets = self.groups.head_targets(sparsity, self.config.uniform)
                for pool, target in zip(self.head_pools, targets, strict=True):
                    _remove_lowest(self.head_alive[i], self.head_score[i], pool, target)
                _remove_lowest(self.channel_alive[i], self.channel_score[i], None, channel_targets[i])
            self.head_masks[i].copy_(self.head_alive[i].repeat_interleave(self.groups.head_dim))
            self.channel_masks[i].copy_(self.channel_alive[i])

    def _channel_targets(self, sparsity: float) -> dict[int, int]:
        """The MLP channels each prunable layer has lost at `sparsity`. Under --multiple-of N each
        layer heads for a final loss that leaves a multiple of N (_aligned_removals), reached along
        the schedule in proportion (exactly at the last pruning step)."""
        ratio, multiple_of = self.config.ratio, self.config.multiple_of
        if not multiple_of or not ratio:
            return dict.fromkeys(self.prunable, self.groups.channel_target(sparsity))
        final = self._aligned_removals(*self.groups.aligned_removals(ratio, multiple_of))
        return {i: round_half_up(min(sparsity / ratio, 1.0) * final[i]) for i in self.prunable}

    def _aligned_removals(self, fewer: int, more: int) -> dict[int, int]:
        """Each prunable layer's final channel loss, `fewer` or `more` (both leave a multiple of N):
        as many layers take `fewer` as bring the total nearest the ratio's, those whose extra groups
        (the ones `more` would also remove) score highest; a layer that has lost more than `fewer`
        already takes `more`. --uniform: every layer alike, the nearer of the two."""
        layers, dead = self.prunable, {i: int((~self.channel_alive[i]).sum()) for i in self.prunable}
        forced = {i for i in layers if dead[i] > fewer}
        target = self.groups.channel_target(self.config.ratio)
        if self.config.uniform:
            loss = more if forced or target - fewer > more - target else fewer
            return dict.fromkeys(layers, loss)

        def extra_score(i: int) -> float:  # the groups ranked fewer..more from the bottom, dead first
            ranked = torch.where(self.channel_alive[i], self.channel_score[i], -math.inf).sort().values
            return float(ranked[fewer:more].sum())

        free = sorted((i for i in layers if i not in forced), key=extra_score, reverse=True)
        goal = target * len(layers)
        keep = min(range(len(free) + 1), key=lambda m: (abs(m * fewer + (len(layers) - m) * more - goal), -m))
        return {i: fewer if i in free[:keep] else more for i in layers}

    def _remove_globally(self, alive: Tensor, score: Tensor, per_layer: int) -> None:
        """Mark dead the lowest-scored live groups of all prunable layers until `per_layer` times
        their number are dead, never leaving a layer fewer than --min-keep of its groups."""
        rows = torch.tensor(self.width_layers)
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

    @property
    def width_layers(self) -> list[int]:
        """The prunable layers not removed whole: those whose heads and channels count."""
        return [i for i in self.prunable if self.depth.alive[i]]

    def sparsity(self) -> tuple[float, float]:
        """Fraction of heads and of channels removed, over the prunable layers not removed whole."""
        rows = self.width_layers
        return (1 - self.head_alive[rows].float().mean().item(), 1 - self.channel_alive[rows].float().mean().item())

    def state_dict(self) -> dict[str, Tensor | int]:
        """Masks, score averages, counters and the criterion's state: what a checkpoint needs."""
        state = {name: getattr(self, name) for name in ("head_alive", "channel_alive", "head_score", "channel_score")}
        state.update(score_updates=self.score_updates, skipped_updates=self.skipped_updates)
        state["shapes"] = self.shapes()
        return state | self.depth.state_dict() | self.hidden.state_dict() | self.criterion.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values and the masks they imply (--shrink progressive: call
        `shrink_dead` next, to give the model the shapes they imply)."""
        for name in ("head_alive", "channel_alive", "head_score", "channel_score"):
            getattr(self, name).copy_(state[name])
        self.score_updates, self.skipped_updates = int(state["score_updates"]), int(state["skipped_updates"])
        self.criterion.load_state_dict(state)
        self.depth.load_state_dict(state)
        self.hidden.load_state_dict(state)
        for i in self.prunable:
            self.head_masks[i].copy_(self.head_alive[i].repeat_interleave(self.groups.head_dim))
            self.channel_masks[i].copy_(self.channel_alive[i])

    def clear_step_gradients(self) -> None:
        """Drop what this step's backward left for scoring: dL/dW0, the criterion's own statistics."""
        for weight in self.scored_weights:
            weight.grad = None
        self.criterion.next_step()
        self.depth.next_step()
        self.hidden.next_step()

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def stop_scoring(self) -> None:
        """After the last pruning step no score can change a mask: drop the criterion's hooks (the
        inputs `streamed` keeps, its products in backward) and the base weights' gradients
        (`gradient`'s dL/dW0), so that the steps left cost a plain LoRA step. Idempotent."""
        if not self.scoring:
            return
        self.clear_step_gradients()
        self.depth.stop_scoring()
        self.hidden.stop_scoring()
        self.criterion.detach()
        for weight in self.scored_weights:
            weight.requires_grad_(False)
        self.scoring = False

    def close(self) -> None:
        """Remove the masks' (and the criterion's) hooks and freeze the base weights again (after
        training, or after a failure inside it)."""
        self.remove_hooks()
        self.depth.close()
        self.hidden.close()
        self.stop_scoring()


def _remove_lowest(alive: Tensor, score: Tensor, pool: Tensor | None, target: int) -> None:
    """Mark dead the lowest-scored live members of `pool` until `target` of them are dead."""
    pool = torch.arange(len(alive)) if pool is None else pool
    live = pool[alive[pool]]
    missing = target - (len(pool) - len(live))
    if missing > 0:
        order = torch.argsort(score[live], stable=True)
        alive[live[order[:missing]]] = False
