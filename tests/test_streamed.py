"""streamed.py: backward hooks sum the true gradient's group scores without dL/dW0, and the criterion prunes."""

import pytest
import torch

from loraprune import PruneConfig, prune
from loraprune.archs import arch_for
from loraprune.errors import LoraPruneError
from loraprune.pipeline import scoring
from loraprune.pipeline.groups import summed_dim
from loraprune.pipeline.lora import attach_lora
from loraprune.pipeline.pruner import Pruner
from loraprune.pipeline.schedule import SparsitySchedule
from loraprune.pipeline.scoring import projection_scores, read_factors
from loraprune.pipeline.train import set_activation_checkpointing
from loraprune.plan import check_compatible
from loraprune.tasks.causal_lm import causal_lm_loss
from loraprune.tasks.embedding import embed, embedding_loss
from loraprune.tools.estimate import saved_bytes
from tiny import ENCODERS, randomize_lora, tiny_config, tiny_encoder, tiny_inputs, tiny_model

TOLERANCE = 5e-3  # relative: the kept inputs and dL/dy are rounded to bfloat16 (the largest error seen: 2-5e-3)


def _setup(family: str = "llama-gqa", checkpointing: bool = False, square: bool = False):
    model = tiny_encoder(family, seed=3) if family in ENCODERS else tiny_model(family, seed=3)
    if checkpointing:
        set_activation_checkpointing(model, True)
    arch = arch_for(model.config)
    aggregation = "square" if square else "sum"
    config = PruneConfig(criterion="streamed", lora_r=4, lora_dropout=0.1, skip_layers="none", aggregation=aggregation)
    peft_model = attach_lora(model, arch, config)
    randomize_lora(peft_model)  # B != 0: the merged weight differs from W0
    pruner = Pruner(peft_model.get_base_model(), arch, config)
    peft_model.train()
    return peft_model, pruner


def _batches(n: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


def _loss(peft_model, batch):
    """The task's training loss: next-token for decoders, 1 - cosine to a teacher (BERT), cross-entropy (ViT)."""
    if not isinstance(batch, dict):
        return causal_lm_loss(peft_model, batch)
    if "pixel_values" in batch:
        return peft_model(**batch).loss
    return embedding_loss(embed(peft_model, batch), batch)


def _encoder_batches(family: str, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(n):
        inputs = tiny_inputs(family, g)
        if family == "vit":
            inputs["labels"] = torch.randint(0, 10, (2,), generator=g)
        else:
            inputs["teacher"] = torch.randn(2, 32, generator=g)
        batches.append(inputs)
    return batches


def _true_scores(pruner, peft_model, batches, square: bool) -> dict:
    """Per projection, the sum over micro-batches of |dL/dW0 ⊙ (W0 + s·B·A)| summed per group, with
    dL/dW0 from autograd: the same dropout draws as the hooks saw (the seed is reset)."""
    projections = {(i, role): m for i in pruner.prunable for role, m in pruner.projections(i).items()}
    for m in projections.values():
        m.base_layer.weight.requires_grad_(True)
    totals = dict.fromkeys(projections, 0.0)
    torch.manual_seed(0)
    for batch in batches:
        _loss(peft_model, batch).backward()
        for (i, role), m in projections.items():
            f = read_factors(m, slice(None), lora_grads=False)
            element = (m.base_layer.weight.grad * (f.weight + f.scaling * f.B @ f.A)).abs()
            totals[(i, role)] = totals[(i, role)] + (element.square() if square else element).sum(summed_dim(role))
            m.base_layer.weight.grad = None
    return totals


@pytest.mark.parametrize(
    "family,checkpointing,square",
    [
        ("llama-gqa", False, False),
        ("llama-gqa", True, False),
        ("llama-gqa", False, True),
        ("qwen2-gqa", False, False),
        ("phi3-gqa", False, False),
        ("bert", False, False),
        ("vit", False, False),
    ],
)
def test_the_hooks_sum_the_true_gradient_score(family, checkpointing, square, monkeypatch):
    """Two micro-batches (accumulated), LoRA dropout on, a head masked, blocks of 5 rows or fewer (so
    every projection is scored in several blocks that do not align with heads): each projection's
    streamed sums equal the true gradient's, to the bfloat16 rounding of the kept inputs."""
    hidden = 32 if family in ENCODERS else tiny_config(family).hidden_size
    monkeypatch.setattr(scoring, "SCORE_BLOCK_BYTES", 5 * hidden * 4)  # 5 float32 rows of a hidden-wide input
    peft_model, pruner = _setup(family, checkpointing, square)
    for i in pruner.prunable:
        for module in pruner.projections(i).values():
            assert module.out_features > 2 * scoring.score_block_rows(module.in_features, torch.float32)
    pruner.head_alive[1, 2] = False
    pruner.head_masks[1].copy_(pruner.head_alive[1].repeat_interleave(pruner.groups.head_dim))
    batches = _encoder_batches(family, 2) if family in ENCODERS else _batches(2)
    expected = _true_scores(pruner, peft_model, batches, square)  # dL/dW0 from autograd, batch by batch
    pruner.criterion.next_step()
    torch.manual_seed(0)
    for batch in batches:
        _loss(peft_model, batch).backward()
    for (i, role), want in expected.items():
        module = pruner.projections(i)[role]
        got = projection_scores(module, pruner.criterion, summed_dim(role), square=square)
        torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE * want.abs().max().item())
    head_dim = pruner.groups.head_dim  # the masked head's o columns got no gradient
    o = projection_scores(pruner.projections(1)["o"], pruner.criterion, 0, square=square)
    assert o[2 * head_dim : 3 * head_dim].abs().max() == 0


def test_sums_reset_each_step_and_nothing_is_kept_outside_training():
    peft_model, pruner = _setup()
    module = pruner.projections(0)["q"]
    with torch.no_grad():  # evaluation (and the distillation teacher) keeps and scores nothing
        peft_model(input_ids=_batches(1)[0])
    assert pruner.criterion.streams[module].sums is None
    causal_lm_loss(peft_model, _batches(1)[0]).backward()
    assert pruner.update_scores()
    assert pruner.criterion.streams[module].sums is None  # reset for the next step
    assert pruner.head_score.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no streamed scores"):
        projection_scores(module, pruner.criterion, 1)
    causal_lm_loss(peft_model, _batches(1)[0]).backward()
    with pytest.raises(ValueError, match="summed over dim 1"):
        projection_scores(module, pruner.criterion, 0)
    pruner.close()
    assert not any(hasattr(m, "loraprune_streamed_score") for m in peft_model.modules())


def test_the_kept_inputs_are_counted_once_per_input_in_bfloat16():
    """The trace of memory.py sees the kept inputs as saved tensors: per layer the attention input
    (read by q, k and v), the MLP input (gate and up), o's and down's inputs, two bytes each."""
    config = tiny_config("llama-gqa")
    batch, seq = 2, 16
    extra = saved_bytes(config, batch, seq, "streamed") - saved_bytes(config, batch, seq, "lora")
    width = 3 * config.hidden_size + config.intermediate_size  # o reads heads x head_dim = hidden here
    assert extra == config.num_hidden_layers * batch * seq * width * 2


def test_prune_with_the_streamed_criterion(tiny_tokenizer):
    corpus = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)
    for shrink in ("progressive", "end"):
        config = PruneConfig(ratio=0.5, steps=8, prune_freq=2, seq_len=16, batch_size=2, criterion="streamed",
                             shrink=shrink)  # fmt: skip
        pruned, report = prune(tiny_model("llama-gqa"), tiny_tokenizer, corpus, config, progress=False)
        assert report["score_updates"] == SparsitySchedule.of(config).end and report["removed"]["heads"] == 0.5
        assert not any(hasattr(m, "loraprune_streamed_score") for m in pruned.modules())


def test_streamed_is_the_default_and_lora_under_fsdp():
    model_config = tiny_config("llama-gqa")
    assert PruneConfig().criterion is None  # undecided until the run's setting is known
    assert check_compatible(model_config, PruneConfig()).config.criterion == "streamed"
    assert check_compatible(model_config, PruneConfig(fsdp=True)).config.criterion == "lora"
    assert check_compatible(model_config, PruneConfig(criterion="sketch", fsdp=True)).config.criterion == "sketch"
    with pytest.raises(ValueError, match="criterion is undecided"):
        Pruner(tiny_model("llama-gqa"), arch_for(model_config), PruneConfig())


def test_fsdp_is_refused():
    with pytest.raises(LoraPruneError, match="--criterion streamed cannot be combined with --fsdp"):
        check_compatible(tiny_config("llama-gqa"), PruneConfig(criterion="streamed", fsdp=True))


@pytest.mark.parametrize("criterion", ["streamed", "gradient", "sketch"])
def test_no_scoring_work_after_the_last_pruning_step(tiny_tokenizer, monkeypatch, criterion):
    """One-shot pruning at step 4 of 20: the criterion collects (streamed: block products in backward;
    sketch: its projections; gradient: dL/dW0 of the base weights) in steps 1-4 and never after."""
    from loraprune.pipeline.sketch import GradientSketch
    from loraprune.pipeline.streamed import StreamedScore

    model = tiny_model("llama-gqa")
    forwards, collected = [0], []  # training forwards so far; the forward of each collection

    def count_forward(module, args, output):
        forwards[0] += 1
        if any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name):
            collected.append(forwards[0])  # the base weights would get a gradient in this backward

    model.get_input_embeddings().register_forward_hook(count_forward)
    for cls, name in ((StreamedScore, "add"), (GradientSketch, "_accumulate")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _f=original: collected.append(forwards[0]) or _f(self, *a))
    # the task loss alone: the top-k teacher's forwards would count as collections
    config = PruneConfig(ratio=0.5, steps=20, prune_freq=2, seq_len=16, batch_size=2, criterion=criterion,
                         schedule="oneshot", skip_layers="none", distill=0)  # fmt: skip
    corpus = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)
    _, report = prune(model, tiny_tokenizer, corpus, config, progress=False)
    last = SparsitySchedule.of(config).end
    assert report["history"]["pruning_steps"] == [last] == [4]
    assert sorted(set(collected)) == list(range(1, last + 1))  # every scoring step, and none after
    assert report["score_updates"] == last


@pytest.mark.parametrize("criterion", ["streamed", "gradient"])
def test_resume_into_the_cooldown_scores_nothing_and_ends_alike(tiny_tokenizer, tmp_path, monkeypatch, criterion):
    """A run resumed after its last pruning step attaches no scoring work (the hooks are dropped before
    its first step) and ends with the uninterrupted run's weights, masks and scores."""
    import shutil

    from loraprune.pipeline.streamed import StreamedScore
    from loraprune.runtime.checkpoint import Checkpointer, latest

    config = PruneConfig(ratio=0.5, steps=10, prune_freq=2, seq_len=16, batch_size=2, criterion=criterion,
                         schedule="oneshot", skip_layers="none", shrink="end", distill=0)  # fmt: skip
    corpus = " ".join(["the cat sat on a mat and the dog ran to the park"] * 40)
    checkpointer = Checkpointer(tmp_path / "run", {"model": "tiny"}, every=6)
    whole, whole_report = prune(tiny_model("llama-gqa"), tiny_tokenizer, corpus, config, False, checkpointer)
    shutil.rmtree(tmp_path / "run" / "step-000010")  # resume from step 6, in the cooldown (pruned at step 4)
    resume = latest(tmp_path / "run")
    assert resume.step == 6
    adds, base_grads = [], []
    monkeypatch.setattr(StreamedScore, "add", lambda self, *a: adds.append(1))
    model = tiny_model("llama-gqa")
    model.get_input_embeddings().register_forward_hook(
        lambda m, a, o: base_grads.append(any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n))
    )
    resumed, report = prune(model, tiny_tokenizer, corpus, config, False, resume=resume)
    assert adds == [] and not any(base_grads) and len(base_grads) == 4
    assert report["history"]["loss"] == whole_report["history"]["loss"]
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key in ("head_score", "channel_score", "head_alive", "channel_alive"):
        assert torch.equal(report["scores"][key], whole_report["scores"][key]), key
