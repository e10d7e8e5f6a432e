import pytest
import torch

from llmc.models import PagedKV
from llmc.runtime.kv_cache import BlockOp, BlockPool, CacheFullError, PagedKVCache, parse_memory_size


def test_pool_allocate_share_free_refcount():
    pool = BlockPool(8, block_size=4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and all(0 <= b < 8 for b in blocks)
    assert [pool.refcount(b) for b in blocks] == [1, 1, 1] and pool.num_free == 5
    others = pool.allocate(5)
    assert not set(others) & set(blocks) and pool.num_free == 0

    pool.share(blocks[:1])
    assert pool.refcount(blocks[0]) == 2
    pool.free(blocks)
    # The shared block still has an owner, so it must not be back on the free list.
    assert pool.refcount(blocks[0]) == 1 and pool.num_free == 2
    assert blocks[0] not in pool.allocate(2)
    pool.free(blocks[:1])
    assert pool.refcount(blocks[0]) == 0 and pool.num_free == 1
    assert pool.allocate(1) == blocks[:1]  # a freed block is reused


def test_pool_double_free_raises_and_changes_nothing():
    pool = BlockPool(4, block_size=2)
    blocks = pool.allocate(2)
    pool.free(blocks[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free(blocks[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free([blocks[1], blocks[1]])  # one owner, freed twice in one call
    assert pool.refcount(blocks[1]) == 1 and pool.num_free == 3
    with pytest.raises(ValueError, match="outside the pool"):
        pool.free([4])
    with pytest.raises(ValueError, match="free blocks"):
        pool.share(blocks[:1])


def test_pool_allocate_more_than_free_raises_and_allocates_nothing():
    pool = BlockPool(6, block_size=16)
    held = pool.allocate(4)
    with pytest.raises(CacheFullError, match="3 blocks wanted, 2 free of 6"):
        pool.allocate(3)
    assert pool.num_free == 2 and all(pool.refcount(b) == 0 for b in set(range(6)) - set(held))
    pool.free(held)
    assert sorted(pool.allocate(6)) == list(range(6))


def test_blocks_for_rounds_up():
    pool = BlockPool(3, block_size=4)
    assert [pool.blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def reference_write(k, v, block_tables, starts, lengths, new_k, new_v):
    block_size = k.shape[2]
    for b, (table, start, length) in enumerate(zip(block_tables, starts, lengths)):
        for i in range(length):
            pos = start + i
            k[:, table[pos // block_size], pos % block_size] = new_k[:, b, i]
            v[:, table[pos // block_size], pos % block_size] = new_v[:, b, i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_matches_token_by_token_reference_and_skips_padding(dtype):
    layers, num_blocks, block_size, heads, head_dim = 2, 40, 4, 3, 5
    cache = PagedKVCache(layers, num_blocks, block_size, heads, head_dim, dtype)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    batch = 5
    starts = torch.randint(0, 9, (batch,)).tolist()
    lengths = torch.randint(1, 8, (batch,)).tolist()
    lengths[1] = 0  # a row with nothing to write
    seq = max(lengths) + 2  # at least two padding rows in every sequence
    # Scattered, distinct block ids, and tables longer than needed (spare blocks must stay untouched).
    ids = torch.randperm(num_blocks).tolist()
    block_tables = []
    for start, length in zip(starts, lengths):
        n = cache.pool.blocks_for(start + length) + 1
        block_tables.append(ids[:n])
        ids = ids[n:]
    new_k = torch.randn(layers, batch, seq, heads, head_dim).to(dtype)
    new_v = torch.randn(layers, batch, seq, heads, head_dim).to(dtype)
    expected_k, expected_v = cache.k.clone(), cache.v.clone()
    reference_write(expected_k, expected_v, block_tables, starts, lengths, new_k, new_v)

    cache.write(block_tables, starts, lengths, new_k, new_v)

    torch.testing.assert_close(cache.k, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cache.v, expected_v, rtol=0, atol=0, equal_nan=True)
    written = {(blk, off) for blk in range(num_blocks) for off in range(block_size)
               if not cache.k[:, blk, off].isnan().all()}
    expected = {(table[p // block_size], p % block_size)
                for table, start, length in zip(block_tables, starts, lengths) for p in range(start, start + length)}
    assert written == expected and len(expected) == sum(lengths)
    assert (cache.k.isnan() == cache.v.isnan()).all()


def test_written_tokens_read_back_through_paged_kv_in_order():
    layers, heads, head_dim, block_size = 2, 2, 4, 4
    cache = PagedKVCache(layers, 16, block_size, heads, head_dim, torch.float32)
    lengths = [7, 10]
    block_tables = [cache.pool.allocate(cache.pool.blocks_for(n)) for n in lengths]
    block_tables[1].reverse()  # table order, not id order, must decide where tokens go
    keys = torch.randn(layers, 2, 10, heads, head_dim)
    values = torch.randn(layers, 2, 10, heads, head_dim)
    # Two steps: a prefill of the first 6 tokens, then the rest from position 6.
    cache.write(block_tables, [0, 0], [6, 6], keys[:, :, :6].contiguous(), values[:, :, :6].contiguous())
    cache.write(block_tables, [6, 6], [1, 4], keys[:, :, 6:].contiguous(), values[:, :, 6:].contiguous())

    kv = PagedKV(cache.k, cache.v, cache.block_table_tensor(block_tables), torch.tensor(lengths))
    for layer in range(layers):
        past_k, past_v = kv.past(layer)  # [B, P, Hkv, D]
        for b, n in enumerate(lengths):
            torch.testing.assert_close(past_k[b, :n], keys[layer, b, :n], rtol=0, atol=0)
            torch.testing.assert_close(past_v[b, :n], values[layer, b, :n], rtol=0, atol=0)


def test_write_rejects_bad_arguments():
    cache = PagedKVCache(1, 8, 4, 1, 2, torch.float32)
    new = torch.randn(1, 1, 3, 1, 2)
    with pytest.raises(ValueError, match="do not fit"):
        cache.write([[0]], [2], [3], new, new)  # positions 2..4 but one block of 4
    with pytest.raises(ValueError, match="length"):
        cache.write([[0, 1]], [0], [4], new, new)  # length beyond S
    with pytest.raises(ValueError, match="dtype|holds"):
        cache.write([[0]], [0], [1], new.half(), new.half())
    with pytest.raises(ValueError, match="batch"):
        cache.write([[0], [1]], [0, 0], [1, 1], new, new)
    with pytest.raises(ValueError, match="outside"):
        cache.write([[8]], [0], [1], new, new)
    two = torch.randn(1, 2, 3, 1, 2)
    with pytest.raises(ValueError, match="twice"):
        cache.write([[3], [3]], [1, 1], [1, 1], two, two)
    assert not cache.k.any()  # nothing was written by any rejected call


def test_block_table_tensor_pads_with_zero():
    cache = PagedKVCache(1, 10, 2, 1, 2, torch.float32)
    table = cache.block_table_tensor([[5, 3, 7], [9], []])
    assert table.dtype == torch.long
    assert table.tolist() == [[5, 3, 7], [9, 0, 0], [0, 0, 0]]
    assert cache.block_table_tensor([[4]], min_width=3).tolist() == [[4, 0, 0]]


def test_bytes_per_token_and_from_budget():
    layers, block_size, heads, head_dim = 3, 8, 2, 16
    cache = PagedKVCache(layers, 2, block_size, heads, head_dim, torch.bfloat16)
    per_token = 2 * layers * heads * head_dim * 2
    assert cache.bytes_per_token == per_token
    assert cache.k.numel() * 2 * 2 == per_token * 2 * block_size  # the two tensors really are that size

    budget = per_token * block_size * 7 + per_token * block_size - 1  # just short of 8 blocks
    sized = PagedKVCache.from_budget(budget, layers, block_size, heads, head_dim, torch.bfloat16)
    assert sized.num_blocks == sized.pool.num_blocks == 7 and sized.block_size == block_size
    assert sized.k.shape == (layers, 7, block_size, heads, head_dim) and sized.v.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="holds no block"):
        PagedKVCache.from_budget(per_token * block_size - 1, layers, block_size, heads, head_dim, torch.bfloat16)


def test_pool_keeps_registered_blocks_as_cache_entries_until_allocation_needs_them():
    pool = BlockPool(3, block_size=2)
    a, b, c = pool.allocate(3)
    assert pool.register(a, b"A") and pool.register(b, b"B")
    assert not pool.register(c, b"A")  # one block per content: c stays unindexed
    assert pool.register(a, b"A")  # registering again under the same hash changes nothing
    with pytest.raises(ValueError, match="another content hash"):
        pool.register(a, b"Z")
    pool.free([c, b, a])
    assert pool.num_free == 3 and pool.num_cached == 2 and pool.lookup(b"A") == a
    assert pool.allocate(1) == [c]  # the unindexed block goes first
    assert pool.acquire(b"A") == a and pool.refcount(a) == 1 and pool.num_free == 1
    assert pool.allocate(1) == [b] and pool.lookup(b"B") is None and pool.evictions == 1
    with pytest.raises(CacheFullError):
        pool.allocate(1)
    pool.free([a])
    assert pool.lookup(b"A") == a and pool.free_blocks() == {a}
    with pytest.raises(ValueError, match="is free"):
        pool.register(a, b"A")


def test_apply_runs_copies_and_swaps_in_order():
    layers, heads, head_dim, block_size = 2, 3, 4, 2
    cache = PagedKVCache(layers, 6, block_size, heads, head_dim, torch.float32, host_blocks=3)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    k0, v0 = cache.k.clone(), cache.v.clone()
    cache.apply([BlockOp("copy", 1, 2), BlockOp("copy", 2, 3),  # the second reads what the first wrote
                 BlockOp("swap_out", 3, 0), BlockOp("swap_out", 5, 2), BlockOp("swap_in", 2, 0),
                 BlockOp("copy", 0, 4)])
    for new, old, host in ((cache.k, k0, cache.host_k), (cache.v, v0, cache.host_v)):
        assert torch.equal(new[:, 2], old[:, 1]) and torch.equal(new[:, 3], old[:, 1])
        assert torch.equal(host[:, 0], old[:, 1]) and torch.equal(host[:, 2], old[:, 5])
        assert torch.equal(new[:, 0], old[:, 5]) and torch.equal(new[:, 4], old[:, 5])
        assert torch.equal(new[:, 1], old[:, 1]) and torch.equal(new[:, 5], old[:, 5])
    with pytest.raises(ValueError, match="host tier"):
        PagedKVCache(1, 2, 2, 1, 2, torch.float32).apply([BlockOp("swap_out", 0, 0)])


def test_capacity_and_host_tier_from_budget():
    per_block = 2 * 2 * 4 * 1 * 8 * 4  # k and v, 2 layers, 4 tokens, 1 head, head_dim 8, float32
    cache = PagedKVCache.from_budget(10 * per_block + 5, 2, 4, 1, 8, torch.float32,
                                     host_budget_bytes=3 * per_block)
    assert cache.capacity_tokens == 40 and cache.host_capacity_tokens == 12
    assert cache.host_pool.num_blocks == 3 and cache.host_k.shape == (2, 3, 4, 1, 8)
    assert not cache.host_k.is_pinned()  # pinned only for a CUDA cache
    assert "40 tokens" in cache.describe() and "host tier 12 tokens" in cache.describe()
    plain = PagedKVCache.from_budget(2 * per_block, 2, 4, 1, 8, torch.float32)
    assert plain.host_pool is None and plain.host_capacity_tokens == 0 and "host" not in plain.describe()


def test_parse_memory_size():
    assert parse_memory_size(123) == 123 and parse_memory_size("123") == 123
    assert parse_memory_size("2GiB") == 2 << 30 and parse_memory_size("512 MiB") == 512 << 20
    assert parse_memory_size("1.5kib") == 1536 and parse_memory_size("3KB") == 3000
    assert parse_memory_size("2G") == 2 << 30
    for bad in ("two GiB", "5 parsecs", "", "-1", True):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory_size(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_host_tier_is_pinned_and_swaps_round_trip():
    cache = PagedKVCache(2, 4, 4, 2, 8, torch.bfloat16, device="cuda", host_blocks=2)
    assert cache.host_k.is_pinned() and cache.host_v.is_pinned() and cache.host_k.device.type == "cpu"
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    k0, v0 = cache.k.clone(), cache.v.clone()
    cache.apply([BlockOp("swap_out", 1, 0), BlockOp("swap_out", 3, 1), BlockOp("swap_in", 1, 0),
                 BlockOp("swap_in", 0, 2), BlockOp("copy", 2, 1)])
    for new, old in ((cache.k, k0), (cache.v, v0)):
        assert torch.equal(new[:, 0], old[:, 3]) and torch.equal(new[:, 2], old[:, 1])
        assert torch.equal(new[:, 1], old[:, 1]) and torch.equal(new[:, 3], old[:, 3])
