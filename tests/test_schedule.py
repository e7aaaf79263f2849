import pytest

from loraprune.errors import LoraPruneError
from loraprune.pipeline.schedule import SHAPES, SparsitySchedule
from loraprune.prune_config import round_half_up


def test_cubic_values_at_known_steps():
    s = SparsitySchedule(target=0.5, total=100, warmup=0.1, cooldown=0.1, every=10)
    assert (s.start, s.end) == (10, 90)
    assert s.sparsity(0) == 0 and s.sparsity(10) == 0
    assert s.sparsity(50) == pytest.approx(0.5 * (1 - 0.5**3))  # halfway: 0.4375
    assert s.sparsity(30) == pytest.approx(0.5 * (1 - 0.75**3))
    assert s.sparsity(90) == 0.5 and s.sparsity(100) == 0.5


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_rises_to_the_target_and_holds_it(shape):
    s = SparsitySchedule(target=0.7, total=57, warmup=0.2, cooldown=0.05, every=3, shape=shape)
    values = [s.sparsity(t) for t in range(1, 58)]
    assert values == sorted(values)
    assert values[: s.start] == [0.0] * s.start and values[s.end - 1 :] == [0.7] * (57 - s.end + 1)
    assert s.pruning_steps()[-1] == s.end and s.sparsity(s.end) == 0.7


def test_shapes_at_known_steps():
    def at(shape, step):
        return SparsitySchedule(target=0.5, total=100, warmup=0.1, cooldown=0.1, every=10, shape=shape).sparsity(step)

    assert at("linear", 50) == pytest.approx(0.25)
    assert at("exponential", 50) == pytest.approx(1 - 0.5**0.5)  # half the window: half the log-density
    assert at("cubic", 50) > at("exponential", 50) > at("linear", 50)  # cubic front-loads most


def test_oneshot_prunes_once_at_the_first_pruning_step():
    s = SparsitySchedule(target=0.5, total=100, warmup=0.1, cooldown=0.1, every=10, shape="oneshot")
    assert s.pruning_steps() == [20] and s.sparsity(20) == 0.5 and s.sparsity(19) == 0
    assert SparsitySchedule(0.5, 100, 0.1, 0.85, 10, "oneshot").pruning_steps() == [15]  # short window: its end


def test_unknown_shape():
    with pytest.raises(LoraPruneError, match="--schedule must be one of cubic, linear, exponential, oneshot"):
        SparsitySchedule(target=0.5, total=100, shape="step")


def test_last_pruning_step_reaches_the_target_exactly():
    s = SparsitySchedule(target=0.5, total=37, warmup=0.1, cooldown=0.1, every=10)
    steps = s.pruning_steps()
    assert steps[-1] == s.end == 33  # not a multiple of `every` after the start: forced
    assert s.sparsity(steps[-1]) == 0.5
    assert steps[:-1] == [14, 24]
    assert round_half_up(s.sparsity(steps[-1]) * 32) == 16  # the reference stops at 15 of 32


def test_round_half_up():
    assert [round_half_up(x) for x in (4.5, 5.5, 0.49, 2.0)] == [5, 6, 0, 2]


@pytest.mark.parametrize(("total", "start", "end"), [(45, 5, 40), (25, 3, 22), (35, 4, 31)])
def test_warmup_and_cooldown_steps_round_half_up(total, start, end):
    """0.1 * 45 = 4.5 and 0.1 * 25 = 2.5 are exact halves: round() would give 4 and 2 (banker's)."""
    s = SparsitySchedule(target=0.5, total=total, warmup=0.1, cooldown=0.1, every=10)
    assert (s.start, s.end) == (start, end)
    assert s.sparsity(start) == 0 and s.sparsity(start + 1) > 0 and s.pruning_steps()[-1] == end


def test_too_few_steps_for_warmup_and_cooldown():
    with pytest.raises(LoraPruneError, match="--steps 2 is too few"):
        SparsitySchedule(target=0.5, total=2, warmup=0.4, cooldown=0.4)
