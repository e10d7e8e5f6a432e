"""Resolves what the user named as MODEL: a registry name, the embedded model, or a checkpoint directory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmc.models import ModelConfig
from llmc.models.loader import CheckpointError, read_config
from llmc.models.registry import EMBEDDED_DIR, EMBEDDED_NAME, get_config, names

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class ModelSource:
    name: str
    config: ModelConfig
    weights_dir: Path | None  # None: compile without weights (bind them later)
    tokenizer_dir: Path | None
    eos_token_ids: list[int]


def eos_ids(directory: Path | None) -> list[int]:
    """eos_token_id from generation_config.json, else config.json (an int or a list in either)."""
    for name in ("generation_config.json", "config.json"):
        f = directory / name if directory else None
        if f and f.is_file():
            value = json.loads(f.read_text()).get("eos_token_id")
            if value is not None:
                return [value] if isinstance(value, int) else list(value)
    return []


def resolve(model: str | Path, weights: str | Path | bool | None = None) -> ModelSource:
    """weights: a checkpoint directory to bind, None for the model's own (a checkpoint directory's), or False to
    compile from the config alone."""
    path = Path(model)
    text = str(model)
    if text.lower() == EMBEDDED_NAME:
        path = EMBEDDED_DIR
    if path.is_dir():
        config = read_config(path)
        weights_dir = Path(weights) if weights else (None if weights is False else path)
        name = text if text.lower() == EMBEDDED_NAME else path.resolve().name
    elif "/" in text or text.startswith("."):
        raise CheckpointError(f"{text} does not exist (expected a checkpoint directory or one of: {', '.join(names())})")
    else:
        try:
            config = get_config(text)
        except KeyError as e:
            raise CheckpointError(e.args[0]) from None
        weights_dir, name = (Path(weights) if weights else None), text.lower()
    if weights_dir is not None:
        if not weights_dir.is_dir():
            raise CheckpointError(f"--weights {weights_dir} is not a directory")
        if weights_dir != path:
            checkpoint = read_config(weights_dir)
            if not checkpoint.same_model(config):
                raise CheckpointError(f"--weights {weights_dir} holds a different model than {text}")
    tok_dir = next((d for d in (weights_dir, path if path.is_dir() else None)
                    if d is not None and (d / "tokenizer.json").is_file()), None)
    return ModelSource(name, config, weights_dir, tok_dir, eos_ids(weights_dir or (path if path.is_dir() else None)))
