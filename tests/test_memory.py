"""`loraprune estimate` and the memory pre-flight of `prune`: the meta-device count of what autograd
keeps against a real one, the estimate against the peak RSS of real steps in a fresh process, and
the pre-flight's two one-line verdicts on a folder that holds only a config."""

import json
import subprocess
import sys

import pytest
import torch

from loraprune.cli import main

# a ~42M-parameter random llama, so the model, not the interpreter, dominates the measured growth
CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
MEASURE = """
import gc, json, sys, torch
torch.set_num_threads(1)
from loraprune.tools.preflight import return_freed_memory
return_freed_memory()  # as `loraprune prune` does on a run near the RAM limit
from transformers import LlamaConfig
from bench.scale import Stepper, build, release, peak_bytes, rss_kib

config, dtype, criterion, checkpointing = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "on"
# the runtime: imports, and the first steps' kernel code and thread pools (a toy model's, then freed)
small = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2}
toy = Stepper(build(LlamaConfig(**{**config, **small}), getattr(torch, dtype)), criterion)
toy.checkpointing(checkpointing)
toy.measure(torch.randint(0, 320, (2, 64)), 1, "cpu")
del toy
release()
runtime = rss_kib("VmRSS") * 1024
stepper = Stepper(build(LlamaConfig(**config), getattr(torch, dtype)), criterion)
stepper.checkpointing(checkpointing)
stepper.measure(torch.randint(0, config["vocab_size"], (2, 64)), 2, "cpu")
print(runtime, peak_bytes("cpu"))
"""


@pytest.mark.parametrize(
    "dtype,criterion,checkpointing",
    [
        ("float32", "lora", "off"),
        ("bfloat16", "gradient", "off"),
        ("bfloat16", "sketch", "on"),
        ("float32", "streamed", "off"),
    ],
)
def test_estimate_is_within_10_percent_of_a_measured_run_above_the_runtime(dtype, criterion, checkpointing):
    from transformers import LlamaConfig

    from loraprune.tools.estimate import estimate

    est = estimate(LlamaConfig(**CONFIG), 2, 64, dtype=dtype, criterion=criterion,
                   gradient_checkpointing=checkpointing == "on")  # fmt: skip
    argv = [sys.executable, "-c", MEASURE, json.dumps(CONFIG), dtype, criterion, checkpointing]
    run = subprocess.run(argv, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    runtime, measured = map(int, run.stdout.split()[-2:])
    # the runtime differs between processes (this one imports less than `prune` and bench/scale.py,
    # whose measured runtime is the estimate's RUNTIME_BYTES): the test checks what the model adds
    predicted = est.peak - est.runtime + runtime
    assert abs(predicted - measured) / measured < 0.10, (predicted / 2**20, measured / 2**20)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-gqa"])
@pytest.mark.parametrize("criterion", ["lora", "gradient", "sketch", "streamed"])
@pytest.mark.parametrize("distill", [False, True])
def test_the_meta_trace_counts_what_a_real_forward_keeps(family, criterion, distill):
    """The estimate's activations: a forward and loss on the meta device, counted as a real one is,
    with the chunked loss (lm_loss.py), distilled from the dense model or not."""
    from loraprune.archs import arch_for
    from loraprune.pipeline.lm_loss import causal_lm_loss, distilled_causal_lm_loss
    from loraprune.pipeline.lora import attach_lora
    from loraprune.pipeline.pruner import Pruner
    from loraprune.pipeline.train import DenseTeacher
    from loraprune.prune_config import PruneConfig
    from loraprune.tasks import TASKS
    from loraprune.tools.estimate import saved_bytes
    from tiny import tiny_model

    model = tiny_model(family, layers=2).to(torch.bfloat16)
    config = PruneConfig(criterion=criterion, skip_layers="none")
    peft_model = attach_lora(model, arch_for(model.config), config)
    pruner = Pruner(peft_model.get_base_model(), arch_for(model.config), config)
    teacher = DenseTeacher(peft_model, TASKS["causal-lm"].forward, pruner)
    peft_model.train()
    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 64, (2, 24))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if distill:
            distilled_causal_lm_loss(peft_model, ids, teacher.run, 0.5, 2.0)
        else:
            causal_lm_loss(peft_model, ids)
    counted = saved_bytes(model.config, 2, 24, criterion, "bfloat16", distill=distill)
    assert counted == sum(storages.values())


def test_estimate_orders_the_criteria_and_the_levers():
    from transformers import LlamaConfig

    from loraprune.tools.estimate import estimate

    config = LlamaConfig(**CONFIG)
    criteria = ("lora", "sketch", "streamed", "gradient")
    peak = {c: estimate(config, 4, 128, dtype="bfloat16", criterion=c).peak for c in criteria}
    assert peak["lora"] == peak["sketch"] < min(peak["streamed"], peak["gradient"])  # both keep inputs
    few_tokens = {c: estimate(config, 1, 16, dtype="bfloat16", criterion=c).peak for c in criteria}
    assert few_tokens["streamed"] < few_tokens["gradient"]  # where dL/dW0 outweighs the activations
    checkpointed = estimate(config, 4, 128, dtype="bfloat16", gradient_checkpointing=True).peak
    assert checkpointed < peak["lora"] < estimate(config, 4, 128, dtype="float32").peak


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_command_prints_each_criterion_and_json(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(**CONFIG).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "estimate", "--model", tmp_path, "--batch-size", 2, "--seq-len", 64)
    assert code == 0
    assert all(c in out for c in ("lora", "sketch", "streamed", "gradient", "magnitude", "random"))
    assert "expected peak" in out and "fits in what is available" in out and "available:" in out
    code, out, _ = run(capsys, "estimate", "--model", tmp_path, "--dtype", "bfloat16", "--json")
    data = json.loads(out)
    peaks = {e["criterion"]: e["peak"] for e in data["estimates"]}
    assert peaks["gradient"] > peaks["lora"] == peaks["sketch"] and data["available_bytes"] > 0
    assert all(e["fits"] == (e["needed"] <= data["available_bytes"]) for e in data["estimates"])


LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)  # fmt: skip


@pytest.mark.parametrize("case", ["does not fit", "fits, no weights"])
def test_preflight_on_a_config_only_folder_is_one_line_and_writes_nothing(tmp_path, capsys, text_file, case):
    from transformers import LlamaConfig

    folder = tmp_path / "config-only"
    LlamaConfig(**(LLAMA_7B if case == "does not fit" else CONFIG)).save_pretrained(folder)
    # 7B, true gradients, float32, 8 x 2048 tokens: far beyond any machine this runs on
    big = ["--criterion", "gradient", "--batch-size", 8, "--seq-len", 2048] if case == "does not fit" else []
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = ["prune", "--model", folder, "--data", text_file, "--output", tmp_path / "out", "--steps", 10, *big]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    if case == "does not fit":
        assert "does not fit in memory: estimated peak" in err and "GiB of RAM available" in err
        assert "--criterion lora (" in err and "--gradient-checkpointing (" in err and "--batch-size 4 (" in err
    else:
        assert "holds a config but no weights" in err and "would fit in memory" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    # --no-memory-check skips the verdict: the load itself fails then (no tokenizer, no weights)
    code, _, err = run(capsys, *argv, "--no-memory-check")
    assert code == 2 and "no tokenizer" in err and "memory" not in err


def test_preflight_counts_processes_on_cpu_and_names_the_device():
    from transformers import LlamaConfig

    from loraprune.errors import LoraPruneError
    from loraprune.prune_config import PruneConfig
    from loraprune.tools.preflight import preflight

    config, run_config = LlamaConfig(**CONFIG), PruneConfig(criterion="streamed", batch_size=2, seq_len=64)
    est, needed, available = preflight(config, run_config, "float32", available=10 * 2**30)
    assert needed == est.peak and available == 10 * 2**30
    levers = r"for 4 processes \(streamed, .* of RAM available; levers: --criterion lora \("
    with pytest.raises(LoraPruneError, match=levers):
        preflight(config, run_config, "float32", processes=4, available=int(est.peak * 3.5))
    with pytest.raises(LoraPruneError, match="free on cuda:0 per process"):
        preflight(config, run_config, "float32", device="cuda:0", processes=4, available=1)


@pytest.mark.parametrize(
    "free_over_needed,allowed,tight",
    [(1.1, True, True), (1.1, False, False), (1.5, True, False), (3.0, True, False)],
)
def test_preflight_returns_freed_memory_only_where_the_run_would_not_fit_otherwise(
    tmp_path, monkeypatch, capsys, free_over_needed, allowed, tight
):
    """Only where the heap's measured overshoot would take the run past the free RAM, never under
    --no-return-freed-memory, and one line on stderr when it is set (it is process-wide)."""
    from transformers import LlamaConfig

    from loraprune.prune_config import PruneConfig
    from loraprune.run_settings import RunSettings
    from loraprune.tools import preflight

    LlamaConfig(**CONFIG).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()
    config = PruneConfig(criterion="streamed", batch_size=2, seq_len=64)
    needed = preflight.run_estimate(LlamaConfig(**CONFIG), config, "float32", "cpu", 1, None).peak
    monkeypatch.setattr(preflight, "available_bytes", lambda device: int(needed * free_over_needed))
    calls = []
    monkeypatch.setattr(preflight, "return_freed_memory", lambda: calls.append(1) or True)
    run = RunSettings(model=str(tmp_path), data="ptb", output="x", return_freed_memory=allowed)
    preflight.check_memory(LlamaConfig(**CONFIG), config, run)
    assert calls == ([1] if tight else [])
    said = capsys.readouterr().err
    assert ("glibc now returns freed memory" in said and "--no-return-freed-memory" in said) == tight
    assert said.count("\n") == int(tight)
