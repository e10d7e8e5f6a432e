"""The attention masks block_attention accepts, each only where proven: our paged step's mask (cached positions,
then causal) and transformers 5's sdpa masks, causal or sliding-window, in both orders transformers has built them
(packed-sequence ids first, and from 5.2x the positions first). A mask is a Pattern traced from plain torch that
writes it as the model does; the checks on a match prove its index ranges are aranges over the right sizes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_weights import val
from .pattern import Pattern

aten = torch.ops.aten
WINDOW = 1234567  # sentinel traced in a sliding window's place
# Ops whose literals are sizes: the graph has symbolic sizes there; the checks compare them instead.
SIZE_OPS = (aten.expand.default, aten.view.default, aten._unsafe_view.default, aten.arange.default,
            aten.ones.default)
B, S, BLOCK, MAX_BLOCKS = 3, 5, 4, 2  # the sizes the patterns are traced at


def paged_mask(past_lens):
    past = MAX_BLOCKS * BLOCK
    past_ok = torch.arange(past)[None, :] < past_lens[:, None]  # [B, P]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    return torch.cat([past_ok[:, None, :].expand(B, S, past), causal[None].expand(B, S, S)], -1)[:, None]


def _index_spaces(positions, batch_range, q_range, kv_range):
    """What transformers 5's sdpa_mask indexes, as exported: packed-sequence ids (a new sequence wherever the
    positions do not grow by one), the batch / query / key index ranges over [B, 1, S, S], and the positions."""
    b = batch_range.shape[0]
    position_ids = positions.expand(b, -1)
    first = position_ids[:, :1] - 1
    packed = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    bi = batch_range[:, None, None, None]
    qi, ki = (q_range + 0)[None, None, :, None], (kv_range + 0)[None, None, None, :]
    return packed, bi, qi, ki, positions.expand(b, -1)


def _packed_sequences(positions, batch_range, q_range, kv_range):
    """transformers 5's sdpa_mask: and_masks(packed-sequence ids, mask on position_ids) expanded over [B, 1, S, S]
    index ranges. Returns (same sequence, query positions, key positions, B, S)."""
    packed, bi, qi, ki, position_ids = _index_spaces(positions, batch_range, q_range, kv_range)
    same_sequence = qi.new_ones((), dtype=torch.bool) & (packed[bi, qi] == packed[bi, ki])
    return same_sequence, position_ids[bi, qi], position_ids[bi, ki], batch_range.shape[0], positions.shape[1]


def transformers_causal_mask(positions, batch_range, q_range, kv_range):
    same_sequence, query, key, b, s = _packed_sequences(positions, batch_range, q_range, kv_range)
    return (same_sequence & (key <= query)).expand(b, -1, s, s)


def transformers_sliding_mask(positions, batch_range, q_range, kv_range, window=WINDOW):
    same_sequence, query, key, b, s = _packed_sequences(positions, batch_range, q_range, kv_range)
    inside = query.new_ones((), dtype=torch.bool) & (key > query - window)
    return (same_sequence & (inside & (key <= query))).expand(b, -1, s, s)


def transformers_causal_mask_positions_first(positions, batch_range, q_range, kv_range):
    """transformers 5.2x's order: and_masks(mask on positions, packed-sequence ids)."""
    same_sequence, query, key, b, s, qi = _positions_first(positions, batch_range, q_range, kv_range)
    causal = qi.new_ones((), dtype=torch.bool) & (key <= query)
    return (causal & same_sequence).expand(b, -1, s, s)


def transformers_sliding_mask_positions_first(positions, batch_range, q_range, kv_range, window=WINDOW):
    same_sequence, query, key, b, s, qi = _positions_first(positions, batch_range, q_range, kv_range)
    inside = query.new_ones((), dtype=torch.bool) & (key > query - window)
    causal = qi.new_ones((), dtype=torch.bool) & (inside & (key <= query))
    return (causal & same_sequence).expand(b, -1, s, s)


def _positions_first(positions, batch_range, q_range, kv_range):
    """As _packed_sequences, for the masks that test the positions before the packed-sequence ids."""
    packed, bi, qi, ki, position_ids = _index_spaces(positions, batch_range, q_range, kv_range)
    query, key = position_ids[bi, qi], position_ids[bi, ki]
    b, s = batch_range.shape[0], positions.shape[1]
    return packed[bi, qi] == packed[bi, ki], query, key, b, s, qi


def _ranges(_):
    return torch.arange(S)[None], torch.arange(B), torch.arange(S), torch.arange(S)


PAGED_MASK = Pattern("paged_mask", [paged_mask], lambda _: (torch.randint(0, 9, (B,)),), dtypes=(torch.float32,),
                     free_literal_ops=SIZE_OPS)
CAUSAL_MASKS = [Pattern("causal_mask", [transformers_causal_mask, transformers_causal_mask_positions_first], _ranges,
                        dtypes=(torch.float32,), free_literal_ops=SIZE_OPS),
                Pattern("sliding_mask", [transformers_sliding_mask, transformers_sliding_mask_positions_first],
                        _ranges, dtypes=(torch.float32,), scalars={"window": WINDOW}, free_literal_ops=SIZE_OPS)]


@functools.cache
def additive_mask_pattern(dtype: torch.dtype) -> Pattern:
    def additive_mask(mask):
        return torch.where(mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    return Pattern(f"additive_mask_{dtype}", [additive_mask], lambda _: (torch.ones(B, 1, S, S, dtype=torch.bool),),
                   dtypes=(dtype,))


@dataclass
class PagedMask:
    past_lens: Node
    past: object  # P, the keys read from the cache (int or SymInt)
    seq: object  # S


def paged_masks(graph: Graph) -> dict[Node, PagedMask]:
    masks = {}
    for match in PAGED_MASK.find(graph):
        (arange,) = [n for n in match.nodes if n.target == aten.arange.default]
        (ones,) = [n for n in match.nodes if n.target == aten.ones.default]
        batch, past, seq = match.val("past_lens").shape[0], val(arange).shape[0], val(ones).shape[0]
        if (_is_arange(arange) and val(ones).dtype == torch.bool and _same(val(ones).shape, [seq, seq])
                and _same(val(match.outputs[0]).shape, [batch, 1, seq, past + seq])):
            masks[match.outputs[0]] = PagedMask(match.inputs["past_lens"], past, seq)
    return masks


def causal_masks(graph: Graph) -> dict[Node, int]:
    """Proven causal masks -> their window (0: full causal)."""
    masks = {}
    for pattern in CAUSAL_MASKS:
        for match in pattern.find(graph):
            mask, ranges = val(match.outputs[0]), [match.inputs[n] for n in ("batch_range", "q_range", "kv_range")]
            seq, window = match.val("positions").shape[1], match.scalars.get("window", 0)
            if (_is_position_row(match.inputs["positions"]) and all(_is_arange(r) for r in ranges)
                    and _same([val(r).shape[0] for r in ranges], [mask.shape[0], seq, seq])
                    and _same(mask.shape, [mask.shape[0], 1, seq, seq]) and isinstance(window, int) and window >= 0
                    and (window > 0) == (pattern.name == "sliding_mask")):
                masks[match.outputs[0]] = window
    return masks


def _is_arange(node: Node) -> bool:
    """arange(n): 0, 1, ..., n - 1."""
    return node.target == aten.arange.default and len(node.args) == 1 and set(node.kwargs) <= {
        "dtype", "layout", "device", "pin_memory"}


def _is_position_row(node: Node) -> bool:
    """(arange(n) + c)[None]: positions that grow by one, as transformers builds them without a cache."""
    if node.target != aten.unsqueeze.default or node.args[1] != 0 or not isinstance(node.args[0], Node):
        return False
    source = node.args[0]
    if source.target == aten.add.Tensor and isinstance(source.args[1], int) and not source.kwargs:
        source = source.args[0]
    return isinstance(source, Node) and _is_arange(source)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))
