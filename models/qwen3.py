"""Qwen3 dense configurations, as published in each checkpoint's config.json."""
from .config import ModelConfig


def _qwen3(hidden, intermediate, layers, heads, tied):
    return ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
        num_heads=heads, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=tied, qk_norm=True, dtype="bfloat16")


CONFIGS = {
    "qwen3-0.6b": lambda: _qwen3(1024, 3072, 28, 16, True),
    "qwen3-1.7b": lambda: _qwen3(2048, 6144, 28, 16, True),
    "qwen3-4b": lambda: _qwen3(2560, 9728, 36, 32, True),
    "qwen3-8b": lambda: _qwen3(4096, 12288, 36, 32, False),
    "qwen3-14b": lambda: _qwen3(5120, 17408, 40, 40, False),
    "qwen3-32b": lambda: _qwen3(5120, 25600, 64, 64, False),
}
