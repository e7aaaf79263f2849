import pytest

from loraprune.errors import LoraPruneError
from loraprune.schedule import CubicSchedule, round_half_up


def test_cubic_values_at_known_steps():
    s = CubicSchedule(target=0.5, total=100, warmup=0.1, cooldown=0.1, every=10)
    assert (s.start, s.end) == (10, 90)
    assert s.sparsity(0) == 0 and s.sparsity(10) == 0
    assert s.sparsity(50) == pytest.approx(0.5 * (1 - 0.5**3))  # halfway: 0.4375
    assert s.sparsity(30) == pytest.approx(0.5 * (1 - 0.75**3))
    assert s.sparsity(90) == 0.5 and s.sparsity(100) == 0.5


def test_sparsity_never_decreases():
    s = CubicSchedule(target=0.7, total=57, warmup=0.2, cooldown=0.05, every=3)
    values = [s.sparsity(t) for t in range(1, 58)]
    assert values == sorted(values)


def test_last_pruning_step_reaches_the_target_exactly():
    s = CubicSchedule(target=0.5, total=37, warmup=0.1, cooldown=0.1, every=10)
    steps = s.pruning_steps()
    assert steps[-1] == s.end == 33  # not a multiple of `every` after the start: forced
    assert s.sparsity(steps[-1]) == 0.5
    assert steps[:-1] == [14, 24]
    assert round_half_up(s.sparsity(steps[-1]) * 32) == 16  # the reference stops at 15 of 32


def test_round_half_up():
    assert [round_half_up(x) for x in (4.5, 5.5, 0.49, 2.0)] == [5, 6, 0, 2]


def test_too_few_steps_for_warmup_and_cooldown():
    with pytest.raises(LoraPruneError, match="--steps 2 is too few"):
        CubicSchedule(target=0.5, total=2, warmup=0.4, cooldown=0.4)
