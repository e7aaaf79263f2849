"""`loraprune eval --tasks`: lm-eval's rolling perplexity on a local text against our evaluator."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from loraprune.cli import main  # noqa: E402
from loraprune.pipeline.data import tokenize, windows  # noqa: E402
from loraprune.pipeline.evaluate import perplexity  # noqa: E402
from loraprune.pipeline.load import load_model  # noqa: E402
from loraprune.pipeline.texts import load_text
from loraprune.tools.harness import run_harness  # noqa: E402
from loraprune.tools.harness_tasks.local_docs import split_documents  # noqa: E402

SEQ_LEN = 16


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load_model(str(tiny_folder))


def test_harness_perplexity_equals_our_evaluator_on_its_windows(tiny, text_file):
    model, tokenizer = tiny
    result = run_harness(model, tokenizer, ["local_text"], str(text_file), SEQ_LEN, batch_size=8)
    metrics = result["tasks"]["local_text"]
    text = load_text(str(text_file), "test")
    ids = tokenize(tokenizer, text)
    assert metrics["tokens"] == len(ids) == 3000  # every token scored once, tokenized as we do
    docs = split_documents(text)  # 250 lines: documents of 100, 100 and 50 lines
    assert metrics["documents"] == len(docs) == 3

    # The harness's windows (max_length = SEQ_LEN - 1) are our windows of SEQ_LEN tokens laid with
    # stride SEQ_LEN - 1 over [prefix] + each document's tokens (1200, 1200 and 600 tokens: multiples
    # of 15, so there is no ragged last window).
    prefix = torch.tensor([result["prefix_token_id"]])
    harness_windows = torch.cat(
        [torch.cat([prefix, tokenize(tokenizer, doc)]).unfold(0, SEQ_LEN, SEQ_LEN - 1) for doc in docs]
    )
    same_windows = perplexity(model, harness_windows)
    assert same_windows["tokens"] == metrics["tokens"]
    assert metrics["token_perplexity"] == pytest.approx(same_windows["perplexity"], rel=1e-5)
    assert -metrics["loglikelihood"] == pytest.approx(same_windows["loss"] * same_windows["tokens"], rel=1e-5)

    # Our default non-overlapping windows of the whole text score 2805 of the 3000 tokens (15 of
    # each 16, remainder dropped) with the same context lengths: another sample of the same text,
    # within 1%.
    ours = perplexity(model, windows(ids, SEQ_LEN))
    assert ours["tokens"] == 2805
    assert metrics["token_perplexity"] == pytest.approx(ours["perplexity"], rel=0.01)

    # the harness's own metrics are per word and per byte of the same total loglikelihood
    words, n_bytes = len(text_file.read_text().split()), len(text_file.read_bytes())
    assert words == metrics["tokens"]  # one word per token in the tiny vocabulary
    assert metrics["word_perplexity"] == pytest.approx(metrics["token_perplexity"], rel=1e-9)
    assert metrics["bits_per_byte"] == pytest.approx(-metrics["loglikelihood"] / n_bytes / math.log(2), rel=1e-9)


def test_cli_eval_tasks_local_text_json(capsys, tiny_folder, text_file):
    args = ("eval", "--model", tiny_folder, "--tasks", "local_text", "--data", text_file, "--seq-len", SEQ_LEN)
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["harness_max_length"] == SEQ_LEN - 1
    metrics = result["tasks"]["local_text"]
    assert metrics["tokens"] == 3000 and metrics["documents"] == 3 and math.isfinite(metrics["token_perplexity"])
    code, out, err = run(capsys, *args, "--limit", 1, "--json")
    assert code == 0 and json.loads(out)["tasks"]["local_text"]["tokens"] == 1200  # the first 100 lines
    code, out, err = run(capsys, *args)  # the table
    assert code == 0 and "token_perplexity" in out and "bits_per_byte" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--tasks", "hellaswag"), "task hellaswag needs to download its dataset, which is not possible offline"),
        (("--tasks", "no_such_task"), "unknown task(s) no_such_task; loraprune's offline tasks: ptb_local"),
        (("--tasks", "local_text"), "task local_text needs --data FILE"),
        (("--tasks", " , "), "--tasks is empty"),
        (("--tasks", "ptb_local", "--limit", "0"), "--limit must be at least 1"),
    ],
)
def test_cli_task_errors_are_one_line(capsys, tiny_folder, argv, message):
    code, out, err = run(capsys, "eval", "--model", tiny_folder, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("loraprune: error: ") and message in err, err


def test_cli_eval_without_tasks_still_needs_data(capsys, tiny_folder):
    code, _, err = run(capsys, "eval", "--model", tiny_folder)
    assert code == 2 and "--data is required" in err
