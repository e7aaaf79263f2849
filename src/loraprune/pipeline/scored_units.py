"""What depth (depth.py) and hidden-size pruning (hidden.py) keep alike: a set of units (layers, hidden
channels), which are alive, a moving average of their scores, the step's sums the hooks collect, the
hooks themselves, and a switch that lifts the removal for the dense teacher."""

import contextlib

import torch
from torch import Tensor


class ScoredUnits:
    """`n` units named `name` in checkpoints; the lowest-scored live ones go first."""

    def __init__(self, name: str, n: int, ratio: float, ema: float):
        self.name, self.ratio, self.ema = name, ratio, ema
        self.alive = torch.ones(n, dtype=torch.bool)
        self.score = torch.zeros(n)
        self.updates = 0
        self.step_sum = torch.zeros(n, dtype=torch.float64)  # what the hooks collect during one step
        self.scoring, self.lifted, self.hooks = ratio > 0, False, []

    def fold(self, step: Tensor | None) -> None:
        """Fold a step's scores (step_scores(); NaN: a unit not measured, which keeps its average)."""
        if step is None:
            return
        measured = ~step.isnan()
        self.score[measured] = self.ema * self.score[measured] + (1 - self.ema) * step[measured]
        self.updates += 1

    def next_step(self) -> None:
        self.step_sum.zero_()

    def remove_lowest(self, candidates: Tensor, missing: int) -> None:
        """Mark dead the `missing` lowest-scored live units among `candidates`."""
        if missing > 0:
            live = candidates[self.alive[candidates]]
            self.alive[live[torch.argsort(self.score[live], stable=True)[:missing]]] = False

    @contextlib.contextmanager
    def lifted_for_teacher(self):
        """Inside, every unit is there (the dense teacher)."""
        self.lifted = True
        try:
            yield
        finally:
            self.lifted = False

    def state_dict(self) -> dict[str, Tensor | int]:
        return {f"{self.name}_alive": self.alive, f"{self.name}_score": self.score,
                f"{self.name}_score_updates": self.updates}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if f"{self.name}_alive" in state:  # checkpoints from before this kind of pruning have none
            self.alive.copy_(state[f"{self.name}_alive"])
            self.score.copy_(state[f"{self.name}_score"])
            self.updates = int(state[f"{self.name}_score_updates"])
            self.apply_alive()

    def apply_alive(self) -> None:
        """Make the model follow `alive` (after pruning or loading)."""

    def stop_scoring(self) -> None:
        self.scoring = False
        self.next_step()

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.stop_scoring()
