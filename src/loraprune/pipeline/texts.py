"""Where training and evaluation text comes from: named texts (one registry), files, and mixes.

A `--data` spec is one source or a mix `a+b`, each part optionally weighted `a*3+b*1`:

- `ptb`: Penn Treebank (the `treebank` package), news, with its own train/valid/test splits.
- `pydoc`: the Python language reference's topics as the interpreter ships them
  (pydoc_data.topics, ~110k SmolLM2 tokens of technical English with code). No splits: every
  split reads the whole text (a held-out text, not one to tune on).
- the dictionaries Debian ships for dictd (`make texts` fetches them without root, or
  `apt-get install dict-gcide dict-foldoc dict-jargon`): `gcide`, English definitions with
  quotations (Webster's 1913 and additions, GPL-3+, ~5 M words); `foldoc`, an encyclopedia of
  computing (GFDL, ~0.8 M words); `jargon`, the Jargon File (public domain, ~0.2 M words). Split
  here: of every 20 blocks of ~64 KiB, the 19th is valid and the 20th test, the rest train, so
  every split spans the alphabet.
- a .txt file, or a .jsonl file's "text" fields: no splits, every split reads the whole file.

A mix's split is its parts' splits, each repeated or cut at a line so that its share of the
characters is its weight's share (weights default to 1): `gcide*3+foldoc` is 3/4 gcide.
"""

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraPruneError

SPLITS = ("train", "valid", "test")
TEXT_DIR_ENV = "LORAPRUNE_TEXTS"  # where `make texts` puts the dictd files (default below)
DEFAULT_TEXT_DIR = Path.home() / ".cache" / "loraprune" / "texts"
SYSTEM_DICTD_DIR = Path("/usr/share/dictd")  # where apt-get install puts them
SPLIT_BLOCK_CHARS, SPLIT_PERIOD = 1 << 16, 20  # blocks of ~64 KiB; block 19 of 20 valid, 20 test
_BLOCK_END = re.compile(r"\n\n")


@dataclass(frozen=True)
class DictdText:
    """A dictionary Debian ships for dictd: /usr/share/dictd/NAME.dict.dz (gzip-readable) in `package`."""

    package: str
    license: str
    what: str


DICTD_TEXTS = {
    "gcide": DictdText("dict-gcide", "GPL-3+", "English definitions with quotations (Webster's 1913 and additions)"),
    "foldoc": DictdText("dict-foldoc", "GFDL-1.1+", "the Free On-line Dictionary of Computing"),
    "jargon": DictdText("dict-jargon", "public domain", "the Jargon File"),
}
NAMED = ("ptb", "pydoc", *DICTD_TEXTS)


def text_names() -> str:
    return ", ".join(repr(name) for name in NAMED)


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """[(source, weight)] of a spec `a`, `a+b` or `a*2+b*1`; one clear error for a bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise LoraPruneError("the dataset spec is empty; give a text name, a file, or a mix like gcide+foldoc")
    if os.path.isfile(spec):  # a file whose name has + or * in it
        return [(spec, 1.0)]
    parts = []
    for part in spec.split("+"):
        source, _, weight = part.strip().partition("*")
        source = source.strip()
        if not source:
            raise LoraPruneError(f"dataset mix {spec!r} has an empty part")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise LoraPruneError(f"dataset mix {spec!r}: weight {weight!r} of {source!r} is not a number") from None
        if not value >= 0 or value == float("inf"):
            raise LoraPruneError(f"dataset mix {spec!r}: weight of {source!r} must be a finite number >= 0")
        parts.append((source, value))
    if sum(weight for _, weight in parts) <= 0:
        raise LoraPruneError(f"dataset mix {spec!r}: the weights sum to 0")
    return parts


def check_spec(spec: str, flag: str | None = None) -> None:
    """Refuse a spec whose sources do not exist, before anything is loaded or written; the error
    starts with `flag` where one is given."""
    try:
        for source, _ in parse_mix(spec):
            _check_source(source)
    except LoraPruneError as e:
        raise LoraPruneError(f"{flag}: {e}" if flag else str(e)) from None


def tuned_on(spec: str, tuning_spec: str) -> bool:
    """Whether every source of `spec` is one the text `tuning_spec` tunes on (its train split)."""
    tuning = {source for source, weight in parse_mix(tuning_spec) if weight > 0}
    return all(source in tuning for source, _ in parse_mix(spec))


def load_text(spec: str, split: str) -> str:
    """The text of `spec` (one source or a mix, see the module doc) for `split`."""
    if split not in SPLITS:
        raise LoraPruneError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    parts = parse_mix(spec)
    if len(parts) == 1:
        return _source_text(parts[0][0], split)
    texts = [(_source_text(source, split), weight) for source, weight in parts if weight > 0]
    total, weights = sum(len(text) for text, _ in texts), sum(weight for _, weight in texts)
    return "\n\n".join(_resized(text, round(total * weight / weights)) for text, weight in texts)


def _resized(text: str, chars: int) -> str:
    """`text` repeated and cut at a line end to about `chars` characters (at least one line)."""
    repeated = (text + "\n\n") * (chars // (len(text) + 2) + 1)
    cut = repeated.find("\n", chars)
    return repeated[: cut if cut > 0 else len(repeated)].strip("\n")


def _check_source(source: str) -> None:
    if source in ("ptb", "pydoc"):
        return
    if source in DICTD_TEXTS:
        _dictd_path(source)
    elif source.endswith((".txt", ".jsonl")):
        if not os.path.isfile(source):
            raise LoraPruneError(f"dataset file {source} does not exist")
    else:
        raise LoraPruneError(f"unknown dataset {source!r}; choose {text_names()}, a .txt file or a .jsonl file")


def _source_text(source: str, split: str) -> str:
    _check_source(source)
    if source == "ptb":
        import treebank  # imported late: only this dataset needs it

        text, name = treebank.penn[split], f"ptb {split}"
    elif source == "pydoc":
        from pydoc_data.topics import topics

        text, name = "\n\n".join(topics.values()), "pydoc"
    elif source in DICTD_TEXTS:
        text, name = _split(_read_dictd(source), split), f"{source} {split}"
    else:
        text, name = _read_file(source), source
    if not text.strip():
        raise LoraPruneError(f"dataset {name} is empty")
    return text


def text_dirs() -> list[Path]:
    """Where dictd texts are looked for, in order: $LORAPRUNE_TEXTS (or its default), then the system's."""
    return [Path(os.environ.get(TEXT_DIR_ENV, DEFAULT_TEXT_DIR)), SYSTEM_DICTD_DIR]


def _dictd_path(name: str) -> Path:
    for folder in text_dirs():
        path = folder / f"{name}.dict.dz"
        if path.is_file():
            return path
    raise LoraPruneError(
        f"text {name!r} is not installed: run `make texts` (puts it in {text_dirs()[0]}) "
        f"or `apt-get install {DICTD_TEXTS[name].package}`"
    )


def _read_dictd(name: str) -> str:
    raw = gzip.decompress(_dictd_path(name).read_bytes())  # dictzip is gzip with an index
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # gcide has a few Windows-1252 bytes
        return raw.decode("cp1252", errors="replace")


def _split(text: str, split: str) -> str:
    """Blocks of ~64 KiB ending at a blank line; block i is valid if i % 20 == 18, test if 19."""
    blocks, start = [], 0
    while start < len(text):
        cut = _BLOCK_END.search(text, start + SPLIT_BLOCK_CHARS)
        end = cut.end() if cut else len(text)
        blocks.append(text[start:end])
        start = end
    role = {SPLIT_PERIOD - 2: "valid", SPLIT_PERIOD - 1: "test"}
    keep = [block for i, block in enumerate(blocks) if role.get(i % SPLIT_PERIOD, "train") == split]
    return "".join(keep)


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as e:
        raise LoraPruneError(f"dataset file {path} is not UTF-8 text: {e}") from e
    return _jsonl_text(path, raw) if path.endswith(".jsonl") else raw


def _jsonl_text(path: str, raw: str) -> str:
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue  # tolerate blank lines, e.g. a trailing newline
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoraPruneError(f"{path} line {number}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoraPruneError(f'{path} line {number}: expected an object with a string "text" field')
        texts.append(record["text"])
    return "\n\n".join(texts)
