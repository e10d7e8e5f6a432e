"""Plain-torch model definitions (Qwen3, Llama-3), their named configs and the Hugging Face loader."""
from .config import ModelConfig
from .transformer import PagedKV, Transformer

__all__ = ["ModelConfig", "PagedKV", "Transformer"]
