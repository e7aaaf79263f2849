"""The command line end to end on a tiny model folder, and every bad input the issue lists."""

import json
import re

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_tokenizer
from loraprune import LoraPruneError
from loraprune.cli import main

FAST = ["--steps", "6", "--prune-freq", "2", "--seq-len", "16", "--batch-size", "2", "--quiet"]


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_then_eval(tmp_path, capsys, tiny_folder, text_file):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "prune", "--model", tiny_folder, "--data", text_file, "--output", out, *FAST)
    assert code == 0, err
    assert "total parameters removed" in stdout and "(16-token windows)" in stdout
    report = json.loads((out / "loraprune.json").read_text())
    assert report["config"]["ratio"] == 0.5 and report["history"]["pruning_steps"] == [3, 5]
    assert [layer["heads"] for layer in report["layers"]] == [
        3,
        3,
        6,
    ]  # last layer skipped (10% of 3 layers rounds to none)
    assert report["parameters"]["after"]["total"] < report["parameters"]["before"]["total"]
    assert report["evaluation"]["pruned"]["perplexity"] > 1

    plots = ["training.png", "kept.png", "scores.png"]
    assert all((out / name).stat().st_size > 1000 for name in ["report.md", *plots])
    for name in plots:
        (out / name).unlink()
    code, stdout, err = run(capsys, "report", out)
    assert code == 0 and all((out / name).exists() for name in plots), err
    assert "![kept groups](kept.png)" in (out / "report.md").read_text()

    code, stdout, err = run(capsys, "eval", "--model", out, "--data", text_file, "--seq-len", 16, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["parameters"] == report["parameters"]["after"]["total"]
    assert result["perplexity"] == pytest.approx(report["evaluation"]["pruned"]["perplexity"], rel=1e-4)


def test_every_run_is_judged_on_other_texts_against_the_dense_model(tmp_path, capsys, tiny_folder, text_file):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(text_file.read_text().splitlines())))
    out, mix = tmp_path / "out", f"{text_file}*2+{other}"
    argv = ["--model", tiny_folder, "--data", mix, "--eval-data", f"{other},{mix},pydoc", "--output", out]
    code, stdout, err = run(capsys, "prune", *argv, *FAST)
    assert code == 0, err
    evaluation = json.loads((out / "loraprune.json").read_text())["evaluation"]
    assert [text["data"] for text in evaluation["other_texts"]] == [str(other), "pydoc"]  # --data's own: once
    assert [text["tuned_on"] for text in evaluation["other_texts"]] == [True, False]
    for text in (evaluation, *evaluation["other_texts"]):
        assert text["ratio"] == pytest.approx(text["pruned"]["perplexity"] / text["dense"]["perplexity"])
    assert re.search(rf"{re.escape(mix)} test \(tuned on its train split\) +[\d.]+ +[\d.]+ +[\d.]+", stdout)
    assert re.search(r"\npydoc test +[\d.]+ +[\d.]+ +[\d.]+\n", stdout)
    assert "pydoc test" in (out / "report.md").read_text()

    code, stdout, err = run(capsys, "eval", "--model", out, "--data", f"{other},pydoc", "--seq-len", 16, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["reference"] == str(tiny_folder) and result["tuned_on"]  # the dense model it was pruned from
    assert result["other_texts"][0]["data"] == "pydoc" and not result["other_texts"][0]["tuned_on"]
    pydoc = evaluation["other_texts"][1]
    for key in ("dense", "pruned"):
        assert result["other_texts"][0][key]["perplexity"] == pytest.approx(pydoc[key]["perplexity"], rel=1e-4)
    code, stdout, err = run(capsys, "eval", "--model", out, "--data", "pydoc", "--seq-len", 16)
    assert code == 0 and re.search(r"pydoc test +[\d.]+ +[\d.]+ +[\d.]+", stdout), err


def bad_input_cases(tmp_path, tiny_folder, text_file):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt2)
    (gpt2 / "tokenizer.json").write_text((tiny_folder / "tokenizer.json").read_text())
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    short.write_text("the cat sat")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep")
    model, data = ["--model", tiny_folder], ["--data", text_file]
    return {
        "missing model": (["--model", tmp_path / "nope", *data], "not found"),
        "unknown name": (["--model", "llama9", *data], "not found: give 'smollm2'"),
        "hub id": (["--model", "meta-llama/Llama-3-8B", *data], "works offline"),
        "unsupported architecture": (
            ["--model", gpt2, *data],
            "unsupported architecture 'gpt2'; supported: bert, gemma2, gemma3_text, llama, mistral, phi3, qwen2, "
            "qwen3, vit",
        ),
        "ratio 1": ([*model, *data, "--ratio", 1.0], r"--ratio must be in \[0, 1\)"),
        "ratio negative": ([*model, *data, "--ratio", -0.1], r"--ratio must be in \[0, 1\)"),
        "every head": ([*model, *data, "--ratio", 0.95], "would remove every head of a layer"),
        "every head of a k/v group": ([*model, *data, "--ratio", 0.9, "--uniform"], "every head of a k/v group"),
        "missing data": ([*model, "--data", tmp_path / "no.txt"], "does not exist"),
        "empty data": ([*model, "--data", empty], "is empty"),
        "short data": ([*model, "--data", short], "shorter than one window"),
        "unknown data": ([*model, "--data", "wikitext"], "unknown dataset 'wikitext'"),
        "seq-len over context": ([*model, *data, "--seq-len", 4096], "exceeds the model's context of 128"),
        "occupied output": ([*model, *data, "--output", occupied], "exists and is not empty; pass --overwrite"),
        "too few steps": ([*model, *data, "--steps", 2, "--warmup", 0.5, "--cooldown", 0.4], "--steps 2 is too few"),
        "bad skip layers": ([*model, *data, "--skip-layers", "7"], "--skip-layers: '7'"),
        "empty eval data": ([*model, *data, "--eval-data", ""], "--eval-data '' has an empty entry"),
        "eval data gap": ([*model, *data, "--eval-data", "ptb,,pydoc"], "--eval-data 'ptb,,pydoc' has an empty"),
        "unknown eval data": ([*model, *data, "--eval-data", "ptb,wiki"], "--eval-data: unknown dataset 'wiki'"),
        "bad mix weight": ([*model, "--data", f"{text_file}*x+ptb"], "weight 'x' of .* is not a number"),
        "mix weights sum to 0": ([*model, "--data", f"{text_file}*0+ptb*0"], "the weights sum to 0"),
        "unknown mix part": ([*model, "--data", f"{text_file}+wiki"], "unknown dataset 'wiki'"),
        "alignment 24": ([*model, *data, "--multiple-of", 24], "--multiple-of must be a positive power of two"),
        "alignment 0": ([*model, *data, "--multiple-of", 0], "--multiple-of must be a positive power of two"),
        "alignment over the width": ([*model, *data, "--multiple-of", 64], "exceeds the 40 MLP channels"),
        "alignment with global": ([*model, *data, "--multiple-of", 8, "--allocation", "global"], "cannot be combined"),
    }


CASES = [
    "missing model", "unknown name", "hub id", "unsupported architecture", "ratio 1", "ratio negative",
    "every head", "every head of a k/v group", "missing data", "empty data", "short data", "unknown data",
    "seq-len over context", "occupied output", "too few steps", "bad skip layers", "empty eval data",
    "eval data gap", "unknown eval data", "bad mix weight", "mix weights sum to 0", "unknown mix part",
    "alignment 24", "alignment 0", "alignment over the width", "alignment with global",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys, tiny_folder, text_file, case):
    argv, message = bad_input_cases(tmp_path, tiny_folder, text_file)[case]
    if "--output" not in argv:
        argv = [*argv, "--output", tmp_path / "out"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, err = run(capsys, "prune", *FAST, *argv)  # later flags win
    assert code == 2
    assert err.startswith("loraprune: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("criterion", ["lora", "gradient", "magnitude", "random"])
def test_criterion_and_target_params_flags(criterion):
    from loraprune.cli import build_parser

    args = build_parser().parse_args(
        ["prune", "--model", "m", "--data", "d", "--output", "o", "--criterion", criterion, "--target-params", "0.3"]
    )
    assert (args.criterion, args.target_params) == (criterion, 0.3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--criterion", "bogus"], "--criterion must be one of lora, sketch, streamed, gradient, magnitude, random"),
        (["--target-params", "1.5"], r"--target-params must be in \(0, 1\)"),
    ],
)
def test_bad_criterion_or_target_params_is_one_clear_error(capsys, flags, message):
    code, _, err = run(capsys, "prune", "--model", "m", "--data", "d", "--output", "o", *flags)
    assert code == 2 and re.search(message, err), err


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run(capsys, "report", tmp_path)
    assert code == 2 and "is not a loraprune run: it has no loraprune.json" in err


def test_config_file_with_flags_overriding_it(tmp_path, capsys, tiny_folder, text_file):
    settings = tmp_path / "run.yaml"
    settings.write_text(
        f"model: {tiny_folder}\ndata: {text_file}\nratio: 0.3\nlora-r: 4\nsteps: 6\nprune_freq: 2\n"
        "seq_len: 16\nbatch_size: 2\nquiet: true\nno_such: 1\n"
    )
    code, _, err = run(capsys, "prune", "--config", settings, "--output", tmp_path / "out")
    assert code == 2 and "unknown setting(s) no_such" in err
    settings.write_text(settings.read_text().replace("no_such: 1\n", ""))
    code, _, err = run(capsys, "prune", "--config", settings, "--output", tmp_path / "out", "--ratio", "0.5")
    assert code == 0, err
    saved = (tmp_path / "out" / "loraprune.yaml").read_text()
    assert "ratio: 0.5" in saved and "lora_r: 4" in saved  # the flag won; the file's other values stayed
    code, _, err = run(capsys, "prune", "--config", tmp_path / "out" / "loraprune.yaml", "--output", tmp_path / "again")
    assert code == 0, err  # a saved run's settings rerun as they are
    first, again = (json.loads((tmp_path / d / "loraprune.json").read_text()) for d in ("out", "again"))
    assert first["layers"] == again["layers"] and first["config"] == again["config"]


def test_missing_required_setting(tmp_path, capsys, text_file):
    code, _, err = run(capsys, "prune", "--data", text_file, "--output", tmp_path / "out")
    assert code == 2 and "--model required (on the command line or in --config)" in err


def test_inspect_predicts_what_prune_removes(tmp_path, capsys, tiny_folder, text_file):
    code, stdout, err = run(capsys, "inspect", tiny_folder, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert (info["heads"], info["kv_heads"], info["head_dim"], info["mlp_width"]) == (6, 2, 8, 40)
    row = next(r for r in info["ratios"] if r["ratio"] == 0.5 and not r["uniform"])
    assert (row["heads"], row["channels"]) == (3, 20)
    code, _, err = run(capsys, "prune", "--model", tiny_folder, "--data", text_file, "--output", tmp_path / "o", *FAST)
    actual = json.loads((tmp_path / "o" / "loraprune.json").read_text())["removed"]["total_parameters"]
    # inspect assumes k/v heads stay; the run may also drop a k/v head whose readers all went
    kv_head_fraction = 2 * 8 * 48 * 2 / info["parameters"]  # k and v rows of one k/v head, 2 pruned layers
    assert row["removed_total"] <= actual <= row["removed_total"] + 2 * kv_head_fraction


def test_invalid_yaml_config_is_one_line_with_its_place(tmp_path, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text("model: m\nratio: [0.5\nsteps: 6\n")
    code, _, err = run(capsys, "prune", "--config", settings, "--output", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"--config file .*run.yaml is not valid YAML at line \d+, column \d+", err), err


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_every_task_prunes_from_the_command_line_with_the_memory_preflight(tmp_path, capsys, text_file, family):
    """As a user runs it: the pre-flight (on by default) traces the task's own inputs (a ViT has no
    input_ids), then the run prunes, evaluates and reloads."""
    from loraprune.pipeline.vit_digits import image_processor
    from tiny import tiny_encoder

    folder = tmp_path / family
    tiny_encoder(family).save_pretrained(folder)
    if family == "bert":
        tokenizer = make_tokenizer()
        tokenizer.pad_token = "</s>"
        tokenizer.save_pretrained(folder)
        data = text_file
    else:
        image_processor().save_pretrained(folder)
        data = "digits"
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "prune", "--model", folder, "--data", data, "--output", out, *FAST,
                            "--eval-windows", 16)  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "loraprune.json").read_text())["removed"]["heads"] == 0.5
    assert "reloaded with" in stdout


def test_data_defaults_to_general_text_for_causal_lms_and_is_required_elsewhere():
    from dataclasses import replace

    from loraprune.job import with_data
    from loraprune.run_settings import RunSettings
    from loraprune.tasks import TASKS

    run = RunSettings(model="m", output="o")
    assert with_data(run, TASKS["causal-lm"]).data == "gcide+foldoc"
    assert with_data(replace(run, data="ptb"), TASKS["causal-lm"]).data == "ptb"
    with pytest.raises(LoraPruneError, match="--data is required for the embedding task"):
        with_data(run, TASKS["embedding"])
