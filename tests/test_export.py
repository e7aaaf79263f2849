import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraprune.errors import LoraPruneError
from loraprune.pipeline.export import MODELING_FILE, REPORT_FILE, save_pruned
from loraprune.pipeline.load import load_model
from loraprune.pipeline.modeling_pruned import LAYOUT_KEY
from tiny import FAMILIES, masked_then_pruned, tiny_inputs, tiny_model

# Runs in a fresh interpreter where `import loraprune` fails, as on a machine without it.
STOCK_LOAD = """
import sys
sys.modules["loraprune"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
remote = sys.argv[1] == "remote"
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote)
    tokens = load_file(folder + "/../tokens.safetensors")["tokens"]
    with torch.no_grad():
        save_file({"logits": model(input_ids=tokens).logits}, folder + "/../logits.safetensors")
"""


def stock_logits(folder, tokens, remote: bool) -> torch.Tensor:
    return stock_logits_of([folder], tokens, remote)[0]


def stock_logits_of(folders, tokens, remote: bool) -> list[torch.Tensor]:
    """Logits of each folder loaded by stock transformers, all in one fresh interpreter."""
    for folder in folders:
        save_file({"tokens": tokens}, str(folder.parent / "tokens.safetensors"))
    args = [sys.executable, "-c", STOCK_LOAD, "remote" if remote else "stock", *map(str, folders)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(str(folder.parent / "logits.safetensors"))["logits"] for folder in folders]


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


def test_uniform_folders_load_with_stock_transformers(tmp_path, tiny_tokenizer):
    """Every family, with and without GQA (qwen2: q/k/v biases): the stock config, no remote code."""
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    folders, expected = [], []
    for family in FAMILIES:
        _, _, model, _ = masked_then_pruned(family, ratio=0.5, uniform=True)
        folder = save_pruned(model, tiny_tokenizer, tmp_path / family / "out", {})
        assert not (folder / MODELING_FILE).exists()
        config = json.loads((folder / "config.json").read_text())
        assert "auto_map" not in config and LAYOUT_KEY not in config
        assert config["num_attention_heads"] < FAMILIES[family][1] and config["intermediate_size"] == 20
        folders.append(folder)
        with torch.no_grad():
            expected.append(model(input_ids=tokens).logits)
    for family, logits, reference in zip(
        FAMILIES, stock_logits_of(folders, tokens, remote=False), expected, strict=True
    ):
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5, msg=family)


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


def decoding_agrees_with_recompute(model, prompt, new_tokens: int, **generate_options) -> torch.Tensor:
    """Greedy decoding through a KV cache: every step's logits must equal those of one forward pass
    over the whole sequence without a cache. Returns the generated sequence."""
    out = model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True, **generate_options,
    )  # fmt: skip
    with torch.no_grad():
        full = model(input_ids=out.sequences, use_cache=False).logits
    assert len(out.logits) == new_tokens
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, prompt.shape[1] - 1 + step], rtol=1e-4, atol=1e-5)
    return out.sequences


def per_layer_folder(tmp_path, tokenizer, family: str, ratio: float, **options):
    """A pruned model whose layers all differ from the dense one, saved; (in-memory model, pruner, folder)."""
    _, _, model, pruner = masked_then_pruned(family, ratio=ratio, uniform=False, skip_layers="none", **options)
    return model, pruner, save_pruned(model, tokenizer, tmp_path / "out", {})


@pytest.mark.parametrize(("family", "ratio", "heads"), [("llama-gqa", 0.5, 3), ("llama-mha", 0.25, 4)])
def test_per_layer_config_holds_the_largest_kept_sizes(tmp_path, tiny_tokenizer, family, ratio, heads):
    """config.json's own size fields are the largest any layer keeps, not the dense ones: llama-mha
    keeps 3 of 4 heads everywhere, but LlamaConfig wants a head count dividing hidden_size 32, so 4.
    Each MLP's intermediate_size follows its layer (stale at the dense width before)."""
    model, pruner, folder = per_layer_folder(tmp_path, tiny_tokenizer, family, ratio)
    config = json.loads((folder / "config.json").read_text())
    layout = config[LAYOUT_KEY]["layers"]
    assert config["num_attention_heads"] == heads and config["head_dim"] == 8
    assert config["num_key_value_heads"] == max(shape["kv_heads"] for shape in layout)
    assert config["intermediate_size"] == max(shape["intermediate_size"] for shape in layout) < 40
    reloaded, _ = load_model(str(folder))
    for layers in (model.model.layers, reloaded.model.layers):
        assert [layer.mlp.intermediate_size for layer in layers] == [layer.mlp.up_proj.out_features for layer in layers]
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_static_cache_generation_matches_dynamic_cache_and_recompute(tmp_path, tiny_tokenizer):
    """A reloaded per-layer model (k/v heads differing by layer, unevenly shared): a static KV cache,
    allocated lazily or up front (prefill in chunks), decodes like the dynamic cache and like a full
    forward pass."""
    model, pruner, folder = per_layer_folder(tmp_path, tiny_tokenizer, "llama-gqa", 0.5)
    layout = getattr(model.config, LAYOUT_KEY)["layers"]
    assert len({shape["kv_heads"] for shape in layout}) > 1  # layers differ in their k/v heads
    reloaded, _ = load_model(str(folder))
    assert any(hasattr(layer.self_attn, "kv_index") for layer in reloaded.model.layers)  # uneven sharing
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    dynamic = decoding_agrees_with_recompute(reloaded, prompt, 8)
    assert torch.equal(decoding_agrees_with_recompute(reloaded, prompt, 8, cache_implementation="static"), dynamic)
    chunked = decoding_agrees_with_recompute(reloaded, prompt, 8, cache_implementation="static", prefill_chunk_size=4)
    assert torch.equal(chunked, dynamic)


def test_sliding_window_beyond_the_window_in_the_uneven_gqa_path(tmp_path, tiny_tokenizer):
    """mistral with a 4-token sliding window, 16-token inputs, layers whose query heads share k/v
    heads unevenly (modeling_pruned's gathering path): masked = pruned, the window does change the
    result, and decoding past the window (dynamic and static caches) agrees with recompute."""
    model = tiny_model("mistral-gqa", sliding_window=4)
    head_score = torch.tensor([[1.0] * 6, [5, 1, 1, 1, 5, 5], [5, 5, 1, 1, 1, 5]])  # keep 0,4,5 and 0,1,5
    masked, pruned, model, _ = masked_then_pruned("mistral-gqa", 0.5, False, model=model, head_score=head_score)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
    assert [getattr(layer.self_attn, "kv_index", None) for layer in model.model.layers] == [None, [0, 1, 1], [0, 0, 1]]
    inputs = tiny_inputs("mistral-gqa", torch.Generator().manual_seed(0))
    assert inputs["input_ids"].shape[1] > 4
    model.config.sliding_window = None  # the whole past: another function
    with torch.no_grad():
        unwindowed = model(**inputs).logits
    model.config.sliding_window = 4
    with torch.no_grad():
        windowed = model(**inputs).logits
    assert (windowed - unwindowed).abs().max() > 1e-3
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    dynamic = decoding_agrees_with_recompute(model, prompt, 10)
    assert torch.equal(decoding_agrees_with_recompute(model, prompt, 10, cache_implementation="static"), dynamic)
    folder = save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    reloaded, _ = load_model(str(folder))
    assert reloaded.config.sliding_window == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, windowed)


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
