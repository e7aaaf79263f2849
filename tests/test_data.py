import json

import pytest
import torch

from loraprune.errors import LoraPruneError
from loraprune.pipeline import data
from loraprune.pipeline.data import BatchSampler, tokenize, windows
from loraprune.pipeline.texts import load_text


def test_ptb_splits():
    valid = load_text("ptb", "valid")
    assert valid.startswith(" consumers may want")
    assert len(load_text("ptb", "train")) > len(valid)
    assert load_text("ptb", "test") != valid


def test_unknown_split():
    with pytest.raises(LoraPruneError, match="unknown split 'dev'; choose one of train, valid, test"):
        load_text("ptb", "dev")


def test_txt_same_text_for_every_split(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("the cat sat\non a mat\n")
    assert load_text(str(path), "train") == load_text(str(path), "test") == "the cat sat\non a mat\n"


def test_jsonl_joins_text_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "the cat", "id": 1}) + "\n\n" + json.dumps({"text": "a dog"}) + "\n")
    assert load_text(str(path), "valid") == "the cat\n\na dog"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"b\.jsonl line 2: not valid JSON"),
        ('{"body": "no text"}\n', r'b\.jsonl line 1: expected an object with a string "text" field'),
        ('["text"]\n', r"b\.jsonl line 1: expected an object"),
        ('{"text": 3}\n', r"b\.jsonl line 1: expected an object"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "b.jsonl"
    path.write_text(content)
    with pytest.raises(LoraPruneError, match=message):
        load_text(str(path), "train")


@pytest.mark.parametrize(
    "name, content", [("e.txt", ""), ("e.txt", " \n\n "), ("e.jsonl", "\n\n"), ("e.jsonl", '{"text": ""}')]
)
def test_empty(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LoraPruneError, match=rf"dataset .*{name} is empty"):
        load_text(str(path), "train")


def test_missing_file(tmp_path):
    with pytest.raises(LoraPruneError, match=r"dataset file .*nope\.txt does not exist"):
        load_text(str(tmp_path / "nope.txt"), "train")


def test_unknown_spec():
    with pytest.raises(
        LoraPruneError, match="unknown dataset 'wikitext'; choose 'ptb', 'pydoc', 'gcide', .*, a .txt file or a .jsonl"
    ):
        load_text("wikitext", "train")


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LoraPruneError, match=r"bin\.txt is not UTF-8 text"):
        load_text(str(path), "train")


def test_tokenize_matches_one_call(tiny_tokenizer, monkeypatch):
    text = "the cat sat\non a mat\n\n\nthe dog ran to the park\nit was big\n" * 20
    monkeypatch.setattr(data, "CHUNK_CHARS", 10)  # force many chunks
    ids = tokenize(tiny_tokenizer, text)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.eos_token_id not in ids.tolist()


def test_chunks_cut_at_lone_newlines():
    text = "ab\n\n\ncd\nef\ngh" * 5
    chunks = list(data._chunks(text, 3))
    assert "".join(chunks) == text and len(chunks) > 3
    for chunk in chunks[:-1]:
        assert chunk.endswith("\n") and not chunk.endswith("\n\n")
    for chunk in chunks[1:]:
        assert not chunk.startswith("\n")


def test_windows():
    tokens = torch.arange(23)
    w = windows(tokens, 5)
    assert w.shape == (4, 5) and w.dtype == torch.long
    assert w[1].tolist() == [5, 6, 7, 8, 9] and w[-1, -1] == 19  # remainder 20..22 dropped


def test_windows_too_short():
    with pytest.raises(LoraPruneError, match="text has 5 tokens, shorter than one window of 8"):
        windows(torch.arange(5), 8)
    with pytest.raises(LoraPruneError, match="seq_len must be at least 2"):
        windows(torch.arange(5), 1)


def _windows(n=10, seq_len=4):
    return torch.arange(n * seq_len).view(n, seq_len)


def test_sampler_epoch_is_a_permutation():
    w = _windows()
    sampler = BatchSampler(w, batch_size=5, seed=0)
    batches = [next(sampler) for _ in range(2)]
    assert batches[0].shape == (5, 4)
    seen = sorted(row[0].item() // 4 for batch in batches for row in batch)
    assert seen == list(range(10))  # each window exactly once per epoch
    assert sampler.state_dict() == {"seed": 0, "epoch": 1, "pos": 0}


def test_sampler_reproducible_by_seed():
    def first_batches(seed):
        sampler = BatchSampler(_windows(), batch_size=3, seed=seed)
        return torch.stack([next(sampler) for _ in range(4)])

    assert torch.equal(first_batches(1), first_batches(1))
    assert not torch.equal(first_batches(1), first_batches(2))


def test_sampler_crosses_epochs_and_resumes():
    w = _windows(n=4)
    sampler = BatchSampler(w, batch_size=3, seed=7)
    for _ in range(3):
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(3)]
    resumed = BatchSampler(w, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, [next(resumed) for _ in range(3)], strict=True))
    assert next(BatchSampler(w, batch_size=9)).shape == (9, 4)  # larger than one epoch


def test_sampler_bad_batch_size():
    with pytest.raises(LoraPruneError, match="batch_size must be at least 1"):
        BatchSampler(_windows(), 0)


def test_pydoc_is_the_python_reference_for_every_split():
    from loraprune.pipeline.texts import load_text

    text = load_text("pydoc", "test")
    assert len(text) > 100_000 and "assert" in text and text == load_text("pydoc", "train")
