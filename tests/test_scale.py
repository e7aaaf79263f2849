"""bench/scale.py at a toy shape (CI): children per criterion, the pre-flight's verdict per point,
one JSON per size, the table and the plot from the JSON present; and the published shapes."""

import json

import pytest
import torch
from bench import scale, shapes
from bench.scale_report import cell


def test_the_scale_benchmark_runs_at_a_toy_shape(tmp_path):
    argv = ["--sizes", "tiny", "--points", "1x16:on,1x16:off", "--steps", "1", "--threads", "1", "--label", "smoke"]
    payload = scale.main([*argv, "--results", str(tmp_path), "--markdown", str(tmp_path / "B.md")])
    rows = json.loads((tmp_path / "scale-tiny.json").read_text())["rows"]
    assert {(r["criterion"], r["point"]) for r in rows} == {
        (c, p) for c in ("lora", "gradient", "sketch") for p in ("1x16:on", "1x16:off")
    }
    for r in rows:
        assert r["fits"] and r["peak_bytes"] > 0 and 0 < r["score_share"] < 1
        assert 0.5 < r["estimate_bytes"] / r["peak_bytes"] < 2  # a toy: the runtime is all there is
    text = (tmp_path / "B.md").read_text()
    assert "<!-- bench:memory-scale -->" in text and "| tiny |" in text and "scale-smoke.png" in text
    assert (tmp_path / "scale-smoke.png").stat().st_size > 0 and payload["rows"]


def test_a_point_that_does_not_fit_is_not_run_and_shows_its_estimate(tmp_path, monkeypatch):
    from loraprune.tools import estimate

    monkeypatch.setattr(estimate, "available_bytes", lambda device="cpu": 1)
    rows = scale.run_size(scale.arguments().parse_args(["--criteria", "lora", "--points", "1x16:off"]), "tiny")
    assert [r["fits"] for r in rows] == [False] and "peak_bytes" not in rows[0]
    assert "does not fit (est." in cell(rows[0])


@pytest.mark.parametrize(
    "size,billions",
    [("smollm2-360m", 0.362), ("llama-3.2-1b", 1.236), ("smollm2-1.7b", 1.711), ("llama-3.2-3b", 3.213),
     ("qwen2.5-3b", 3.086), ("llama-7b", 6.738)],
)  # fmt: skip
def test_the_shapes_have_their_published_parameter_counts(size, billions):
    from loraprune.tools.estimate import model_counts

    assert model_counts(shapes.model_config(size))["parameters"] / 1e9 == pytest.approx(billions, abs=0.002)


@pytest.mark.parametrize("tied", [True, False])
def test_a_built_model_keeps_its_tied_head_tied(tied):
    """to_empty materialises every parameter on its own: a tied LM head must be tied again, or the
    measured peak carries a second copy of it (0.5 GiB at Llama-3.2-1B) that no real model holds."""
    from bench.scale import build
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)  # fmt: skip
    model = build(config, torch.bfloat16)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    assert model.lm_head.weight.abs().sum() > 0
