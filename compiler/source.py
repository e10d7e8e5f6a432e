"""Resolves what the user named as MODEL: a registry name, the embedded model, a packaged model, a checkpoint
directory or a GGUF file."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmc.models import ModelConfig
from llmc.models.gguf import GGUFFile, is_gguf
from llmc.models.loader import CheckpointError, read_config, stream_weights
from llmc.models.registry import EMBEDDED_DIR, EMBEDDED_NAME, PACKAGED, get_config, names, packaged_file


@dataclass
class ModelSource:
    name: str
    config: ModelConfig
    weights_dir: Path | None  # None: compile without weights (bind them later), or they come from `gguf`
    tokenizer_dir: Path | None
    eos_token_ids: list[int]
    gguf: GGUFFile | None = None  # the weights' file when they come from a GGUF
    # Holds the tokenizer files written from a GGUF's metadata for as long as the source lives.
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def has_weights(self) -> bool:
        return self.weights_dir is not None or self.gguf is not None

    def weight_stream(self, dtype: torch.dtype, progress: bool = False):
        """(name, tensor) one at a time, checked against the config before the first is read; None without weights."""
        if self.gguf is not None:
            return self.gguf.stream_weights(self.config, dtype, progress)
        if self.weights_dir is not None:
            return stream_weights(self.weights_dir, self.config, dtype, progress)
        return None

    def weight_notes(self, dtype: str) -> list[str]:
        """What happened to the stored formats on the way to `dtype` (report lines)."""
        return self.gguf.weight_notes(dtype) if self.gguf is not None else []


def eos_ids(directory: Path | None) -> list[int]:
    """eos_token_id from generation_config.json, else config.json (an int or a list in either)."""
    for name in ("generation_config.json", "config.json"):
        f = directory / name if directory else None
        if f and f.is_file():
            value = json.loads(f.read_text()).get("eos_token_id")
            if value is not None:
                return [value] if isinstance(value, int) else list(value)
    return []


def _from_gguf(file: Path, name: str, with_weights: bool) -> ModelSource:
    gguf = GGUFFile(file)
    config = gguf.config()
    scratch = tempfile.TemporaryDirectory(prefix="llmc-gguf-tokenizer-")
    gguf.write_tokenizer(Path(scratch.name))
    return ModelSource(name, config, None, Path(scratch.name), gguf.eos_token_ids(),
                       gguf=gguf if with_weights else None, scratch=scratch)


def resolve(model: str | Path, weights: str | Path | bool | None = None) -> ModelSource:
    """weights: a checkpoint directory or GGUF file to bind, None for the model's own (a checkpoint's), or False to
    compile from the config alone."""
    path = Path(model)
    text = str(model)
    if text.lower() in PACKAGED:
        path = packaged_file(text)
    if text.lower() == EMBEDDED_NAME:
        path = EMBEDDED_DIR
    if is_gguf(path):
        if weights:
            raise CheckpointError(f"{text} is a GGUF file and holds its own weights: --weights does not apply")
        name = text.lower() if text.lower() in PACKAGED else path.stem
        return _from_gguf(path, name, weights is not False)
    if path.is_file():
        raise CheckpointError(f"{text} is neither a GGUF file nor a checkpoint directory")
    if path.is_dir():
        config = read_config(path)
        weights_dir = Path(weights) if weights else (None if weights is False else path)
        name = text if text.lower() == EMBEDDED_NAME else path.resolve().name
    elif "/" in text or text.startswith("."):
        raise CheckpointError(f"{text} does not exist (expected a checkpoint directory, a GGUF file or one of: "
                              f"{', '.join(names())})")
    else:
        try:
            config = get_config(text)
        except KeyError as e:
            raise CheckpointError(e.args[0]) from None
        weights_dir, name = (Path(weights) if weights else None), text.lower()
    if weights_dir is not None and is_gguf(weights_dir):
        source = _from_gguf(weights_dir, name, True)
        if not source.config.same_model(config):
            raise CheckpointError(f"--weights {weights_dir} holds a different model than {text}")
        return source
    if weights_dir is not None:
        if not weights_dir.is_dir():
            raise CheckpointError(f"--weights {weights_dir} is not a directory or a GGUF file")
        if weights_dir != path:
            checkpoint = read_config(weights_dir)
            if not checkpoint.same_model(config):
                raise CheckpointError(f"--weights {weights_dir} holds a different model than {text}")
    tok_dir = next((d for d in (weights_dir, path if path.is_dir() else None)
                    if d is not None and (d / "tokenizer.json").is_file()), None)
    return ModelSource(name, config, weights_dir, tok_dir, eos_ids(weights_dir or (path if path.is_dir() else None)))
