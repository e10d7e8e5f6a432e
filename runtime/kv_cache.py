"""The paged KV cache: a pool of fixed-size blocks and the tensors that hold their keys and values.

Layout (shared with `llmc.models.PagedKV` and the traced graphs): k, v are [L, num_blocks, block_size, Hkv, D].
A sequence owns a list of block ids (its block table); its token at absolute position p lives in block
table[p // block_size] at offset p % block_size. The model only reads the cache; after each step the runtime
writes the step's new keys and values with `PagedKVCache.write`.
"""
from __future__ import annotations

from collections import Counter

import torch


class CacheFullError(RuntimeError):
    """The pool holds fewer free blocks than asked for."""


class BlockPool:
    """Block ids with a free list and a reference count per block (a count above 1 means a shared prefix)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks} and "
                             f"{block_size}")
        self._num_blocks, self._block_size = num_blocks, block_size
        # Reversed so that pop() hands out low ids first; freed blocks are reused first (LIFO).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refcount = [0] * num_blocks

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    def refcount(self, block: int) -> int:
        self._check_ids([block])
        return self._refcount[block]

    def allocate(self, n: int) -> list[int]:
        """n blocks with refcount 1; all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise CacheFullError(
                f"KV cache full: {n} blocks wanted, {len(self._free)} free of {self._num_blocks} total; "
                f"lower max_new_tokens or the prompt length, or give the KV cache a larger memory budget")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more owner for each block (prefix sharing); only allocated blocks can be shared."""
        self._check_ids(blocks)
        unallocated = sorted({b for b in blocks if self._refcount[b] == 0})
        if unallocated:
            raise ValueError(f"cannot share free blocks {unallocated}: allocate them first")
        for b in blocks:
            self._refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one owner per listed block; a block returns to the free list when its count reaches 0.

        Checked before anything changes, so a bad call (a double free: a caller bug) leaves the pool intact.
        """
        self._check_ids(blocks)
        over = sorted(b for b, n in Counter(blocks).items() if n > self._refcount[b])
        if over:
            raise ValueError(f"freeing blocks {over} more times than they are held (double free)")
        for b in blocks:
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def _check_ids(self, blocks: list[int]) -> None:
        bad = sorted({b for b in blocks if not 0 <= b < self._num_blocks})
        if bad:
            raise ValueError(f"block ids {bad} are outside the pool [0, {self._num_blocks})")


class PagedKVCache:
    """The k and v tensors [L, num_blocks, block_size, Hkv, D], allocated once, and the pool of their blocks."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.pool = BlockPool(num_blocks, block_size)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Zeros, not empty: attention multiplies masked slots by a zero weight, and 0 * NaN garbage is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def from_budget(cls, budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, device: str | torch.device = "cpu") -> PagedKVCache:
        """As many blocks as fit in budget_bytes (k and v together)."""
        per_block = block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"a KV cache budget of {budget_bytes} bytes holds no block ({per_block} bytes each); "
                             f"raise the KV cache memory budget or lower the block size")
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def bytes_per_token(self) -> int:
        num_layers, _, _, num_kv_heads, head_dim = self.k.shape
        return block_bytes(num_layers, 1, num_kv_heads, head_dim, self.k.dtype)

    def block_table_tensor(self, block_tables: list[list[int]], min_width: int = 1) -> torch.Tensor:
        """[B, MB] int64 on the cache's device, rows padded with block 0 (the model masks padded entries)."""
        width = max([min_width, *map(len, block_tables)])
        table = torch.zeros(len(block_tables), width, dtype=torch.long)
        for row, blocks in enumerate(block_tables):
            table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return table.to(self.k.device)

    def write(self, block_tables: list[list[int]], starts: list[int], lengths: list[int],
              new_k: torch.Tensor, new_v: torch.Tensor) -> None:
        """Writes token i < lengths[b] of row b of new_k / new_v [L, B, S, Hkv, D] at position starts[b] + i.

        Rows past lengths[b] are batch padding and are not written.
        """
        num_layers, _, block_size, num_kv_heads, head_dim = self.k.shape
        batch, seq = self._check_write(block_tables, starts, lengths, new_k, new_v)
        slots, rows = self._slots(block_tables, starts, lengths, seq)
        if slots.numel() == 0:
            return
        slots, rows = slots.to(self.k.device), rows.to(self.k.device)
        flat_shape = (num_layers, -1, num_kv_heads, head_dim)
        for cache, new in ((self.k, new_k), (self.v, new_v)):
            cache.view(flat_shape).index_copy_(1, slots, new.reshape(flat_shape).index_select(1, rows))

    def _slots(self, block_tables, starts, lengths, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat cache slots (block * BS + offset) and the matching flat rows (b * S + i) of the new tensors."""
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        batch_index = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)  # [N]
        first_row = torch.cumsum(lengths_t, 0) - lengths_t  # where each sequence's tokens begin in [N]
        token_index = torch.arange(batch_index.numel()) - first_row[batch_index]
        positions = torch.tensor(starts, dtype=torch.long)[batch_index] + token_index
        table = self.block_table_tensor(block_tables).cpu()
        if table.numel() and not 0 <= int(table.min()) <= int(table.max()) < self.num_blocks:
            raise ValueError(f"block tables hold ids outside the cache's [0, {self.num_blocks})")
        block_size = self.block_size
        slots = table[batch_index, positions // block_size] * block_size + positions % block_size
        # Two tokens aimed at one slot (e.g. writing into a shared prefix block) would race in index_copy_.
        if slots.unique().numel() != slots.numel():
            raise ValueError("write targets one cache slot twice; sequences in a batch must not share the "
                             "blocks they write")
        return slots, batch_index * seq + token_index

    def _check_write(self, block_tables, starts, lengths, new_k, new_v) -> tuple[int, int]:
        num_layers, _, _, num_kv_heads, head_dim = self.k.shape
        if new_k.shape != new_v.shape or new_k.dim() != 5 or (
                new_k.shape[0], *new_k.shape[3:]) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(f"new keys/values must both be [L={num_layers}, B, S, Hkv={num_kv_heads}, "
                             f"D={head_dim}], got {tuple(new_k.shape)} and {tuple(new_v.shape)}")
        if new_k.dtype != self.k.dtype or new_v.dtype != self.k.dtype:
            raise ValueError(f"new keys/values are {new_k.dtype}/{new_v.dtype} but the cache holds {self.k.dtype}; "
                             f"build the cache in the model's dtype")
        batch, seq = new_k.shape[1], new_k.shape[2]
        if not len(block_tables) == len(starts) == len(lengths) == batch:
            raise ValueError(f"write got {len(block_tables)} block tables, {len(starts)} starts and "
                             f"{len(lengths)} lengths for a batch of {batch}")
        for b, (blocks, start, length) in enumerate(zip(block_tables, starts, lengths)):
            if start < 0 or not 0 <= length <= seq:
                raise ValueError(f"sequence {b}: start {start} and length {length} must be >= 0 and length <= "
                                 f"S={seq}")
            if start + length > len(blocks) * self.block_size:
                raise ValueError(f"sequence {b}: positions up to {start + length} do not fit its {len(blocks)} "
                                 f"blocks of {self.block_size}; allocate its blocks before writing")
        return batch, seq


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
