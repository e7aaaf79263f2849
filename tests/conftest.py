import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
# contention made each forward ~100x slower (0.25 s instead of 2 ms).
torch.set_num_threads(1)

WORDS = "the cat sat on a mat dog ran to park and it was big small red blue".split()


def make_tokenizer():
    """A WordLevel tokenizer: 17 words + <unk> + </s> (19 ids), an eos token but no pad token."""
    vocab = {word: i for i, word in enumerate(["<unk>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_tokenizer_module():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A saved tiny llama (6 heads sharing 2 k/v heads) with a tokenizer, as a user's model folder."""
    from tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    """A .txt corpus of a few thousand tokens in the tiny tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)))
    return path


@pytest.fixture
def ctrl_c_at_window(monkeypatch):
    """ctrl_c_at_window(n): Ctrl-C once the dense model's top-k of n windows are kept (teacher_cache.py);
    ctrl_c_at_window(None): no more."""
    from loraprune.pipeline import teacher_cache

    write = teacher_cache._write

    def stop_at(windows_done: int | None) -> None:
        def writing(path, value):
            write(path, value)
            if path.name == teacher_cache.DONE and value == windows_done:
                raise KeyboardInterrupt

        monkeypatch.setattr(teacher_cache, "_write", write if windows_done is None else writing)

    return stop_at
