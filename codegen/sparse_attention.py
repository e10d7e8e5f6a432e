"""llmc::sparse_paged_attention: paged_attention restricted to the key blocks each query block selects (block-sparse
attention, issue 7: "keep the top fraction of key blocks per query block").

Blocks. Sequence b's positions 0 .. past + S - 1 (cached keys, then the step's new ones) fall into key blocks of
`block` tokens (block j: positions [j * block, (j + 1) * block)); the query at position past + i belongs to query
block (past + i) // block. Both grids start at position 0, so query block n overlaps exactly key block n.

Selection, per (sequence b, query head h, query block n):
- pooled query = mean of the block's query rows (rows 0 <= i < S whose position falls in it); pooled key of key
  block j = mean of its keys (kv head h // (H // Hkv), cached and new alike); score = pooled_q . pooled_k * scale,
  all in float32;
- key block j is visible if some query of block n may see some key of it (causal, and within the window);
- always kept: key block 0 (the attention sink) and key block n (the diagonal), where visible; then the
  top-scoring other visible blocks (ties: lower index first) until ceil(keep * visible) blocks are kept in all
  (never fewer than the forced ones). keep * visible within 1e-6 of an integer counts as that integer:
  0.28 * 25 is 7.000000000000001 in floating point, and must keep 7 blocks, not 8.
Attention is then paged_attention's (same masks, scale, window, GQA, padding rules) over the kept blocks' keys.
keep >= 1 keeps every visible block: the op returns paged_attention itself, bit for bit.

Right-padded batches: the op cannot tell padding rows from real ones, so a query block holding both pools the
padding queries too (its selection may shift); the padding keys only reach the pooled key of that same block,
the diagonal, which is kept whatever its score. Real rows never attend padding keys (causal).

`select_blocks` is shared with the Triton launcher (codegen/triton/sparse_attention.py), which turns its mask
into per-(b, h, query block) lists of kept key blocks: one selection rule, one implementation. It is batched
(no Python loop, no data-dependent shape), so it also runs on meta tensors while a graph's kernels are planned.
Sources: Xiao et al. 2023 (StreamingLLM: the attention sink), Tang et al. 2024 (Quest: per-block key
summaries), Jiang et al. 2024 (MInference: block-sparse prefill), Lu et al. 2025 (MoBA: mean-pooled block gates).
"""
from __future__ import annotations

import math

import torch

from llmc.codegen.ops import _check_attention_heads, paged_attention

ROUNDING_SLACK = 1e-6  # keep * visible this close above an integer counts as that integer


def check_sparsity(keep: float, block: int, op: str = "sparse_paged_attention") -> None:
    if not (isinstance(keep, (int, float)) and keep >= 0 and math.isfinite(keep)):
        raise ValueError(f"{op}: keep {keep!r} must be a fraction >= 0 (1 keeps every block)")
    if not (isinstance(block, int) and block >= 1):
        raise ValueError(f"{op}: block {block!r} must be a positive number of tokens")


def query_block_count(seq: int, block: int) -> int:
    """The most query blocks `seq` new tokens span, whatever the past: (S + block - 2) // block + 1."""
    return (seq + block - 2) // block + 1


def key_block_bound(seq: int, table_width: int, cache_block_size: int, block: int) -> int:
    """Key blocks enough for any past the table can hold: positions up to table_width * cache_block_size + S - 1
    (a bound from shapes alone, for launches planned on meta tensors)."""
    return -(-(table_width * cache_block_size + seq) // block)


def _pooled_queries(q: torch.Tensor, past: torch.Tensor, block: int, num_q: int) -> torch.Tensor:
    """[B, NQ, H, D] float32: the mean of each query block's rows (query block past // block + n at n)."""
    batch, seq = q.shape[:2]
    rows = (torch.arange(batch, device=q.device)[:, None].expand(batch, seq),
            (past[:, None] + torch.arange(seq, device=q.device)) // block - (past // block)[:, None])
    total = q.new_zeros(batch, num_q, *q.shape[2:], dtype=torch.float32).index_put(rows, q.float(), accumulate=True)
    count = q.new_zeros(batch, num_q, dtype=torch.float32).index_put(rows, q.new_ones(()).float().expand(batch, seq),
                                                                     accumulate=True)
    return total / count.clamp(min=1)[..., None, None]


def gather_positions(new: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, past: torch.Tensor,
                     length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [B, length, Hkv, D], present [B, length]): sequence b's keys (or values) at positions 0 .. length - 1:
    the cache's through the block table below past[b], the step's `new` ones from there to past[b] + S, zeros
    beyond. Cache slots at or past past[b] are never read (where, not a product: they may hold NaN)."""
    batch, seq = new.shape[:2]
    positions = torch.arange(length, device=new.device)
    cached = positions < past[:, None]  # [B, T]
    table_positions = block_table.shape[1] * cache.shape[1]
    gathered = cache[block_table].flatten(1, 2)[:, :length]  # [B, MB * BS, Hkv, D], whole blocks
    x = torch.where(cached[:, :table_positions, None, None], gathered, 0)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, length - x.shape[1]))
    rows = (torch.arange(batch, device=new.device)[:, None].expand(batch, seq),
            past[:, None] + torch.arange(seq, device=new.device))
    return x.index_put(rows, new), positions < (past + seq)[:, None]


def block_visibility(past: torch.Tensor, seq: int, block: int, window: int, num_q: int,
                     num_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, forced), both [B, NQ, NK] bool: some query of query block past // block + n may see some key of
    key block j; and the visible blocks always kept (the sink, j = 0, and the diagonal)."""
    query_block = past[:, None] // block + torch.arange(num_q, device=past.device)  # [B, NQ]
    first_query = torch.maximum(past[:, None], query_block * block)
    last_query = torch.minimum((past + seq - 1)[:, None], query_block * block + block - 1)
    key_block = torch.arange(num_k, device=past.device)
    visible = (first_query <= last_query)[..., None] & (key_block * block <= last_query[..., None])
    if window > 0:  # the block's first query still sees the block's last key
        visible &= first_query[..., None] - (key_block * block + block - 1) < window
    forced = visible & ((key_block == 0) | (key_block == query_block[..., None]))
    return visible, forced


def select_blocks(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                  past_lens: torch.Tensor, scale: float, window: int, keep: float, block: int) -> torch.Tensor:
    """[B, H, NQ, NK] bool (query_block_count, key_block_bound): key block j kept for query block
    past_lens[b] // block + n of query head h. The rule is the module docstring's."""
    num_k = key_block_bound(q.shape[1], block_table.shape[1], k_cache.shape[1], block)
    keys, present = gather_positions(k, k_cache, block_table, past_lens, num_k * block)
    return _select(q, keys, present, past_lens, scale, window, keep, block)


def _select(q: torch.Tensor, keys: torch.Tensor, present: torch.Tensor, past_lens: torch.Tensor, scale: float,
            window: int, keep: float, block: int) -> torch.Tensor:
    """select_blocks on keys already gathered by position ([B, NK * block, Hkv, D], present [B, NK * block])."""
    batch, seq, heads, head_dim = q.shape
    kv_heads, num_q, num_k = keys.shape[2], query_block_count(seq, block), keys.shape[1] // block
    pooled_q = _pooled_queries(q, past_lens, block, num_q).view(batch, num_q, kv_heads, heads // kv_heads, head_dim)
    key_sums = keys.view(batch, num_k, block, kv_heads, head_dim).sum(2, dtype=torch.float32)
    pooled_k = key_sums / present.view(batch, num_k, block).sum(-1).clamp(min=1)[..., None, None]
    scores = torch.einsum("bnhgd,bkhd->bhgnk", pooled_q, pooled_k).reshape(batch, heads, num_q, num_k) * scale
    visible, forced = block_visibility(past_lens, seq, block, window, num_q, num_k)
    visible, forced = visible[:, None], forced[:, None]  # one geometry for every head
    ranked = torch.where(forced, float("inf"), torch.where(visible, scores, float("-inf")))
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)  # stable: ties go to the lower index
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(num_k, device=q.device).expand_as(order))
    wanted = torch.ceil(visible.sum(-1).double() * keep - ROUNDING_SLACK).long()
    budget = torch.maximum(wanted, forced.sum(-1))
    return visible & (rank < budget[..., None])


@torch.library.custom_op("llmc::sparse_paged_attention", mutates_args=())
def sparse_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_table: torch.Tensor, past_lens: torch.Tensor, scale: float,
                           window: int, keep: float, block: int) -> torch.Tensor:
    """paged_attention (q [B, S, H, D]; k / v [B, S, Hkv, D]; caches [NB, BS, Hkv, D]; block_table [B, MB];
    past_lens [B]) over only the key blocks the module docstring's rule keeps for each query block: the fraction
    `keep` of the visible blocks of `block` tokens, the sink and the diagonal always among them.

    Vectorised over the batch: the sequences' keys and values gathered position by position (zeros past each
    one's end, never visible), one selection, one SDPA call whose mask is paged_attention's and'ed with the kept
    blocks of each head and query block.
    """
    _check_attention_heads(q, k, v, "sparse_paged_attention")
    check_sparsity(keep, block)
    if keep >= 1 or q.numel() == 0:
        return paged_attention(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window)
    batch, seq = q.shape[:2]
    num_k = -(-(int(past_lens.max()) + seq) // block)  # tighter than key_block_bound: no table padding
    keys, present = gather_positions(k, k_cache, block_table, past_lens, num_k * block)  # [B, T, Hkv, D]
    values, _ = gather_positions(v, v_cache, block_table, past_lens, num_k * block)
    kept = _select(q, keys, present, past_lens, scale, window, keep, block)  # [B, H, NQ, NK]
    query_positions = past_lens[:, None] + torch.arange(seq, device=q.device)  # [B, S]
    query_block = query_positions // block - (past_lens // block)[:, None]  # into kept's NQ
    chosen = kept[torch.arange(batch, device=q.device)[:, None], :, query_block]  # [B, S, H, NK]
    chosen = chosen.repeat_interleave(block, -1).transpose(1, 2)  # [B, H, S, T]
    offset = query_positions[:, :, None] - torch.arange(num_k * block, device=q.device)  # [B, S, T]
    visible = (offset >= 0) & (offset < window) if window > 0 else offset >= 0
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, None] & chosen,
        scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).contiguous()


@sparse_paged_attention.register_fake
def _sparse_paged_attention_fake(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window, keep, block):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
