"""Held-out perplexity of a loaded bundle (`llmc eval BUNDLE --perplexity FILE`): what judges quantization, sparsity
and every other lossy option by measured quality.

The text is tokenized with the bundle's tokenizer and cut into consecutive windows of seq_len + 1 tokens; each
window scores its seq_len next-token predictions, each from the context since the window's start, exactly as
scripts/train_embedded.py's `heldout_perplexity` does on the eager model (so an fp32 bundle reproduces the
embedded model's recorded figure). The bundle's own graphs compute it, teacher-forced through the paged KV cache
one token per step for a batch of windows: every prediction goes through the path generation takes (decode
graph, paged attention over the cache and, with --attention-keep, its block selection).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmc.common.errors import UsageError

@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # predictions scored
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (f"perplexity {self.perplexity:.4f} over {self.tokens} tokens ({self.windows} windows of "
                f"{self.seq_len}), {self.seconds:.1f} s")


def read_text(path) -> str:
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None


def token_ids(engine, text: str) -> torch.Tensor:
    if engine.tokenizer is None:
        raise UsageError("this bundle has no tokenizer to read the perplexity file with")
    return torch.tensor(engine.tokenizer.encode(text).ids, dtype=torch.long)


def read_token_ids(engine, path) -> torch.Tensor:
    return token_ids(engine, read_text(path))


@torch.no_grad()
def perplexity(engine, token_ids: torch.Tensor, seq_len: int = 256, max_windows: int | None = None,
               batch_size: int = 16) -> PerplexityResult:
    """exp(mean negative log-likelihood) of the windows' predictions under the bundle's graphs."""
    if seq_len < 1 or seq_len > engine.max_seq_len:
        raise UsageError(f"--seq-len must be in 1..{engine.max_seq_len} (the bundle's --max-seq-len), got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"--batch must be at least 1, got {batch_size}")
    windows = (len(token_ids) - 1) // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise UsageError(f"the text holds {len(token_ids)} tokens: more than {seq_len} are needed to score one window")
    pool = engine.cache.pool
    batch_size = min(batch_size, windows, max(1, pool.num_free // pool.blocks_for(seq_len)))
    start, total_nll = time.perf_counter(), 0.0
    for first in range(0, windows, batch_size):
        starts = range(first * seq_len, min(windows, first + batch_size) * seq_len, seq_len)
        rows = torch.stack([token_ids[s:s + seq_len + 1] for s in starts])
        total_nll += _window_nll(engine, rows)
    tokens = windows * seq_len
    return PerplexityResult(math.exp(total_nll / tokens), tokens, windows, seq_len, time.perf_counter() - start)


def _window_nll(engine, rows: torch.Tensor) -> float:
    """Summed NLL of rows[:, 1:] given the tokens before, one decode step per position."""
    pool = engine.cache.pool
    seq_len = rows.shape[1] - 1
    blocks = [pool.allocate(pool.blocks_for(seq_len)) for _ in range(rows.shape[0])]
    try:
        nll = 0.0
        for t in range(seq_len):
            logits = engine.run_step("decode", blocks, [t] * len(blocks), rows[:, t:t + 1].tolist())
            nll += F.cross_entropy(logits.float().cpu(), rows[:, t + 1], reduction="sum").item()
        return nll
    finally:
        for b in blocks:
            pool.free(b)
