"""Self-distillation from the dense model (tasks.distillation_loss, tasks.objective, train.DenseTeacher)."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from loraprune import LoraPruneError, PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.cli import main
from loraprune.pipeline.lm_loss import distillation_loss
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.train import DenseTeacher, teacher_autocast
from loraprune.tasks import TASKS, objective
from tiny import randomize_lora, tiny_encoder, tiny_model

CORPUS = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)


def test_distillation_loss_is_t_squared_kl_per_position():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    T = 2.0
    p = F.softmax(teacher / T, -1)
    expected = T**2 * (p * (p.log() - F.log_softmax(student / T, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, T), expected)
    torch.testing.assert_close(distillation_loss(student, teacher, T, rows=3), expected)  # chunking changes nothing
    assert distillation_loss(teacher, teacher, T).abs().item() < 1e-6
    # its gradient (formed in the forward) is autograd's of the closed form; none reaches the teacher
    mine, theirs = student.clone().requires_grad_(), student.clone().requires_grad_()
    (3 * distillation_loss(mine, teacher, T, rows=3)).backward()
    q = F.log_softmax(theirs / T, -1)
    (3 * T**2 * (p * (p.log() - q)).sum(-1).mean()).backward()
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_dense_teacher_is_the_model_before_lora_and_masks():
    model = tiny_model("llama-gqa")
    dense = copy.deepcopy(model)
    config = PruneConfig(criterion="lora", lora_dropout=0.0, skip_layers="none")
    peft_model = attach_lora(model, arch_for(model.config), config)
    randomize_lora(peft_model)
    pruner = Pruner(peft_model.get_base_model(), arch_for(model.config), config)
    pruner.head_score.uniform_(generator=torch.Generator().manual_seed(1))
    pruner.channel_score.uniform_(generator=torch.Generator().manual_seed(2))
    pruner.prune_to(0.5)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    forward = TASKS["causal-lm"].forward

    peft_model.train()
    teacher = DenseTeacher(peft_model, forward, pruner)(tokens)
    torch.testing.assert_close(teacher.logits, dense(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)
    assert peft_model.training and not pruner.masks_off  # everything as it was after the call
    student = forward(peft_model, tokens).logits
    assert (student - teacher.logits).abs().max() > 1e-2  # the adapter and the masks are back on


def test_a_bfloat16_teacher_is_the_dense_model_to_bfloat16_precision():
    model = tiny_model("llama-gqa")
    dense = copy.deepcopy(model)
    peft_model = attach_lora(model, arch_for(model.config), PruneConfig(lora_dropout=0.0))
    randomize_lora(peft_model)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    forward = TASKS["causal-lm"].forward
    logits = DenseTeacher(peft_model, forward, autocast=torch.bfloat16)(tokens).logits
    assert logits.dtype == torch.bfloat16  # it did run under autocast
    expected = dense(input_ids=tokens).logits
    torch.testing.assert_close(logits.float(), expected, rtol=0.05, atol=0.05)
    assert not torch.is_autocast_enabled("cpu")  # and it ended there


def test_teacher_precision_follows_the_setting_and_the_model():
    model = tiny_model("llama-gqa")
    assert teacher_autocast("bfloat16", model) is torch.bfloat16
    assert teacher_autocast("model", model) is None
    assert teacher_autocast("auto", model) in (torch.bfloat16, None)  # bfloat16 where the CPU computes it natively
    assert teacher_autocast("bfloat16", model.to(torch.bfloat16)) is None  # already the model's dtype


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_objective_mixes_task_loss_and_distillation(alpha):
    model = tiny_model("llama-gqa")
    config = PruneConfig(lora_dropout=0.0)
    peft_model = attach_lora(model, arch_for(model.config), config)
    randomize_lora(peft_model)
    task, tokens = TASKS["causal-lm"], torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    teacher = DenseTeacher(peft_model, task.forward)
    loss = objective(task, teacher, alpha, 2.0)(peft_model, tokens)
    output = task.forward(peft_model, tokens)
    kl = distillation_loss(output.logits, teacher(tokens).logits, 2.0)
    torch.testing.assert_close(loss, (1 - alpha) * output.loss + alpha * kl)
    loss.backward()  # the gradient reaches the LoRA factors through both terms
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


def test_prune_with_distillation(tiny_tokenizer):
    config = PruneConfig(ratio=0.5, steps=6, prune_freq=2, seq_len=16, batch_size=2, distill=0.5, distill_top_k=0)
    pruned, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, config, progress=False)
    assert report["config"]["distill"] == 0.5 and report["history"]["pruning_steps"] == [3, 5]
    assert all(torch.isfinite(torch.tensor(report["history"]["loss"])))


def test_top_k_distillation_shrinks_progressively_without_a_live_teacher(tiny_tokenizer, monkeypatch):
    """--distill-top-k: the dense model's top-k is computed once, for the windows training draws; no
    teacher forward runs per step, so the model shrinks while it trains."""
    from loraprune.pipeline import train

    monkeypatch.setattr(train.DenseTeacher, "run", lambda *a: pytest.fail("a live teacher ran"))
    config = PruneConfig(ratio=0.5, steps=6, prune_freq=2, seq_len=16, batch_size=2, distill=1.0, distill_top_k=5)
    pruned, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS * 5, config, progress=False)
    assert report["config"]["shrink"] == "progressive" and report["train_windows"] == 6 * 2
    parameters = report["history"]["parameters"]
    assert parameters[0] > parameters[3] > parameters[-1]  # smaller after each pruning step (3 and 5)
    assert all(torch.isfinite(torch.tensor(report["history"]["loss"])))


def test_alpha_one_with_the_student_equal_to_the_teacher_has_zero_loss_and_gradient(tiny_tokenizer):
    """Before any pruning and with LoRA's B = 0 (peft's initialisation) the student is the dense model:
    the distillation loss and every LoRA gradient are 0 (a loss that mixed in anything else, or a
    teacher that was not the dense model, would not be)."""
    from loraprune.pruning import training_loss

    model = tiny_model("llama-gqa")
    config = PruneConfig(distill=1.0, distill_temperature=2.0, distill_teacher="model", criterion="lora")
    peft_model = attach_lora(model, arch_for(model.config), config)
    pruner = Pruner(peft_model.get_base_model(), arch_for(model.config), config)
    peft_model.train()
    batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = training_loss(TASKS["causal-lm"], peft_model, pruner, config)(peft_model, batch)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    grads = [p.grad for name, p in peft_model.named_parameters() if "lora_" in name]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-6


def test_the_logged_distillation_loss_is_the_kl_of_the_whole_logits(tiny_tokenizer, monkeypatch):
    """At step 5 of a pruning run (after the pruning step 3, LoRA trained), the loss logged with
    alpha = 1 equals T²·KL(dense ‖ pruned) computed from both models' whole logits on that batch."""
    from loraprune import pruning

    whole = {}
    made = pruning.training_loss

    def training_loss(task, peft_model, pruner, config):
        loss_fn, teacher, calls = (
            made(task, peft_model, pruner, config),
            DenseTeacher(peft_model, task.forward, pruner),
            [],
        )

        def loss(model, batch):
            calls.append(1)
            if len(calls) == 5:
                with torch.no_grad():
                    student = task.forward(model, batch).logits
                    whole["kl"] = distillation_loss(student, teacher(batch).logits, config.distill_temperature).item()
            return loss_fn(model, batch)

        return loss

    monkeypatch.setattr(pruning, "training_loss", training_loss)
    config = PruneConfig(ratio=0.5, steps=6, prune_freq=2, seq_len=16, batch_size=2, distill=1.0, lora_dropout=0,
                         distill_top_k=0, distill_temperature=2.0, distill_teacher="model", lr=1e-2)  # fmt: skip
    _, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, CORPUS, config, progress=False)
    assert report["history"]["pruning_steps"] == [3, 5]
    assert whole["kl"] > 1e-3  # the pruned, trained student is not the teacher
    # to float32 rounding of the per-position sums (the chunked loss is not formed as the same differences)
    assert report["history"]["loss"][4] == pytest.approx(whole["kl"], abs=2e-6)


def test_distill_is_refused_for_the_embedding_task(tiny_tokenizer):
    config = PruneConfig(distill=0.5, seq_len=16)
    with pytest.raises(LoraPruneError, match="--distill applies to tasks with logits"):
        prune(tiny_encoder("bert"), tiny_tokenizer, ["the cat sat"] * 8, config, progress=False)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distill", "1.5"], r"--distill must be in \[0, 1\]"),
        (["--distill-temperature", "0"], "--distill-temperature must be a positive number"),
        (["--distill-teacher", "float8"], "--distill-teacher.*invalid choice"),
        (["--min-keep", "1"], r"--min-keep must be in \(0, 1\)"),
        (["--distill", "0", "--distill-top-k", "8"], "--distill-top-k sets how --distill reads the dense model"),
        (["--distill", "1", "--distill-top-k", "-1"], "--distill-top-k must be 0"),
        (["--distill", "1", "--distill-top-k", "100000"], r"--distill-top-k must be in \[1, 64\]"),
        (["--allocation", "global", "--uniform"], "cannot be combined with --uniform"),
        (["--allocation", "global", "--ratio", "0.95"], "lower --min-keep"),
    ],
)
def test_bad_distill_and_allocation_flags(tmp_path, capsys, tiny_folder, text_file, flags, message):
    out = tmp_path / "out"
    argv = ["prune", "--model", tiny_folder, "--data", text_file, "--output", out, "--steps", "6", *flags]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("loraprune: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_the_default_recipe_distils_causal_lms_from_their_top_256_and_leaves_other_tasks_alone():
    """No recipe flags: a causal LM is distilled (0.9) from the dense model's top 256 tokens (fewer when
    the vocabulary is smaller) and shrinks as it trains; --distill 0 is the paper's task loss alone, and
    the embedding task, which trains against the dense model already, is not distilled."""
    from loraprune.plan import check_compatible

    lm = copy.deepcopy(tiny_model("llama-gqa").config)
    small = check_compatible(lm, PruneConfig(seq_len=16)).config
    assert (small.distill, small.distill_top_k, small.shrink) == (0.9, lm.vocab_size, "progressive")
    lm.vocab_size = 1000
    default = check_compatible(lm, PruneConfig(seq_len=16)).config
    assert (default.distill, default.distill_top_k, default.shrink) == (0.9, 256, "progressive")
    paper = check_compatible(lm, PruneConfig(seq_len=16, distill=0)).config
    assert (paper.distill, paper.distill_top_k, paper.shrink) == (0, 0, "progressive")
    whole = check_compatible(lm, PruneConfig(seq_len=16, distill=0.5, distill_top_k=0)).config
    assert (whole.distill, whole.distill_top_k, whole.shrink) == (0.5, 0, "end")
    bert = check_compatible(tiny_encoder("bert").config, PruneConfig(seq_len=16)).config
    assert (bert.distill, bert.distill_top_k) == (0, 0)
