"""GGUF export (gguf_export.py), checked by reading the file back: with transformers' own GGUF
loader (layers of one shape), with loraprune.load_model (per-layer shapes, llama.cpp's deci) and
against the shapes llama.cpp's loader accepts (llamacpp_rules.py). No llama.cpp needed;
`make llamacpp-check` runs the files in llama.cpp itself."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llamacpp_rules import load_errors
from loraprune.cli import main
from loraprune.errors import LoraPruneError
from loraprune.pipeline import gguf_export
from loraprune.pipeline.export import save_pruned
from loraprune.pipeline.gguf_export import even_groups, export_gguf, permute_rope
from loraprune.pipeline.gguf_read import unpermute_rope
from loraprune.pipeline.load import load_config, load_model
from tiny import masked_then_pruned, tiny_encoder, tiny_model
from tiny_gguf import bpe_tokenizer

TEXT = "the cat sat on the mat, then it ate."


def logits(model, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens).logits


def saved(tmp_path, model, name: str = "model"):
    return save_pruned(model, bpe_tokenizer(), tmp_path / name, {})


def hf_gguf(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha", "mistral-gqa"])
def test_dense_llama_round_trips_through_transformers(tmp_path, family):
    model = tiny_model(family)
    result = export_gguf(saved(tmp_path, model), tmp_path / "m.gguf")
    assert result["architecture"] == "llama" and not result["per_layer"]
    assert load_errors(tmp_path / "m.gguf") == []
    (tmp_path / "plain").write_text("")  # permissions as any new file (not mkstemp's 0600)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    loaded, tokenizer = hf_gguf(tmp_path / "m.gguf")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)
    assert tokenizer.encode(TEXT) == bpe_tokenizer().encode(TEXT)
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_dense_qwen2_is_written_as_qwen2(tmp_path):
    model = tiny_model("qwen2-gqa")
    assert export_gguf(saved(tmp_path, model), tmp_path / "m.gguf")["architecture"] == "qwen2"
    loaded, _ = hf_gguf(tmp_path / "m.gguf")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


def test_qwen3_of_one_shape_is_written_as_qwen3(tmp_path):
    """Dense and --uniform Qwen3 (per-head q/k norms, head_dim x heads != hidden): llama.cpp's qwen3.
    head_dim 128, Qwen3's: transformers' GGUF loader, which reads the files back, assumes it."""
    model = tiny_model("qwen3-gqa", head_dim=128)
    _, _, pruned, _ = masked_then_pruned("qwen3-gqa", 0.5, uniform=True, model=tiny_model("qwen3-gqa", head_dim=128))
    for name, m in (("dense", model), ("uniform", pruned)):
        path = tmp_path / f"{name}.gguf"
        assert export_gguf(saved(tmp_path, m, name), path)["architecture"] == "qwen3"
        assert load_errors(path) == []
        loaded, _ = hf_gguf(path)
        assert type(loaded).__name__ == "Qwen3ForCausalLM"
        torch.testing.assert_close(logits(loaded), logits(m), rtol=0, atol=1e-5)


def test_gemma3_of_one_shape_is_written_as_gemma3(tmp_path):
    """Dense Gemma 3 and Gemma 3 cut to one shape (heads and channels, hidden size, layers): llama.cpp's
    gemma3, with Gemma's 1 + weight norms written shifted and each layer's sliding-window flag."""
    model = tiny_model("gemma3-gqa", layers=6, layer_types=["sliding_attention", "full_attention"] * 3)
    with torch.no_grad():  # norms that are not the identity
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.uniform_(-0.5, 0.5)
    path = tmp_path / "dense.gguf"
    assert export_gguf(saved(tmp_path, model, "dense"), path)["architecture"] == "gemma3"
    assert load_errors(path) == []
    fields = gguf.GGUFReader(path).fields
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False] * 3
    written = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
    norm = model.model.layers[0].post_attention_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(written["blk.0.post_attention_norm.weight"], norm + 1, rtol=0, atol=1e-7)
    _, _, pruned, _ = masked_then_pruned("gemma3-gqa", 0.5, uniform=True)
    assert export_gguf(saved(tmp_path, pruned, "uniform"), tmp_path / "u.gguf")["architecture"] == "gemma3"
    assert load_errors(tmp_path / "u.gguf") == []


def test_per_layer_qwen3_is_refused_naming_uniform(tmp_path):
    _, _, pruned, _ = masked_then_pruned("qwen3-gqa", 0.5, uniform=False)
    with pytest.raises(LoraPruneError, match="layer 0's shape .*--uniform"):
        export_gguf(saved(tmp_path, pruned), tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


def test_uniform_pruned_llama_loads_in_stock_transformers(tmp_path):
    _, _, pruned, _ = masked_then_pruned("llama-gqa", 0.5, uniform=True)
    result = export_gguf(saved(tmp_path, pruned), tmp_path / "m.gguf")
    assert result["architecture"] == "llama"
    assert {(s["heads"], s["kv_heads"]) for s in result["layers"]} == {(2, 2)}
    assert load_errors(tmp_path / "m.gguf") == []
    loaded, _ = hf_gguf(tmp_path / "m.gguf")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded), logits(pruned), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha", "mistral-gqa", "qwen2-gqa"])
def test_per_layer_shapes_are_written_as_deci_and_read_back_exactly(tmp_path, family):
    _, _, pruned, _ = masked_then_pruned(family, 0.5, uniform=False)
    result = export_gguf(saved(tmp_path, pruned), tmp_path / "m.gguf")
    assert result["architecture"] == "deci" and result["per_layer"]
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    heads = fields["deci.attention.head_count"].contents()
    assert heads == [s["heads"] for s in result["layers"]] and len(set(heads)) > 1  # layer 0 is skipped
    assert fields["deci.feed_forward_length"].contents() == [s["channels"] for s in result["layers"]]
    assert load_errors(tmp_path / "m.gguf") == []
    loaded, tokenizer = load_model(str(tmp_path / "m.gguf"))
    torch.testing.assert_close(logits(loaded), logits(pruned), rtol=0, atol=1e-5)
    assert tokenizer.encode(TEXT) == bpe_tokenizer().encode(TEXT)
    layout = load_config(str(tmp_path / "m.gguf")).loraprune_layout  # what `loraprune inspect` reads
    assert [len(layer["kv_index"]) for layer in layout["layers"]] == heads


def test_unevenly_shared_kv_heads_are_repeated_into_even_groups():
    assert even_groups([0, 0, 1, 1]) == [0, 1]
    assert even_groups([0, 0, 0, 1]) == [0, 0, 0, 1]  # 3 + 1 readers: one k/v head per query head
    assert even_groups([0, 0, 1, 1, 1, 1]) == [0, 1, 1]
    assert even_groups([2, 2, 2]) == [2]


def biased_llama():
    return tiny_model("llama-gqa", attention_bias=True)  # q/k/v/o biases


# name -> (family, model maker or None for tiny_model, pruned --uniform or not or None: dense, architecture written)
BIAS_CASES = {
    "qwen2 dense": ("qwen2-gqa", None, None, "qwen2"),
    "qwen2 per-layer": ("qwen2-gqa", None, False, "deci"),
    "qwen2 uniform": ("qwen2-gqa", None, True, "deci"),  # 2 heads x 8 < hidden 48: not qwen2's shape
    "llama biases uniform": ("llama-gqa", biased_llama, True, "llama"),
    "llama biases per-layer": ("llama-gqa", biased_llama, False, "deci"),
}


def bias_case(name: str):
    family, make, uniform, arch = BIAS_CASES[name]
    model = make() if make else tiny_model(family)
    if uniform is not None:
        model = masked_then_pruned(family, 0.5, uniform=uniform, model=model)[2]
    return model, arch


@pytest.mark.parametrize("case", BIAS_CASES)
def test_biases_are_written_in_the_shapes_llamacpp_loads(tmp_path, case):
    model, arch = bias_case(case)
    result = export_gguf(saved(tmp_path, model), tmp_path / "m.gguf")
    assert result["architecture"] == arch
    assert "blk.1.attn_q.bias" in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert load_errors(tmp_path / "m.gguf") == []
    if arch == "deci":
        loaded, _ = load_model(str(tmp_path / "m.gguf"))
        torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)


def test_the_llamacpp_rules_refuse_a_pruned_layer_in_qwen2s_shape(tmp_path, monkeypatch):
    """The rules can fail: llama.cpp's qwen2 sizes q hidden x hidden, which 2 heads of 8 are not."""
    model, _ = bias_case("qwen2 uniform")
    monkeypatch.setattr(gguf_export, "choose_arch", lambda *args: "qwen2")
    export_gguf(saved(tmp_path, model), tmp_path / "m.gguf")
    errors = load_errors(tmp_path / "m.gguf")
    assert "blk.0.attn_q.weight has wrong shape; expected (48, 48), got (48, 16)" in errors
    assert "blk.0.attn_q.bias has wrong shape; expected (48,), got (16,)" in errors


@pytest.mark.parametrize("case", BIAS_CASES)
def test_a_q_bias_older_llamacpp_refuses_is_warned_of(tmp_path, case):
    model, _ = bias_case(case)
    warnings = export_gguf(saved(tmp_path, model), tmp_path / "m.gguf")["warnings"]
    assert any("attn_q.bias" in w and "older" in w for w in warnings) == (case != "qwen2 dense")


def test_uneven_kv_sharing_is_written_with_a_repeated_kv_head(tmp_path):
    """The last layer keeps query heads 2, 4, 5 of 6 over 2 k/v heads: k/v head 0 has 1 reader, k/v
    head 1 has 2. llama.cpp's head h reads k/v head h // (heads / kv_heads), so 3 are written."""
    _, _, pruned, _ = masked_then_pruned("llama-gqa", 0.5, uniform=False, drop_kv_group=True)
    layout = saved(tmp_path, pruned)
    assert load_config(str(layout)).loraprune_layout["layers"][2]["kv_index"] == [0, 1, 1]
    result = export_gguf(layout, tmp_path / "m.gguf")
    assert [(s["heads"], s["kv_heads"]) for s in result["layers"]] == [(6, 2), (3, 1), (3, 3)]
    assert result["repeated_kv_heads"] == 1
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["deci.attention.head_count_kv"].contents() == [2, 1, 3]
    tensors = {t.name: t for t in reader.tensors}
    assert [int(n) for n in tensors["blk.2.attn_k.weight"].shape] == [48, 3 * 8]
    for name in ("blk.2.attn_k.weight", "blk.2.attn_v.weight"):
        heads = torch.from_numpy(tensors[name].data.copy()).reshape(3, 8, 48)
        assert torch.equal(heads[1], heads[2]) and not torch.equal(heads[0], heads[1])  # k/v head 1, twice
    assert load_errors(tmp_path / "m.gguf") == []
    loaded, _ = load_model(str(tmp_path / "m.gguf"))
    torch.testing.assert_close(logits(loaded), logits(pruned), rtol=0, atol=1e-5)


def test_rope_permutation_is_the_converters_and_inverts():
    weight = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    permuted = permute_rope(weight, 2)
    # rows of one head: halves [0..3], [4..7] interleaved into pairs (0, 4), (1, 5), ...
    assert permuted[:8, 0].tolist() == weight[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()
    assert torch.equal(unpermute_rope(permuted, 2), weight)
    bias = torch.arange(16.0)
    assert torch.equal(unpermute_rope(permute_rope(bias, 2), 2), bias)


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_smaller_weight_types_stay_close(tmp_path, outtype):
    _, _, pruned, _ = masked_then_pruned("llama-mha", 0.5, uniform=False)  # hidden 32: Q8_0 blocks fit
    result = export_gguf(saved(tmp_path, pruned), tmp_path / "m.gguf", outtype=outtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert kinds["blk.1.attn_q.weight"] == outtype.upper() and kinds["blk.1.attn_norm.weight"] == "F32"
    loaded, _ = load_model(str(tmp_path / "m.gguf"))
    reference = logits(pruned)
    assert (logits(loaded) - reference).abs().max() <= 0.02 * reference.abs().max()
    assert result["bytes"] < export_gguf(tmp_path / "model", tmp_path / "f32.gguf")["bytes"]


FAKE_QUANTIZE = """#!/bin/sh
# llama-quantize's interface (IN OUT TYPE): copies IN, and says so as llama.cpp does for a fallback tensor
echo "$@" > "$(dirname "$0")/argv"
[ "$3" = Q6_K ] && { echo "main: unknown type" >&2; exit 1; }
cp "$1" "$2"
printf '%s%s\n' "warning: blk.1.ffn_down.weight                  - ncols     40 not divisible by 256 " \
    "(required for type    q4_K) (WARNING: must use F16 due to unusual shape) -> falling back to     f16"
printf '%s%s\n' "warning: blk.2.ffn_down.weight                  - ncols     64 not divisible by 256 " \
    "(required for type    q4_K) -> falling back to    q5_0"
"""


def test_quantized_outtypes_run_llama_quantize_and_report_fallbacks(tmp_path, monkeypatch):
    """llama-quantize (here a stand-in with its interface) gets the f16 file and the type; the tensors
    it writes in a fallback type come back as warnings; its failure is one error and writes nothing.
    The real tool is run by scripts/llamacpp_check.py."""
    from loraprune.pipeline import llamacpp_tools

    folder = saved(tmp_path, tiny_model("llama-gqa"))
    with pytest.raises(LoraPruneError, match="needs llama.cpp's llama-quantize .*make llamacpp"):
        monkeypatch.setenv(llamacpp_tools.TOOLS_ENV, str(tmp_path / "none"))
        export_gguf(folder, tmp_path / "m.gguf", outtype="q4_k_m")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "llama-quantize").write_text(FAKE_QUANTIZE)
    (tools / "llama-quantize").chmod(0o755)
    monkeypatch.setenv(llamacpp_tools.TOOLS_ENV, str(tools))
    result = export_gguf(folder, tmp_path / "m.gguf", outtype="q4_k_m")
    source, out, kind = (tools / "argv").read_text().split()
    assert kind == "Q4_K_M" and not Path(source).exists() and not Path(out).exists()  # temporaries, gone
    assert result["warnings"][-2:] == [
        "llama-quantize wrote 1 tensor(s) as f16, not q4_K (rows in blocks of 256; columns 40), e.g. "
        "blk.1.ffn_down.weight; prune with --multiple-of 256 to give the MLP widths whole blocks",
        "llama-quantize wrote 1 tensor(s) as q5_0, not q4_K (rows in blocks of 256; columns 64), e.g. "
        "blk.2.ffn_down.weight; prune with --multiple-of 256 to give the MLP widths whole blocks",
    ]
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "F16" in kinds  # the stand-in copied the f16 file llama-quantize is given
    with pytest.raises(LoraPruneError, match="llama-quantize failed .*unknown type"):
        export_gguf(folder, tmp_path / "q6.gguf", outtype="q6_k")
    assert not (tmp_path / "q6.gguf").exists() and not list(tmp_path.glob(".*partial*"))


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    folder = saved(tmp_path, tiny_model("llama-gqa"))
    with pytest.raises(LoraPruneError, match="outtype"):
        export_gguf(folder, tmp_path / "m.gguf", outtype="q4_k")
    with pytest.raises(LoraPruneError, match="is a folder"):
        export_gguf(folder, tmp_path)
    bert = tmp_path / "bert"
    tiny_encoder("bert").save_pretrained(bert)
    bpe_tokenizer().save_pretrained(bert)
    with pytest.raises(LoraPruneError, match="not 'bert'"):
        export_gguf(bert, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))
    (tmp_path / "old.gguf").write_text("old")
    with pytest.raises(LoraPruneError, match="--overwrite"):
        export_gguf(folder, tmp_path / "old.gguf")


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    folder = saved(tmp_path, tiny_model("llama-gqa"))
    (tmp_path / "m.gguf").write_text("old")

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(LoraPruneError, match="disk is full"):
        export_gguf(folder, tmp_path / "m.gguf", overwrite=True)
    assert (tmp_path / "m.gguf").read_text() == "old"
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_export(tmp_path, capsys):
    _, _, pruned, _ = masked_then_pruned("llama-gqa", 0.5, uniform=False)
    folder = saved(tmp_path, pruned)
    assert main(["export", str(folder), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 0
    assert "deci (per-layer shapes), f32" in capsys.readouterr().out
    assert main(["export", str(folder), "--output", str(tmp_path / "m.gguf")]) == 2
    assert "exists" in capsys.readouterr().err


def test_unrecognised_pre_tokenizer_is_a_warning(tmp_path):
    result = export_gguf(saved(tmp_path, tiny_model("llama-gqa")), tmp_path / "m.gguf")
    assert result["warnings"] == [gguf_export.UNKNOWN_PRE_TOKENIZER]
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == "default"


def test_prune_gguf_writes_the_file_at_the_end_of_a_run(tmp_path, capsys):
    folder = saved(tmp_path, tiny_model("llama-gqa"))
    text = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    words = TEXT.replace(",", "").replace(".", "").split()
    text.write_text(
        "\n".join(" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(200))
    )
    out, gguf_file = tmp_path / "out", tmp_path / "out.gguf"
    argv = ["prune", "--model", folder, "--data", text, "--output", out, "--gguf", gguf_file, "--ratio", "0.5"]
    argv += ["--steps", "6", "--prune-freq", "2", "--seq-len", "16", "--batch-size", "2", "--quiet", "--no-eval"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert "deci (per-layer shapes)" in capsys.readouterr().out
    loaded, _ = load_model(str(gguf_file))
    reference, _ = load_model(str(out))
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=0, atol=1e-5)
    # an existing GGUF file is refused before any work, like a non-empty output folder
    assert main([str(a) for a in [*argv, "--output", tmp_path / "other"]]) == 2
    assert "exists" in capsys.readouterr().err and not (tmp_path / "other").exists()
