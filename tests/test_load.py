import json
import os

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from loraprune.errors import LoraPruneError
from loraprune.pipeline import load
from loraprune.pipeline.load import EMBEDDED, context_length, embedded_path, load_model


@pytest.fixture
def tiny_folder(tmp_path, tiny_tokenizer):
    """A saved tiny Llama + tokenizer; returns (folder, model)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder, model


def test_offline_by_default():
    assert "HF_HUB_OFFLINE" in os.environ


def test_folder_round_trip(tiny_folder):
    folder, original = tiny_folder
    model, tokenizer = load_model(str(folder))
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # no pad token saved: pad = eos
    ids = tokenizer("the cat sat on a mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert load_model(str(folder), dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_auto_map_turns_on_remote_code(tiny_folder, monkeypatch):
    folder, _ = tiny_folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    seen = []
    real = load.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(path, **{**kwargs, "trust_remote_code": False})

    monkeypatch.setattr(load.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(folder))
    assert seen == [True]


def test_missing_path():
    with pytest.raises(LoraPruneError, match="model 'nope' not found: give 'smollm2', a .gguf file or a local"):
        load_model("nope")


def test_hub_id_is_refused_offline():
    with pytest.raises(LoraPruneError, match="looks like a Hugging Face hub id.*works offline: download it"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_folder_without_config(tmp_path):
    with pytest.raises(LoraPruneError, match="has no config.json: not a Hugging Face model folder"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer(tiny_folder):
    folder, _ = tiny_folder
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(LoraPruneError, match="has no tokenizer .*save the model's tokenizer into it"):
        load_model(str(folder))


def test_broken_tokenizer(tiny_folder):
    folder, _ = tiny_folder
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(LoraPruneError, match="could not load the tokenizer in"):
        load_model(str(folder))


def test_truncated_weights(tiny_folder):
    folder, _ = tiny_folder
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(500)
    with pytest.raises(LoraPruneError, match="could not load the model in .*corrupt or truncated file"):
        load_model(str(folder))


def test_truncated_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(embedded_path(), "rb") as src:
        path.write_bytes(src.read(1 << 20))  # first MiB of the real file
    with pytest.raises(LoraPruneError, match=r"could not load .*cut\.gguf \(corrupt or truncated file\?\)"):
        load_model(str(path))


def test_other_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(LoraPruneError, match="is neither a .gguf file nor a model folder"):
        load_model(str(path))


def test_context_length():
    assert context_length(LlamaConfig(max_position_embeddings=256)) == 256
    assert context_length(GPT2Config(n_positions=512)) == 512
    assert context_length(PretrainedConfig()) == 2048


@pytest.mark.slow
def test_embedded_smollm2(tmp_path):
    model, tokenizer = load_model(EMBEDDED)  # ~17 s
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert getattr(config, "quantization_config", None) is None
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
