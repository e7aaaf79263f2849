"""The cubic sparsity schedule (METHOD.md §5): pure functions of the step, tested without a model."""

import math
from dataclasses import dataclass

from .errors import LoraPruneError


def round_half_up(x: float) -> int:
    # Python's round() is banker's rounding: 4.5 -> 4, 5.5 -> 6; counts should not depend on parity
    return math.floor(x + 0.5 + 1e-9)


@dataclass(frozen=True)
class CubicSchedule:
    """Sparsity s(t) over optimizer steps t = 1..total: 0 until the warmup ends, then rising
    cubically to `target` at the end of the pruning window, then held through the cooldown."""

    target: float
    total: int
    warmup: float = 0.1
    cooldown: float = 0.1
    every: int = 10  # prune every this many steps inside the window

    @property
    def start(self) -> int:
        return round(self.warmup * self.total)

    @property
    def end(self) -> int:
        return self.total - round(self.cooldown * self.total)

    def __post_init__(self):
        if self.end <= self.start:
            raise LoraPruneError(
                f"--steps {self.total} is too few: warmup {self.warmup} and cooldown {self.cooldown} leave "
                "no step to prune in; raise --steps or lower --warmup/--cooldown"
            )

    def sparsity(self, step: int) -> float:
        if step <= self.start:
            return 0.0
        if step >= self.end:
            return self.target
        progress = (step - self.start) / (self.end - self.start)
        return self.target * (1 - (1 - progress) ** 3)

    def is_pruning_step(self, step: int) -> bool:
        # the window's last step always prunes, so the target is reached exactly
        in_window = self.start < step <= self.end
        return in_window and ((step - self.start) % self.every == 0 or step == self.end)

    def pruning_steps(self) -> list[int]:
        return [t for t in range(1, self.total + 1) if self.is_pruning_step(t)]
