"""Sparsity schedules (docs/method.md#schedule): pure functions of the step, tested without a model.

Every shape holds sparsity 0 through the warmup, rises to the target inside the pruning window
and holds it through the cooldown; they differ in how fast they rise (p: progress through the
window, 0..1):
- cubic (the paper's): target·(1 − (1 − p)³), fast at first, gentle at the end;
- linear: target·p;
- exponential: 1 − (1 − target)^p, the same fraction of the remaining groups at each prune;
- oneshot: everything at the window's first pruning step, then fine-tuning only (recovery).
"""

from dataclasses import dataclass

from ..errors import LoraPruneError
from ..prune_config import SCHEDULE_NAMES, round_half_up

SHAPES = SCHEDULE_NAMES  # the shapes sparsity() draws; prune_config.py validates --schedule against them


@dataclass(frozen=True)
class SparsitySchedule:
    """Sparsity s(t) over optimizer steps t = 1..total: 0 until the warmup ends, then rising along
    `shape` to `target` at the end of the pruning window, then held through the cooldown."""

    target: float
    total: int
    warmup: float = 0.1
    cooldown: float = 0.1
    every: int = 10  # prune every this many steps inside the window
    shape: str = "cubic"

    @classmethod
    def of(cls, config) -> "SparsitySchedule":
        """The schedule a PruneConfig asks for."""
        return cls(config.ratio, config.steps, config.warmup, config.cooldown, config.prune_freq, config.schedule)

    @property
    def start(self) -> int:
        return round_half_up(self.warmup * self.total)

    @property
    def end(self) -> int:
        """The last pruning step (oneshot: its only one)."""
        window_end = self.total - round_half_up(self.cooldown * self.total)
        return min(self.start + self.every, window_end) if self.shape == "oneshot" else window_end

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise LoraPruneError(f"--schedule must be one of {', '.join(SHAPES)} (got {self.shape!r})")
        if self.total - round_half_up(self.cooldown * self.total) <= self.start:
            raise LoraPruneError(
                f"--steps {self.total} is too few: warmup {self.warmup} and cooldown {self.cooldown} leave "
                "no step to prune in; raise --steps or lower --warmup/--cooldown"
            )

    def sparsity(self, step: int) -> float:
        if step <= self.start:
            return 0.0
        if step >= self.end:
            return self.target
        if self.shape == "oneshot":
            return 0.0
        progress = (step - self.start) / (self.end - self.start)
        if self.shape == "cubic":
            return self.target * (1 - (1 - progress) ** 3)
        if self.shape == "linear":
            return self.target * progress
        return 1 - (1 - self.target) ** progress  # exponential

    def is_pruning_step(self, step: int) -> bool:
        # the window's last step always prunes, so the target is reached exactly
        in_window = self.start < step <= self.end
        return in_window and ((step - self.start) % self.every == 0 or step == self.end)

    def pruning_steps(self) -> list[int]:
        return [t for t in range(1, self.total + 1) if self.is_pruning_step(t)]
