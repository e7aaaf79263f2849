"""Text datasets, tokenization and fixed-length windows for training and perplexity."""

import re

import torch

from ..errors import LoraPruneError
from ..prune_config import round_half_up
from .texts import SPLITS, load_text

CHUNK_CHARS = 1 << 16  # ~64 KiB of text per tokenizer call
_LONE_NEWLINE = re.compile(r"(?<!\n)\n(?!\n)")  # a newline not part of a blank-line run


def tokenize(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of the whole text as one 1-D tensor, without special tokens.

    One call on the 5 MB PTB train text takes ~4.6 s, so the text is cut into ~64 KiB chunks,
    each ending at a lone newline (never inside a run of blank lines), and tokenized as one
    batch, in parallel by the Rust tokenizer (~2.5 s on 2 cores).
    Byte-level BPE tokenizers (SmolLM2, Llama-3, Qwen2) pre-tokenize at such a newline anyway
    when the next line starts with at most one space, so the ids equal one call on the whole
    text (checked on all PTB splits with SmolLM2). Elsewhere a chunk boundary may change a
    token or two per ~15k tokens: noise for perplexity.
    """
    chunks = list(_chunks(text, CHUNK_CHARS))
    ids = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([i for chunk in ids for i in chunk], dtype=torch.long)


def _chunks(text: str, size: int):
    start = 0
    while start < len(text):
        cut = _LONE_NEWLINE.search(text, start + size)
        end = cut.end() if cut else len(text)
        yield text[start:end]
        start = end


def bos_token_id(tokenizer) -> int | None:
    """The tokenizer's BOS id when it puts one before every text (Gemma, Llama 3, ...), else None
    (SmolLM2, Qwen: no BOS). Windows of such a tokenizer's model start with it, as its texts do."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def windows(tokens: torch.Tensor, seq_len: int, bos: int | None = None) -> torch.LongTensor:
    """Non-overlapping [n, seq_len] windows of a 1-D token tensor; the trailing remainder is dropped.
    With `bos`, each window is that token followed by the next seq_len - 1 tokens of the text."""
    if seq_len < 2:
        raise LoraPruneError(f"seq_len must be at least 2 (one input and one predicted token), got {seq_len}")
    text_len = seq_len - (bos is not None)
    n = len(tokens) // text_len
    if n < 1:
        raise LoraPruneError(f"text has {len(tokens)} tokens, shorter than one window of {seq_len}")
    cut = tokens[: n * text_len].reshape(n, text_len)
    return cut if bos is None else torch.cat([torch.full((n, 1), bos, dtype=cut.dtype), cut], dim=1)


def window_protocol(seq_len: int | None, bos: bool = False) -> str:
    """How perplexity windows were laid out, as every output states it."""
    return f"{seq_len}-token windows" + (", each starting with BOS" if bos else "")


def num_examples(examples) -> int:
    return len(next(iter(examples.values()))) if isinstance(examples, dict) else len(examples)


class BatchSampler:
    """Endless [batch_size, seq_len] training batches of windows, reproducible by seed.
    `windows` may also be a dict of tensors with one row per example: batches are then dicts.

    Each epoch is a fresh permutation drawn from (seed, epoch), so the position is just
    (epoch, pos): state_dict() / load_state_dict() resume exactly where a run stopped.

    Several processes (distributed.py): every rank draws the same global batch of
    batch_size x world_size examples and keeps rows rank, rank + world_size, ... of it, so the
    ranks' slices are disjoint and together are the batch one process with that batch size draws.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise LoraPruneError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise LoraPruneError(f"rank {rank} outside a world of {world_size} processes")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order, self._order_epoch = None, None

    def _permutation(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order, self._order_epoch = torch.randperm(num_examples(self.windows), generator=g), self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> torch.LongTensor:
        picked, need = [], self.batch_size * self.world_size
        while need:
            order = self._permutation()
            take = order[self.pos : self.pos + need]
            picked.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos == len(order):  # epoch done: continue in the next epoch's permutation
                self.epoch, self.pos = self.epoch + 1, 0
        index = torch.cat(picked)[self.rank :: self.world_size]
        if isinstance(self.windows, dict):  # examples of several tensors (e.g. inputs and targets)
            return {name: tensor[index] for name, tensor in self.windows.items()}
        return self.windows[index]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]


# ---- encoders: sentences (BERT embedding models) and images (ViT classifiers) ----

IMAGE_DATASETS = ("digits",)
DIGITS_SEED, DIGITS_TRAIN_FRACTION = 0, 0.8


def load_sentences(spec: str, split: str) -> list[str]:
    """One sentence per non-empty line of a text dataset (PTB: one sentence per line)."""
    return [line.strip() for line in load_text(spec, split).split("\n") if line.strip()]


def load_images(spec: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [n, 1, 8, 8] in [-1, 1], labels [n]) of an image dataset.

    'digits' is scikit-learn's load_digits (1797 8×8 gray images of 10 digits, values 0..16),
    split once by a fixed seed: 80% train (1438 images), 20% test (359); 'valid' is the test split.
    Pixels are v / 16 normalised with mean 0.5, std 0.5 (what the saved image processor does).
    """
    if split not in SPLITS:
        raise LoraPruneError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if spec not in IMAGE_DATASETS:
        raise LoraPruneError(f"unknown image dataset {spec!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    from sklearn.datasets import load_digits  # imported late: only this dataset needs it

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None]  # [n, 1, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SEED))
    cut = round_half_up(DIGITS_TRAIN_FRACTION * len(labels))
    index = order[:cut] if split == "train" else order[cut:]
    return (images[index] / 16 - 0.5) / 0.5, labels[index]


def pad_sentences(tokenizer, sentences: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of sentences, padded to the longest (truncated at max_length)."""
    if not sentences:
        raise LoraPruneError("no sentences to encode")
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no sentence of this batch uses (batches are cut from one padded set)."""
    if "attention_mask" not in batch:
        return batch
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] if k in ("input_ids", "attention_mask", "token_type_ids") else v for k, v in batch.items()}
