"""llmc::paged_attention_cpu: llmc::paged_attention (same schema, same meaning, same fake) computed the way a CPU
is fast at it; passes/lower_cpu.py puts it in the reference's place in cpu bundles.

How. Row b (a sequence) attends a contiguous run of positions: its cached ones from where the window starts for the
step's first query (0 without a window) up to its past length, then the step's own keys. Rows go in groups of
consecutive rows whose gathered keys fit GROUP_BYTES (the values as much again). Per group, one copy gathers exactly
each row's cached keys (nothing at or past a row's length, nothing the table only pads with: unused slots may hold
anything, NaN included), the step's keys go right after each row's own, and one SDPA call attends the group. On
CPU that is the flash kernel the reference calls too (scores, softmax and the sum over keys in float32, the
probabilities rounded to q's dtype before the product with V, so bf16 rounds as the reference rounds), with no mask
where none is needed (a lone decode row, decode rows of equal length: the window only moves where the keys start),
SDPA's causal flag for a prefill with nothing cached, else a [G, 1, S, T + S] bool mask (ragged rows, chunked
prefill). A lone row gathers its blocks whole (one copy per block); a group, token by token through a slot table
whose padding repeats a real token. No dense mask over the table, no where / cat passes over the past.

Measured (one layer, 2 threads, OMP_WAIT_POLICY=PASSIVE, 2-core Intel Xeon with AMX, torch 2.13; decode pasts drawn
from [ctx / 2, ctx]; reference time / variant time, medians of 7 samples, the variants alternated in one run):
- every row alone (split by sequence, GROUP_BYTES 0): best for large rows (qwen3-0.6b heads, batch 32, ctx 2048:
  16.9x fp32, 12.8x bf16), 0.4-1.9x for llmc-tiny's heads at batch 8-32: each SDPA call is an OpenMP fork and
  join, about 80 us on these cores with the passive wait policy (10 us on one thread), more than a tiny row costs.
- the batch as one group (one gather buffer, one masked SDPA): best for small rows (qwen3-0.6b batch 8 ctx 512:
  7.6x fp32, 3.4x bf16) but 6.7x fp32 / 6.2x bf16 at batch 32 ctx 2048, where the 256 MB buffer is out of the
  caches before the attention reads it.
- groups of 1, 2, 4, 8 and 16 MiB of keys: 8 MiB within 25 % of the best variant in every case, fp32 / bf16:
  llmc-tiny batch 32 ctx 128 3.3x / 2.0x, ctx 512 3.6x / 2.5x; qwen3-0.6b batch 8 ctx 512 6.3x / 3.0x, batch 32
  ctx 512 5.9x / 6.9x, ctx 2048 17.2x / 10.9x; batch 1 ctx 2048 1.6x / 1.8x (one row: every budget alike).
- behind SDPA everywhere: matmul-softmax-matmul over a padded gather (float32 scores, bf16 keys upcast: a bf16
  GEMM would round the scores) 0.5-5.4x; a gather straight into [B, Hkv, T + 1, D] buffers + matmuls 0.5-5.4x;
  the reference's batched masked SDPA over an index_select gather 0.5-3.7x.
- bf16: CPU SDPA's flash kernel is not the slow part here (the reference runs up to 3x faster in bf16 than in
  fp32); its where / masked_fill / cat passes over bf16 run at a few GB/s, and this op has none of them.
- chunked prefill (512 tokens over 512 / 1536 cached): 0.97-1.08x. The reference already calls the same kernel
  over only the blocks the sequence needs; splitting into cached keys (no mask) and new keys (causal), merged by
  log-sum-exp, measured 0.6-1.25x and would round bf16 twice.
bench/bench_cpu_attention.py measures this op against the reference (bench/results/<device>/cpu_attention.md).
"""
from __future__ import annotations

import torch

from llmc.codegen.ops import _check_attention_heads

# Keys one group of rows may gather (its values as many again): a group this size is still in the caches when the
# attention reads what the gather wrote. Measured against 1, 2, 4 and 16 MiB, every row alone and the whole batch
# as one group (module docstring).
GROUP_BYTES = 8 << 20


@torch.library.custom_op("llmc::paged_attention_cpu", mutates_args=())
def paged_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, block_table: torch.Tensor, past_lens: torch.Tensor, scale: float,
                        window: int) -> torch.Tensor:
    """llmc::paged_attention: q [B, S, H, D]; k / v [B, S, Hkv, D]; caches [NB, BS, Hkv, D]; block_table [B, MB];
    past_lens [B] -> [B, S, H, D] in q's dtype. Rows go in groups of consecutive sequences (module docstring)."""
    _check_attention_heads(q, k, v, "paged_attention_cpu")
    seq = q.shape[1]
    pasts = past_lens.tolist()
    # Row b attends its cached positions firsts[b] .. pasts[b] - 1 (oldest first: where the window starts for the
    # step's first query), lengths[b] of them; then the step's own keys.
    firsts = [max(0, past - window + 1) if window > 0 else 0 for past in pasts]
    lengths = [past - first for past, first in zip(pasts, firsts)]
    groups = _groups(lengths, seq, k.shape[2] * k.shape[3] * k.element_size())
    slots = None
    if max(lengths) and any(len(rows) > 1 for rows in groups):
        slots = _slots(block_table, firsts, lengths, seq, k_cache.shape[1])
    queries = q.transpose(1, 2)  # [B, H, S, D]
    outs = []
    for rows in groups:
        if len(rows) == 1:
            keys, values = _gather_row(k, v, k_cache, v_cache, block_table, rows.start, firsts[rows.start],
                                       lengths[rows.start])
        else:
            keys, values = _gather_group(k, v, k_cache, v_cache, slots, rows, lengths)
        mask, causal = _mask(lengths[rows.start:rows.stop], seq, window, keys.shape[1], q.device)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            queries[rows.start:rows.stop], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
            is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2]))
    return torch.cat(outs).transpose(1, 2).contiguous()


@paged_attention_cpu.register_fake
def _paged_attention_cpu_fake(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _groups(lengths: list[int], seq: int, token_bytes: int) -> list[range]:
    """Consecutive rows whose keys (as many per row as the group's longest row has, plus the step's) fit
    GROUP_BYTES; a row larger than that goes alone."""
    groups, start, longest = [], 0, lengths[0]
    for row in range(1, len(lengths)):
        widest = max(longest, lengths[row])
        if (row - start + 1) * (widest + seq) * token_bytes > GROUP_BYTES:
            groups.append(range(start, row))
            start, widest = row, lengths[row]
        longest = widest
    return groups + [range(start, len(lengths))]


def _slots(block_table: torch.Tensor, firsts: list[int], lengths: list[int], seq: int,
           block_size: int) -> torch.Tensor:
    """[B, T + S] flat cache slots (block * BS + offset): column c < lengths[b] holds row b's cached position
    firsts[b] + c; every later column a slot of some row's real cached token. So a gather through these slots
    never reads an unused slot or a padding entry of the table, whatever they hold (NaN included); the columns
    past a row's own are overwritten by its new keys or masked."""
    device = block_table.device
    columns = torch.arange(max(lengths) + seq, device=device)
    positions = torch.tensor(firsts, device=device)[:, None] + columns
    blocks = block_table.gather(1, (positions // block_size).clamp(max=block_table.shape[1] - 1))
    slots = blocks * block_size + positions % block_size
    real = slots[lengths.index(max(lengths)), 0]
    return torch.where(columns < torch.tensor(lengths, device=device)[:, None], slots, real)


def _gather_row(k, v, k_cache, v_cache, block_table, row: int, first: int, length: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """_gather_group's layout for a group of one row, from whole blocks (one copy per block, no slot table to
    build): the row's blocks into a buffer, its new keys written right after its past (over the last block's
    unused tail, if any), then the slice that starts at its first attended position."""
    if length == 0:
        return k[row:row + 1], v[row:row + 1]
    seq, block_size = k.shape[1], k_cache.shape[1]
    past = first + length
    first_block, end_block = first // block_size, -(-past // block_size)
    count, start = end_block - first_block, first_block * block_size
    blocks = block_table[row, first_block:end_block]
    out = []
    for cache, step in ((k_cache, k), (v_cache, v)):
        buffer = cache.new_empty(count * block_size + seq, *cache.shape[2:])
        torch.index_select(cache, 0, blocks, out=buffer[:count * block_size].view(count, *cache.shape[1:]))
        buffer[past - start:past - start + seq] = step[row]
        out.append(buffer[None, first - start:past - start + seq])
    return out[0], out[1]


def _gather_group(k, v, k_cache, v_cache, slots, rows: range, lengths: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, T + S, Hkv, D] keys and values of a group (T: its longest row's cached positions): row b's cached keys
    in columns 0 .. lengths[b] - 1 (one index_select over the flat cache: a copy per token), its new keys right
    after them (one index_copy_), then padding the mask hides."""
    group, seq = len(rows), k.shape[1]
    longest = max(lengths[rows.start:rows.stop])
    if longest == 0:  # nothing cached in sight: the step's keys are all there is
        return k[rows.start:rows.stop], v[rows.start:rows.stop]
    width = longest + seq
    index = slots[rows.start:rows.stop, :width].reshape(-1)
    starts = torch.tensor(lengths[rows.start:rows.stop], device=k.device)
    new = (torch.arange(group, device=k.device)[:, None] * width + starts[:, None]
           + torch.arange(seq, device=k.device)).reshape(-1)
    out = []
    for cache, step in ((k_cache, k), (v_cache, v)):
        gathered = torch.index_select(cache.flatten(0, 1), 0, index)  # the layer's cache is contiguous: a view
        gathered.index_copy_(0, new, step[rows.start:rows.stop].flatten(0, 1))
        out.append(gathered.view(group, width, *cache.shape[2:]))
    return out[0], out[1]


def _mask(lengths: list[int], seq: int, window: int, width: int, device) -> tuple[torch.Tensor | None, bool]:
    """SDPA's (attn_mask [G, 1, S, T + S] bool or None, is_causal) for the gathers' layout. Row b's column c
    holds the key at position firsts[b] + c (cached and new alike), its query i sits at firsts[b] + lengths[b] + i:
    the query sees the key when lengths[b] + i - c is >= 0 (causal; it also hides the padding) and < window."""
    if seq == 1 and min(lengths) == width - 1:
        return None, False  # one query seeing every key: the window starts where the keys start
    if seq == width and window == 0:
        return None, True  # the step's keys only: SDPA's own causal mask is ours
    queries = torch.tensor(lengths, device=device)[:, None] + torch.arange(seq, device=device)  # [G, S]
    offset = queries[:, :, None] - torch.arange(width, device=device)  # [G, S, T + S]
    visible = (offset >= 0) & (offset < window) if window > 0 else offset >= 0
    return visible[:, None], False
