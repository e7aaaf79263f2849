"""Faults: NaN losses, a full disk, quantized loading without CUDA, and the lean-memory options."""

import errno
import math
import warnings

import pytest
import torch

from loraprune import LoraPruneError, PruneConfig, prune
from loraprune.cli import main
from loraprune.pipeline.load import load_model
from loraprune.pipeline.schedule import SparsitySchedule
from loraprune.pipeline.train import is_activation_checkpointing
from tiny import tiny_model

CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)
# the task loss alone: the hooks count training forwards, and the top-k teacher would add its own first
FAST = dict(ratio=0.5, steps=8, prune_freq=2, seq_len=16, batch_size=2, skip_layers="none", distill=0)


def nan_on_calls(model, calls: set[int]):
    """Make the embeddings return NaN on the given forward calls (1-based): the loss is NaN."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        return output * float("nan") if count[0] in calls else output

    model.get_input_embeddings().register_forward_hook(hook)


def test_a_single_nan_step_is_skipped(tiny_tokenizer):
    model = tiny_model("llama-gqa")
    nan_on_calls(model, {3})
    pruned, report = prune(model, tiny_tokenizer, CORPUS, PruneConfig(**FAST), progress=False)
    assert report["history"]["skipped_steps"] == [3]
    # no score update and no optimizer step at step 3 (and none in the cooldown)
    assert report["score_updates"] == SparsitySchedule.of(PruneConfig(**FAST)).end - 1
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


def nan_gradient_on_calls(model, calls: set[int]):
    """On the given forward calls (1-based), make the gradient reaching layer 1's output NaN while the
    loss stays finite: the LoRA factors of layers 0 and 1 get NaN gradients."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if count[0] in calls:
            hidden.register_hook(lambda grad: grad * float("nan"))

    model.model.layers[1].register_forward_hook(hook)


def test_a_nan_gradient_under_a_finite_loss_skips_the_whole_step(tiny_tokenizer):
    _, clean = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, PruneConfig(**FAST), progress=False)
    model = tiny_model("llama-gqa")
    nan_gradient_on_calls(model, {3})
    pruned, report = prune(model, tiny_tokenizer, CORPUS, PruneConfig(**FAST), progress=False)
    history = report["history"]
    assert all(math.isfinite(loss) for loss in history["loss"])  # step 3's loss too: only its gradient was NaN
    assert history["skipped_steps"] == [3]
    assert report["score_updates"] == clean["score_updates"] - 1 and report["skipped_score_updates"] == 0
    assert history["loss"][:2] == clean["history"]["loss"][:2]  # the same run up to the bad step
    assert all(torch.isfinite(p).all() for p in pruned.parameters())  # no optimizer step took the NaN


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_checkpoint(tiny_tokenizer, tmp_path):
    from loraprune.runtime.checkpoint import Checkpointer, latest

    model = tiny_model("llama-gqa")
    nan_on_calls(model, set(range(5, 100)))
    checkpointer = Checkpointer(tmp_path / "run", {"model": "tiny"}, every=2)
    with pytest.raises(LoraPruneError, match=r"NaN or infinite for 3 steps in a row \(steps 5-7\): stopped; "
                       r"the last good checkpoint is .*step-000006; lower --lr"):  # fmt: skip
        prune(model, tiny_tokenizer, CORPUS, PruneConfig(**FAST, max_nan_steps=3), False, checkpointer)
    assert latest(tmp_path / "run").step == 6


@pytest.mark.parametrize("criterion", ["streamed", "gradient", "sketch"])
def test_a_run_stopped_by_an_error_leaves_no_hooks_on_the_model(tiny_tokenizer, criterion):
    """Masks (--shrink end) and the criterion's hooks come off, and the base weights are frozen again,
    when training raises (here: NaN steps in a row)."""
    model = tiny_model("llama-gqa")
    nan_on_calls(model, set(range(5, 100)))
    ours = {id(h) for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())}
    config = PruneConfig(**FAST, max_nan_steps=3, criterion=criterion, shrink="end")
    with pytest.raises(LoraPruneError, match="NaN or infinite for 3 steps in a row"):
        prune(model, tiny_tokenizer, CORPUS, config, progress=False)
    left = [
        (name, h)
        for name, m in model.named_modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        if id(h) not in ours
    ]
    assert left == []
    assert not any(hasattr(m, "loraprune_streamed_score") for m in model.modules())
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)


def test_disk_full_while_saving_keeps_the_previous_output(tiny_tokenizer, tmp_path, monkeypatch):
    from loraprune import save_pruned
    from loraprune.pipeline import export

    pruned, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, PruneConfig(**FAST), progress=False)
    out = tmp_path / "out"
    save_pruned(pruned, tiny_tokenizer, out, report)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(LoraPruneError, match=f"the disk is full: saving the pruned model to {out} failed; "
                       f"the previous {out} is intact; free some space"):  # fmt: skip
        save_pruned(pruned, tiny_tokenizer, out, report, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_tokenizer, tmp_path, monkeypatch):
    from loraprune.runtime import checkpoint

    saved, real_save = [], checkpoint.save_file

    def full_after_first(tensors, path):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_after_first)
    checkpointer = checkpoint.Checkpointer(tmp_path / "run", {"model": "tiny"}, every=2)
    with pytest.raises(LoraPruneError, match="the disk is full: writing checkpoint .*step-000004 failed; "
                       "the previous checkpoint .*step-000002 is intact"):  # fmt: skip
        prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, PruneConfig(**FAST), False, checkpointer)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["step-000002"]
    assert checkpoint.latest(tmp_path / "run").step == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_loading_without_cuda_is_a_clear_error(tiny_folder, bits):
    with pytest.raises(LoraPruneError, match=f"--load-in-{bits}bit needs a CUDA GPU .*this machine has none"):
        load_model(str(tiny_folder), quantize_bits=bits)


def test_quantized_flags_exclude_each_other(capsys, tiny_folder, tmp_path):
    code = main(["prune", "--model", str(tiny_folder), "--data", "ptb", "--output", str(tmp_path / "o"),
                 "--load-in-8bit", "--load-in-4bit"])  # fmt: skip
    assert code == 2 and "exclude each other" in capsys.readouterr().err


def test_bfloat16_base_and_gradient_checkpointing(tiny_tokenizer):
    config = PruneConfig(**FAST, lora_dropout=0.1)
    plain, report = prune(tiny_model("qwen2-gqa"), tiny_tokenizer, CORPUS, config, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointed, report_gc = prune(
            tiny_model("qwen2-gqa"), tiny_tokenizer, CORPUS, PruneConfig(**FAST, lora_dropout=0.1,
            gradient_checkpointing=True), progress=False,
        )  # fmt: skip
    # transformers 5.24 deprecates gradient_checkpointing_enable/_disable: the current names are used
    # (peft itself still reads the deprecated is_gradient_checkpointing when it wraps a model)
    old_names = ("gradient_checkpointing_enable", "gradient_checkpointing_disable")
    assert not [str(w.message) for w in caught if str(w.message).startswith(tuple(f"`{n}`" for n in old_names))]
    # recomputation replays dropout's random numbers: the same masks and (to rounding) weights
    assert report["scores"]["head_alive"].equal(report_gc["scores"]["head_alive"])
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not is_activation_checkpointing(checkpointed)

    half, report_bf16 = prune(tiny_model("qwen2-gqa").to(torch.bfloat16), tiny_tokenizer, CORPUS, config, False)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert report_bf16["scores"]["head_score"].dtype == torch.float32  # scores accumulate in float32
    assert torch.isfinite(report_bf16["scores"]["head_score"]).all()
