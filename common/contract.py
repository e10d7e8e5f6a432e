"""The contract between compiler/ and runtime/: what a bundle holds and what a step graph takes and returns.

compiler/ writes bundles (compiler/artifact.py) and traces the step graphs (compiler/trace.py); runtime/ reads
them (runtime/bundle.py) and runs them (runtime/engine.py, onnx.py, tensorrt.py). Both import the names, defaults
and the manifest type from here and nothing of each other, so the two sides cannot drift apart.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from llmc.common.errors import LlmcError

FORMAT = "llmc-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
KERNELS_DIR = "kernels"
# The tokenizer files a bundle may carry: only these are copied, so that pointing a compile at a checkpoint
# directory does not drag its weights in.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)

HASH_CHUNK = 1 << 20

# How a bundle's step graphs run: graph.json + Triton kernels, an ONNX model for onnxruntime, or that ONNX with
# TensorRT builder settings (the engine is built on the GPU host).
BACKENDS = ("triton", "onnx", "tensorrt")
KV_BLOCK_SIZE = 16  # tokens per KV-cache block: the traced graphs and the runtime's cache agree on it
DEFAULT_MAX_BATCH = 32  # the runtime's default largest batch; TensorRT's optimization profiles stop there

# A step graph's inputs and outputs, in call order (the engine calls graph(*STEP_INPUTS) -> STEP_OUTPUTS).
# slot_mapping: where each new token's keys and values go; graphs exported to ONNX / TensorRT take no slots
# (EXPORTED_INPUTS) and return the keys for the engine to write.
STEP_INPUTS = ("input_ids", "positions", "k_cache", "v_cache", "block_table", "past_lens", "last_index",
               "slot_mapping")
EXPORTED_INPUTS = STEP_INPUTS[:-1]
STEP_OUTPUTS = ("logits", "new_k", "new_v")


class ManifestError(LlmcError, ValueError):
    """A manifest that is not one this llmc reads or writes (the reader and the writer word it for the user)."""


@dataclass
class Manifest:
    """manifest.json, typed: the fields every bundle has; `extra` holds the optional ones (backend, quant, sparsity,
    kernels, toolchain, ...) as they are stored. `files` maps every other file of the bundle to its sha256."""

    model: dict
    target: dict
    dtype: str
    max_seq_len: int
    block_size: int
    eos_token_ids: list
    passes: list
    has_weights: bool = True
    files: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"format": FORMAT, "format_version": self.format_version}
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "format_version")})
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data) -> Manifest:
        """The manifest of `data` (parsed manifest.json); ManifestError names what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"manifest format is {found!r}, not {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"bundle format v{data.get('format_version')}, this llmc reads v{FORMAT_VERSION}")
        for name, kind in REQUIRED.items():
            if not isinstance(data.get(name), kind) or (kind is int and isinstance(data.get(name), bool)):
                raise ManifestError(f"missing or malformed {name!r}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known and k != "format"})


# Every field a manifest must carry, with its JSON type: defined once, checked by the reader and the writer.
REQUIRED = {"model": dict, "target": dict, "dtype": str, "max_seq_len": int, "block_size": int,
            "eos_token_ids": list, "passes": list, "has_weights": bool, "files": dict}


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Writes bundle/manifest.json in one rename: a reader sees the old manifest or the new, never a part."""
    write_atomically(Path(bundle) / MANIFEST, (json.dumps(manifest.to_json(), indent=2) + "\n").encode())


def write_atomically(path: Path, data) -> None:
    """Writes `data` (bytes-like) to path through a synced temporary beside it (".tmp-*", which a bundle's reader
    and the TensorRT build clean up after a crash) and one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_manifest(bundle: Path) -> Manifest:
    """bundle/manifest.json, checked (ManifestError, or OSError / JSONDecodeError for an unreadable file)."""
    return Manifest.from_json(json.loads((Path(bundle) / MANIFEST).read_text(encoding="utf-8")))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks: how a manifest names each file's content."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
