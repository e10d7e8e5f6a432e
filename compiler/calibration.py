"""Calibration inputs (`llmc compile --calibration FILE`): text cut into prompt windows, as the prefill graph's inputs.

SmoothQuant, AWQ and calibration-aware 2:4 pruning run these through the graph they rewrite and measure the
activations each GEMM sees (passes/calibrate.py). Each tuple is one batch of windows prefilled from an empty
cache, in the graph's placeholder order (compiler/trace.py): every window has its own blocks, so a graph that
writes the cache writes where nothing reads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc.common.errors import UsageError
from llmc.compiler.trace import cache_slots
from llmc.models import ModelConfig

DEFAULT_WINDOWS = 16
DEFAULT_SEQ_LEN = 256
BATCH = 4


@dataclass
class Calibration:
    inputs: list[tuple]  # graph inputs, one tuple per batch of windows
    record: dict  # what the manifest keeps: file name, sha256, windows, tokens per window


def read_calibration(path: str | Path, tokenizer_dir: Path | None, config: ModelConfig, dtype: torch.dtype,
                     block_size: int, max_seq_len: int, windows: int = DEFAULT_WINDOWS,
                     seq_len: int = DEFAULT_SEQ_LEN) -> Calibration:
    """Tokenizes the text file at `path` with the model's tokenizer and cuts it into `windows` windows of
    min(seq_len, max_seq_len) tokens (fewer windows when the text is shorter; at least one is needed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the calibration file {path}: {error}") from None
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise UsageError("--calibration needs the model's tokenizer (tokenizer.json beside its weights)")
    from tokenizers import Tokenizer

    ids = torch.tensor(Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).encode(text).ids)
    seq = min(seq_len, max_seq_len)
    count = min(windows, len(ids) // seq)
    if count < 1:
        raise UsageError(f"the calibration file {path} holds {len(ids)} tokens; it needs at least {seq}")
    rows = ids[: count * seq].view(count, seq)
    inputs = [prefill_inputs(rows[i:i + BATCH], config, dtype, block_size) for i in range(0, count, BATCH)]
    record = {"file": path.name, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "windows": count,
              "tokens_per_window": seq}
    return Calibration(inputs, record)


def prefill_inputs(rows: torch.Tensor, config: ModelConfig, dtype: torch.dtype, block_size: int) -> tuple:
    """The paged step's inputs prefilling `rows` [B, S] of token ids from an empty cache."""
    batch, seq = rows.shape
    per_row = -(-seq // block_size)
    cache = torch.zeros(config.num_layers, batch * per_row, block_size, config.num_kv_heads, config.head_dim,
                        dtype=dtype)
    table = torch.arange(batch * per_row).view(batch, per_row)
    past = torch.zeros(batch, dtype=torch.long)
    positions = torch.arange(seq).repeat(batch, 1)
    last = torch.full((batch,), seq - 1, dtype=torch.long)
    return rows, positions, cache, cache.clone(), table, past, last, cache_slots(table, past, seq, block_size)
