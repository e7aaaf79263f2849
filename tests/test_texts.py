import gzip

import pytest

from loraprune.errors import LoraPruneError
from loraprune.pipeline import texts
from loraprune.pipeline.texts import check_spec, load_text, parse_mix


@pytest.fixture
def dictd(tmp_path, monkeypatch):
    """A fake `jargon` dictd text of 60 numbered blocks of ~64 KiB in $LORAPRUNE_TEXTS."""
    blocks = [f"entry {i}\n" + "word " * (texts.SPLIT_BLOCK_CHARS // 5) + "\n\n" for i in range(60)]
    (tmp_path / "jargon.dict.dz").write_bytes(gzip.compress("".join(blocks).encode()))
    monkeypatch.setenv(texts.TEXT_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(texts, "SYSTEM_DICTD_DIR", tmp_path / "none")
    return tmp_path


def test_parse_mix():
    assert parse_mix("ptb") == [("ptb", 1.0)]
    assert parse_mix("gcide*3 + foldoc") == [("gcide", 3.0), ("foldoc", 1.0)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "the dataset spec is empty"),
        ("ptb+", "has an empty part"),
        ("ptb*x+pydoc", "weight 'x' of 'ptb' is not a number"),
        ("ptb*-1+pydoc", "weight of 'ptb' must be a finite number >= 0"),
        ("ptb*0+pydoc*0", "the weights sum to 0"),
        ("ptb+wikitext", "unknown dataset 'wikitext'"),
    ],
)
def test_bad_mix(spec, message):
    with pytest.raises(LoraPruneError, match=message):
        check_spec(spec)


def test_dictd_splits_are_disjoint_and_span_the_text(dictd):
    train, valid, test = (load_text("jargon", split) for split in ("train", "valid", "test"))
    entries = {split: {line for line in text.splitlines() if line.startswith("entry")} for split, text in
               (("train", train), ("valid", valid), ("test", test))}  # fmt: skip
    assert entries["test"] == {"entry 19", "entry 39", "entry 59"}
    assert entries["valid"] == {"entry 18", "entry 38", "entry 58"}
    assert len(entries["train"]) == 54 and not entries["train"] & (entries["test"] | entries["valid"])


def test_missing_dictd_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(texts.TEXT_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(texts, "SYSTEM_DICTD_DIR", tmp_path / "none")
    with pytest.raises(LoraPruneError, match="text 'gcide' is not installed: run `make texts`.*dict-gcide"):
        check_spec("ptb+gcide")


def test_mix_shares_follow_the_weights(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha line\n" * 1000)  # 11,000 characters
    b.write_text("beta\n" * 200)  # 1,000 characters
    mixed = load_text(f"{a}*1+{b}*3", "train")
    alpha, beta = mixed.count("alpha") * len("alpha line\n"), mixed.count("beta") * len("beta\n")
    assert alpha + beta == pytest.approx(12_000, rel=0.01)
    assert beta / (alpha + beta) == pytest.approx(0.75, abs=0.01)  # b repeated, a cut
    assert load_text(f"{a}+{b}*0", "train").count("beta") == 0


def test_a_file_name_with_a_plus(tmp_path):
    path = tmp_path / "c++notes.txt"
    path.write_text("pointers\n")
    assert load_text(str(path), "test") == "pointers\n"
