"""Launcher of llmc::sparse_paged_attention: the block selection in torch, then the attention_sparse kernel over the
kept key blocks only (templates/attention_sparse.py.j2), and for decode attention_combine over its splits.

Selection (cheap next to attention, and the op's own code: codegen/sparse_attention.select_blocks): pooled
queries and keys in float32, block scores, a stable sort. It reads every key the table addresses once (the
pooled keys), and allocates [B, H, NQ, NK] int32 lists; everything is sized from shapes alone, so the launch
plans on meta tensors like the dense ones. The kept list of (b, h, query block) holds its block indices
ascending, padded with NK; kept_count says how many are real.

Block sizes: the selection block `block` is any number of tokens (the kernel reads the cache one table entry
per key, so `block` need not be a multiple of the cache block). Query tiles of block_m <= next_pow2(block) rows
never straddle two query blocks; key tiles of block_n, the largest power of two dividing `block` (at least 16,
tl.dot's minimum, at most the table's block_n), tile each key block without a partial tile where possible.
Decode splits the kept list of each (sequence, head) over enough programs to fill the GPU, as the dense decode
splits its keys; the splits count is a runtime value of the grid and the combine, never part of a spec.
"""
from __future__ import annotations

import math

import torch
import triton

from llmc.codegen import sparse_attention
from llmc.codegen.triton import attention, configs
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.hooks import current_arch, dtype_name, empty_output, load

OP = "sparse_paged_attention"


def kept_lists(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, NQ, NK] bool -> (kept block indices ascending, padded with NK, [B, H, NQ, NK] int32; counts
    [B, H, NQ] int32)."""
    num_k = kept.shape[-1]
    index = torch.arange(num_k, dtype=torch.int32, device=kept.device)
    ordered = torch.where(kept, index, num_k).sort(-1).values
    return ordered.to(torch.int32).contiguous(), kept.sum(-1, dtype=torch.int32).contiguous()


def tile_sizes(config: Config, block: int) -> tuple[int, int]:
    """(block_m, block_n) of the prefill kernel for selection blocks of `block` tokens."""
    block_m = max(16, min(config.block_m, triton.next_power_of_2(block)))
    block_n = max(16, min(config.block_n, block & -block))
    return block_m, block_n


def decode_splits(batch: int, heads: int, max_kept: int, sm_count: int) -> int:
    """Programs per (sequence, head): two per SM over the batch and heads, never more than the kept blocks."""
    return max(1, min(-(-2 * sm_count // max(1, batch * heads)), max_kept))


def launch_sparse_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, block_table: torch.Tensor, past_lens: torch.Tensor,
                                  scale: float, window: int, keep: float, block: int, *, config: Config | None = None,
                                  num_splits: int | None = None, poison: bool = False) -> torch.Tensor:
    """S > 1: one program per (query tile, sequence and head) over its query block's kept key blocks; S == 1:
    split decode plus combine (num_splits overrides the launcher's choice). `config` overrides the table's."""
    attention._check_qkv(OP, q, k, v, window)
    attention._check_cache(k, k_cache, v_cache, block_table, past_lens)
    sparse_attention.check_sparsity(keep, block)
    batch, seq, heads, head_dim = q.shape
    out = empty_output(q.shape, q.dtype, q.device, poison)
    if batch * seq * heads * head_dim == 0:
        return out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    block_table, past_lens = block_table.contiguous(), past_lens.contiguous()
    kept = sparse_attention.select_blocks(q, k, k_cache, block_table, past_lens, scale, window, keep, block)
    kept, kept_count = kept_lists(kept)
    num_query_blocks, num_key_blocks = kept.shape[2:]
    arch = current_arch(q.device)
    kind = "prefill" if seq > 1 else "decode"
    tokens = seq if seq > 1 else block_table.shape[1] * k_cache.shape[1]
    config = config or configs.pick_attention(kind, arch, head_dim, tokens, q.element_size())
    block_m, block_n = tile_sizes(config, block)
    spec = dict(dtype=dtype_name(q, "q"), heads=heads, kv_heads=k.shape[2], head_dim=head_dim, windowed=window > 0,
                decode=seq == 1, block=block, cache_block_size=k_cache.shape[1], block_m=block_m if seq > 1 else 1,
                block_n=block_n, num_warps=config.num_warps, num_stages=config.num_stages)
    kernel = load("attention_sparse", **spec)
    inputs = (q, k, v, k_cache, v_cache, block_table, past_lens, kept, kept_count)
    strides = [*(x.stride(d) for x in (q, k, v) for d in (0, 1, 2)),
               *(x.stride(d) for x in (k_cache, v_cache) for d in (0, 1, 2)), block_table.stride(0),
               num_query_blocks, num_key_blocks, float(scale), int(window)]
    launch_options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if seq > 1:
        grid = (num_query_blocks * triton.cdiv(block, block_m), batch * heads)
        kernel[grid](*inputs, out, seq, *strides, **launch_options)
        return out
    max_kept = min(num_key_blocks, math.ceil(keep * num_key_blocks) + 2)  # + the sink and the diagonal
    splits = num_splits or decode_splits(batch, heads, max_kept, attention._sm_count(q.device, arch))
    block_d = max(16, triton.next_power_of_2(head_dim))
    maxima = empty_output((batch, heads, splits), torch.float32, q.device, poison)
    sums = empty_output((batch, heads, splits), torch.float32, q.device, poison)
    accs = empty_output((batch, heads, splits, block_d), torch.float32, q.device, poison)
    kernel[(batch, heads, splits)](*inputs, maxima, sums, accs, seq, *strides, **launch_options)
    combine = load("attention_combine", dtype=dtype_name(q, "q"), head_dim=head_dim,
                   block_s=attention.COMBINE_SPLITS_PER_STEP, num_warps=1)
    combine[(batch * heads,)](maxima, sums, accs, out, splits, num_warps=1)
    return out


def example_inputs(shapes: dict, dtype: torch.dtype, device: str) -> tuple:
    """paged_attention's example inputs (attention.example_inputs' shapes) and keep, block: shapes["keep"]
    (default 0.2), shapes["block"] (default 2 cache blocks)."""
    inputs = attention.example_inputs("paged_attention", shapes, dtype, device)
    return (*inputs, shapes.get("keep", 0.2), shapes.get("block", 2 * shapes.get("bs", 16)))
