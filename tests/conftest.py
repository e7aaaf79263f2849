import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
# contention made each forward ~100x slower (0.25 s instead of 2 ms).
torch.set_num_threads(1)

WORDS = "the cat sat on a mat dog ran to park and it was big small red blue".split()


@pytest.fixture
def tiny_tokenizer():
    """A WordLevel tokenizer: 17 words + <unk> + </s> (19 ids), an eos token but no pad token."""
    vocab = {word: i for i, word in enumerate(["<unk>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")
