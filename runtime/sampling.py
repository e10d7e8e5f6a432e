"""Next-token sampling: greedy, temperature, nucleus (top-p), with one random generator per sequence.

Each row draws from its own generator, so a sequence's tokens depend only on its seed and its own logits,
not on which other sequences happen to share its batch.
"""
from __future__ import annotations

import torch

from llmc.common.errors import UsageError

def make_generators(seed: int | None, seq_ids: list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sequence, seeded seed + seq_id; seeded from OS entropy when seed is None."""
    generators = []
    for seq_id in seq_ids:
        generator = torch.Generator(device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed + seq_id)
        generators.append(generator)
    return generators


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Next tokens [B] (int64, on logits' device) from logits [B, V].

    temperature 0 is greedy. Otherwise the distribution is softmax(logits / temperature) in float32, cut to
    the nucleus (the fewest most likely tokens whose probabilities sum to at least top_p; the top token always
    stays) and renormalised. Row b draws with generators[b] (which may live on another device than logits);
    without generators the rows draw from torch's global generator.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if not temperature >= 0:
        raise UsageError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if generators is not None and len(generators) != logits.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {logits.shape[0]}; pass one per row")
    if temperature == 0:
        return logits.argmax(-1)
    probs = nucleus(torch.softmax(logits.float() / temperature, -1), top_p)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    if not generators:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    # A generator draws only on its own device: move the probabilities there once, not row by row.
    devices = {g.device for g in generators}
    if len(devices) == 1:
        probs = probs.to(devices.pop())
    tokens = [torch.multinomial(row.to(g.device), 1, generator=g) for row, g in zip(probs, generators)]
    return torch.cat([t.to(logits.device) for t in tokens])


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [B, V] with everything outside each row's top-p nucleus zeroed, renormalised."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(-1, descending=True)
    # A token stays when the tokens ranked above it sum to less than top_p: this keeps the token that reaches
    # top_p, and always the first one (nothing above it).
    mass_above = sorted_probs.cumsum(-1) - sorted_probs
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_above < top_p)
    kept = probs.masked_fill(~keep, 0)
    return kept / kept.sum(-1, keepdim=True)
