"""diagnose.py: the estimate-vs-truth measures, checked where the answer is known."""

import json

import pytest
import torch

from loraprune.archs import arch_for
from loraprune.cli import main
from loraprune.pipeline.groups import LayerGroups
from loraprune.pipeline.importance import lora_gradient_estimate
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.scoring import read_factors
from loraprune.prune_config import PruneConfig
from loraprune.tasks.causal_lm import causal_lm_loss
from loraprune.tools.diagnose import bottom_overlap, estimate_error, measure, spearman, summarize
from tiny import tiny_model


def test_spearman_and_bottom_overlap():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7])
    assert spearman(a, a * 3 + 1) == pytest.approx(1)
    assert spearman(a, -a) == pytest.approx(-1)
    assert spearman(a, a**3) == pytest.approx(1)  # ranks only
    b = torch.tensor([0.2, 0.1, 0.9, 0.8, 0.7])  # lowest two: {1, 0} vs a's {0, 2}
    assert bottom_overlap(a, b, 0.4) == 0.5
    assert bottom_overlap(a, b, 0.01) == 0  # k is at least one: a's lowest is 0, b's is 1


def _with_lora(r: int, alpha: float):
    model = tiny_model("llama-gqa", seed=3)
    arch = arch_for(model.config)
    peft_model = attach_lora(model, arch, PruneConfig(lora_r=r, lora_alpha=alpha, lora_dropout=0.0))
    return peft_model.get_base_model(), arch


def test_estimate_error_of_a_planted_gradient():
    model, arch = _with_lora(r=4, alpha=8)
    q = arch.projections(arch.layers_of(model)[0])["q"]
    g = torch.Generator().manual_seed(0)
    for p in (q.lora_A["default"].weight, q.lora_B["default"].weight):
        p.data = torch.randn(p.shape, generator=g)
        p.grad = torch.randn(p.shape, generator=g)
    estimate = lora_gradient_estimate(read_factors(q, slice(None)))
    q.base_layer.weight.grad = 2 * estimate
    assert estimate_error(q, block_rows=5) == pytest.approx({"cosine": 1.0, "relative_error": 0.5})
    q.base_layer.weight.grad = -estimate
    assert estimate_error(q) == pytest.approx({"cosine": -1.0, "relative_error": 2.0})


def test_the_estimate_is_exact_when_A_spans_every_input_and_B_is_zero():
    """r >= in, A with orthonormal columns (AᵀA = I), s = 1, B = 0 (LoRA's start): then
    G_A = s·Bᵀ·G = 0 and the estimate G_B·A = s·G·AᵀA is the true gradient G itself, so both
    criteria score every group alike."""
    model, arch = _with_lora(r=64, alpha=64)
    for layer in arch.layers_of(model):
        for module in arch.projections(layer).values():
            A = module.lora_A["default"].weight
            q, _ = torch.linalg.qr(torch.randn(A.shape[0], A.shape[0], generator=torch.Generator().manual_seed(1)))
            A.data = q[:, : A.shape[1]].contiguous()
    probe = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))]
    groups = LayerGroups.from_config(model.config, arch)
    layers = measure(model, arch, groups, probe, True, causal_lm_loss, layers_per_pass=2)
    assert [row["layer"] for row in layers] == [0, 1, 2]
    summary = summarize(layers)
    for key, value in summary.items():
        if key.endswith(("magnitude_spearman", "sketch_spearman")):  # other criteria: no reason to be exact
            continue
        expected = 0.0 if key.startswith("relative_error") else 1.0
        assert value == pytest.approx(expected, abs=1e-4), key
    # the base weights are frozen again and hold no gradient
    assert not any(p.requires_grad or p.grad is not None for n, p in model.named_parameters() if "lora_" not in n)


def test_the_estimate_is_partial_when_A_has_fewer_directions():
    """r < in, B = 0: the estimate is G projected on A's r rows: cosine strictly between 0 and 1."""
    model, arch = _with_lora(r=2, alpha=4)
    groups = LayerGroups.from_config(model.config, arch)
    probe = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))]
    summary = summarize(measure(model, arch, groups, probe, True, causal_lm_loss))
    cosines = [v for k, v in summary.items() if k.startswith("cosine/")]
    assert all(0 < c < 0.95 for c in cosines), summary


def test_diagnose_command(tmp_path, tiny_folder, text_file, capsys):
    out = tmp_path / "diag"
    argv = ["diagnose", "--model", str(tiny_folder), "--data", str(text_file), "--seq-len", "16", "--batch-size", "2"]
    argv += ["--at-steps", "6,0", "--lr", "1e-2", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Spearman heads" in printed and "cos down" in printed
    result = json.loads((out / "diagnose.json").read_text())
    assert [p["step"] for p in result["points"]] == [0, 6]
    start, later = result["points"]
    assert start["lora_B_norm"] == 0 < later["lora_B_norm"]  # B starts at zero and then learns
    assert len(start["layers"]) == 3 and all(-1 <= row["heads"]["spearman"] <= 1 for row in start["layers"])
    assert (out / "diagnose.png").stat().st_size > 10_000 and "diagnose.png" in (out / "diagnose.md").read_text()

    assert main(argv) == 2  # the folder now exists
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([*argv[:-3], "--at-steps", "x", "--output", str(tmp_path / "other")]) == 2
    assert "--at-steps must be step numbers" in capsys.readouterr().err
