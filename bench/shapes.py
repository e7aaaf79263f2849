"""The model shapes the memory benchmarks build: published configurations, typed in (nothing is
downloaded; random weights are enough for memory and time)."""

# config.json of each model; `tiny` is the CI toy of the same family
SHAPES = {
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "smollm2-360m": ("llama", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rope_theta=100000.0)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0)),
    "smollm2-1.7b": ("llama", dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rope_theta=130000.0)),
    "llama-3.2-3b": ("llama", dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                   tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0)),
    "qwen2.5-3b": ("qwen2", dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                                 max_position_embeddings=32768, rope_theta=1000000.0)),
    "llama-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                               max_position_embeddings=2048)),
}  # fmt: skip
SIZES = [name for name in SHAPES if name != "tiny"]


def model_config(shape: str):
    """The transformers config of a shape in SHAPES."""
    from transformers import AutoConfig

    model_type, values = SHAPES[shape]
    return AutoConfig.for_model(model_type, **values)
