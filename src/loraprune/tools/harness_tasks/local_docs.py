"""Documents and metrics of loraprune's offline perplexity tasks for lm-eval (see the YAML files).

The text (from loraprune.pipeline.texts.load_text: nothing is downloaded) is cut into documents of
DOC_LINES whole lines, newlines kept, so the documents joined are exactly the text, and the
harness's `limit` (`loraprune eval --limit N`) can score the first N of them. The harness scores
each document on its own: its first token is predicted from the prefix token alone, one such
restart per DOC_LINES lines (38 on PTB test, next to ~790 windows of 128 tokens).
"""

import re

import datasets

from loraprune.pipeline.texts import load_text

DOC_LINES = 100
_LINE = re.compile(r"[^\n]*\n|[^\n]+$")  # a line with its newline, or a last line without one


def split_documents(text: str, lines: int = DOC_LINES) -> list[str]:
    """Consecutive blocks of `lines` lines; "".join(split_documents(text)) == text."""
    all_lines = _LINE.findall(text)
    return ["".join(all_lines[i : i + lines]) for i in range(0, len(all_lines), lines)]


def _documents(text: str, source: str) -> datasets.DatasetDict:
    docs = [{"text": doc, "source": source, "index": i} for i, doc in enumerate(split_documents(text))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def ptb_documents(**metadata) -> datasets.DatasetDict:
    return _documents(load_text("ptb", "test"), "ptb test")


def file_documents(data: str | None = None, **metadata) -> datasets.DatasetDict:
    if not data:
        raise ValueError("local_text needs the file to score: metadata data=PATH (loraprune eval --data PATH)")
    return _documents(load_text(data, "test"), data)


def doc_to_target(doc: dict) -> str:
    return doc["text"]


def process_results(doc: dict, results) -> dict:
    """As lm-eval's wikitext task, but words are str.split()'s (no empty string at either end)."""
    (loglikelihood,) = results
    words = len(doc["text"].split())
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
