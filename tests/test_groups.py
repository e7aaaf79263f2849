"""Group sizes and targets from configs alone (no weights): SmolLM2's shape and edge cases."""

import pytest
from transformers import LlamaConfig

from loraprune.archs import arch_for
from loraprune.errors import LoraPruneError
from loraprune.pipeline.groups import LayerGroups
from loraprune.plan import check_compatible
from loraprune.prune_config import PruneConfig

SMOLLM2 = LlamaConfig(
    hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, num_hidden_layers=30
)


def test_sizes_come_from_the_config():
    g = LayerGroups.from_config(SMOLLM2, arch_for(SMOLLM2))
    assert (g.heads, g.kv_heads, g.head_dim, g.channels, g.heads_per_kv) == (9, 3, 64, 1536, 3)
    assert g.kv_of_head.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize(
    "ratio, uniform, kept",
    [
        (0.5, False, (4, None, 768)),  # 4.5 heads round up to 5 removed; k/v heads depend on the scores
        (0.2, False, (7, None, 1229)),
        (0.2, True, (6, 3, 1229)),  # uniform GQA: one of each k/v group's 3 heads
        (0.5, True, (3, 3, 768)),
    ],
)
def test_kept_shapes(ratio, uniform, kept):
    assert LayerGroups.from_config(SMOLLM2, arch_for(SMOLLM2)).kept_at(ratio, uniform) == kept


def test_uniform_ratios_that_stock_transformers_accepts_pass():
    for ratio in (0.1, 0.2, 0.5, 0.7):
        check_compatible(SMOLLM2, PruneConfig(ratio=ratio, uniform=True))


def test_uniform_shape_rejected_by_the_config_validator_is_refused_up_front():
    mha = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=9, intermediate_size=1536)
    with pytest.raises(LoraPruneError, match="leaves 7 heads .* which LlamaConfig rejects .*multiple"):
        check_compatible(mha, PruneConfig(ratio=0.2, uniform=True))


def test_skip_layers_spec():
    assert PruneConfig().skipped_layers(30) == {0, 1, 2, 29}
    assert PruneConfig(skip_layers="none").skipped_layers(30) == set()
    assert PruneConfig(skip_layers="0,1,-1").skipped_layers(30) == {0, 1, 29}
    assert PruneConfig(uniform=True).skipped_layers(30) == set()
    with pytest.raises(LoraPruneError, match="--uniform prunes every layer alike"):
        PruneConfig(uniform=True, skip_layers="0,1")


def test_first10pct_rounds_half_up():
    """10% of 5 and of 25 layers are exact halves (0.5, 2.5): round() would keep 0 and 2 layers."""
    assert PruneConfig().skipped_layers(5) == {0, 4}
    assert PruneConfig().skipped_layers(25) == {0, 1, 2, 24}
    assert PruneConfig().skipped_layers(4) == {3}  # 0.4 rounds down
