"""The modern decoder families (issue 15): Qwen3, Gemma 2, Gemma 3 (text), Phi-3 (fused qkv and
gate_up), and a llama with its own head_dim and Llama 3.1-style rope scaling. For each: masked ≡
pruned with a whole k/v group removed, reload where loraprune cannot be imported (per-layer: the
bundled remote code; uniform: stock transformers), and cached generation ≡ full recompute with
prompts longer than the sliding window. The shared parametrized tests (test_shrink.py) also run them.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraprune.archs import arch_for
from loraprune.errors import LoraPruneError
from loraprune.pipeline.export import MODELING_FILE, save_pruned
from loraprune.pipeline.modeling_pruned import LAYOUT_KEY, is_grouped_evenly
from tiny import masked_then_pruned, tiny_config

MODERN = ["llama-head-dim", "qwen3-gqa", "gemma2-gqa", "gemma3-gqa", "phi3-gqa"]

# Loads the per-layer folder with its remote code and the uniform one stock, in a fresh interpreter
# where `import loraprune` fails, as on a machine without it.
RELOAD = """
import sys
sys.modules["loraprune"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
root = sys.argv[1]
tokens = load_file(root + "/tokens.safetensors")["tokens"]
logits = {}
for name, remote in (("per-layer", True), ("uniform", False)):
    model = AutoModelForCausalLM.from_pretrained(root + "/" + name, trust_remote_code=remote)
    with torch.no_grad():
        logits[name] = model(input_ids=tokens).logits
save_file(logits, root + "/logits.safetensors")
"""


def prompt_tokens(length: int = 10) -> torch.Tensor:
    return torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", MODERN)
def test_modern_family_prunes_reloads_and_generates(tmp_path, tiny_tokenizer, family):
    per_layer = masked_then_pruned(family, ratio=0.5, uniform=False, drop_kv_group=True)
    uniform = masked_then_pruned(family, ratio=0.5, uniform=True)
    models = {}
    for name, (masked, pruned, model, _) in (("per-layer", per_layer), ("uniform", uniform)):
        torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
        models[name] = model

    # per-layer: the first pruned layer lost k/v head 0 with its 3 query heads, another layer shares unevenly
    layout = getattr(models["per-layer"].config, LAYOUT_KEY)["layers"]
    assert layout[1]["kv_heads"] == 1 and layout[1]["kv_index"] == [0, 0, 0]
    assert not is_grouped_evenly(layout[2]["kv_index"], layout[2]["kv_heads"])
    # uniform: the family's own config fields (6 heads in 2 k/v groups: 1 head of each kept)
    config = models["uniform"].config
    assert not hasattr(config, LAYOUT_KEY)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 2, 20)

    tokens = prompt_tokens()
    expected = {}
    for name, model in models.items():
        save_pruned(model, tiny_tokenizer, tmp_path / name, {})
        with torch.no_grad():
            expected[name] = model(input_ids=tokens).logits
    assert (tmp_path / "per-layer" / MODELING_FILE).exists() and not (tmp_path / "uniform" / MODELING_FILE).exists()
    dense = tiny_config(family).to_dict()
    for name in models:  # everything but the pruned sizes is carried over unchanged (rope scaling, windows, ...)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        for key in ("rope_parameters", "sliding_window", "layer_types", "head_dim", "attn_logit_softcapping"):
            if key in dense:  # (Phi3Config has no head_dim field: the pruned config states it, 8)
                assert saved[key] == dense[key], key

    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = load_file(str(tmp_path / "logits.safetensors"))
    for name in models:
        torch.testing.assert_close(reloaded[name], expected[name], atol=1e-5, rtol=1e-5)

    for model in models.values():
        assert_cached_generation_matches_recompute(model)


def assert_cached_generation_matches_recompute(model, new_tokens: int = 6) -> None:
    """Greedy decoding with the KV cache (sliding-window layers included: the prompt is longer than
    the window of 4) gives the logits of a full forward over the final sequence, token by token."""
    prompt = prompt_tokens(7)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full = model(input_ids=out.sequences, use_cache=False).logits
    cached = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(cached, full[:, prompt.shape[1] - 1 : -1], atol=1e-4, rtol=1e-4)


def test_whole_width_qk_norm_is_refused():
    from transformers import Olmo2Config

    with pytest.raises(LoraPruneError, match="cannot prune 'olmo2' models: its q/k RMSNorm normalises over all heads"):
        arch_for(Olmo2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=40))
