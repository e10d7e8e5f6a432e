"""Named model configurations, and the embedded default model that ships inside the package."""
from __future__ import annotations

from pathlib import Path

from . import llama, qwen3
from .config import ModelConfig

EMBEDDED_NAME = "llmc-tiny"
EMBEDDED_DIR = Path(__file__).parent / "embedded"

CONFIGS = {**qwen3.CONFIGS, **llama.CONFIGS}


def names() -> list[str]:
    return sorted([*CONFIGS, EMBEDDED_NAME])


def get_config(name: str) -> ModelConfig:
    """The config of a registry name (a fresh copy each call)."""
    key = name.lower()
    if key not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}, or a checkpoint directory")
    return CONFIGS[key]()
