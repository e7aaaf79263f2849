import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraprune.errors import LoraPruneError
from loraprune.pipeline.export import MODELING_FILE, save_pruned
from loraprune.pipeline.load import load_model
from loraprune.tools.report import REPORT_FILE
from tiny import masked_then_pruned

# Runs in a fresh interpreter where `import loraprune` fails, as on a machine without it.
STOCK_LOAD = """
import sys
sys.modules["loraprune"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder, remote = sys.argv[1], sys.argv[2] == "remote"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote)
tokens = load_file(folder + "/../tokens.safetensors")["tokens"]
with torch.no_grad():
    save_file({"logits": model(input_ids=tokens).logits}, folder + "/../logits.safetensors")
"""


def stock_logits(folder, tokens, remote: bool) -> torch.Tensor:
    save_file({"tokens": tokens}, str(folder.parent / "tokens.safetensors"))
    args = [sys.executable, "-c", STOCK_LOAD, str(folder), "remote" if remote else "stock"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(folder.parent / "logits.safetensors"))["logits"]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-gqa"])
def test_per_layer_folder_loads_with_remote_code_only(tmp_path, tiny_tokenizer, family):
    _, _, model, _ = masked_then_pruned(family, ratio=0.5, uniform=False)
    folder = save_pruned(model, tiny_tokenizer, tmp_path / "out", {"ratio": 0.5})
    assert (folder / MODELING_FILE).exists() and (folder / "model.safetensors").exists()
    assert json.loads((folder / REPORT_FILE).read_text()) == {"ratio": 0.5}
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    torch.testing.assert_close(stock_logits(folder, tokens, remote=True), expected, atol=1e-5, rtol=1e-5)
    reloaded, _ = load_model(str(folder))  # loraprune's own loader
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_uniform_folder_loads_with_stock_transformers(tmp_path, tiny_tokenizer):
    _, _, model, _ = masked_then_pruned("llama-gqa", ratio=0.5, uniform=True)
    folder = save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    assert not (folder / MODELING_FILE).exists()
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    torch.testing.assert_close(stock_logits(folder, tokens, remote=False), expected, atol=1e-5, rtol=1e-5)


def test_generation_with_cache_matches_full_forward(tiny_tokenizer):
    """Uneven k/v sharing goes through the KV cache: incremental decoding must agree."""
    _, _, model, _ = masked_then_pruned("llama-gqa", ratio=0.5, uniform=False)
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens = prompt
    for _ in range(8):  # no cache: recompute everything each step
        with torch.no_grad():
            next_token = model(input_ids=tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(out, tokens)


def test_output_folder_rules(tmp_path, tiny_tokenizer):
    _, _, model, _ = masked_then_pruned("llama-mha", ratio=0.5, uniform=False)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(LoraPruneError, match="exists and is not empty; pass --overwrite"):
        save_pruned(model, tiny_tokenizer, occupied, {})
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    save_pruned(model, tiny_tokenizer, occupied, {}, overwrite=True)
    assert not (occupied / "keep.txt").exists() and (occupied / REPORT_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]  # no staging folder left behind


def test_failed_save_leaves_nothing(tmp_path, tiny_tokenizer):
    _, _, model, _ = masked_then_pruned("llama-mha", ratio=0.5, uniform=False)
    with pytest.raises(TypeError):
        save_pruned(model, tiny_tokenizer, tmp_path / "out", {"not json": object()})
    assert list(tmp_path.iterdir()) == []
