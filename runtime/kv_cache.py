"""The paged KV cache: pools of fixed-size blocks and the tensors that hold their keys and values.

Layout (shared with `llmc.models.PagedKV` and the traced graphs): k, v are [L, num_blocks, block_size, Hkv, D].
A sequence owns a list of block ids (its block table); its token at absolute position p lives in block
table[p // block_size] at offset p % block_size. The model only reads the cache; after each step the runtime
writes the step's new keys and values with `PagedKVCache.write`.

Two tiers: the device pool the graphs read, and an optional host pool (pinned memory on CUDA) that preempted
sequences are swapped out to. Which block moves where is decided by `block_manager.BlockManager`; the cache
only executes its `BlockOp`s, in order.
"""
from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from llmc.common.errors import LlmcError, UsageError

class CacheFullError(LlmcError, RuntimeError):
    """The pool holds fewer free blocks than asked for."""


@dataclass(frozen=True)
class BlockOp:
    """One block transfer: "copy" device -> device (copy-on-write), "swap_out" device -> host, "swap_in" host ->
    device. src and dst are block ids in their tiers."""

    kind: str
    src: int
    dst: int


TIERS = {"copy": ("device", "device"), "swap_out": ("device", "host"), "swap_in": ("host", "device")}


class BlockPool:
    """Block ids with a reference count each, and an index of the full blocks' contents for prefix sharing.

    A block is free when no sequence holds it. A free block that carries a content hash (see
    `block_manager.block_hashes`) is kept as a cache entry: it can be taken again by hash until an allocation
    needs it, least recently released first. Invariant: a hash maps to exactly one block and back, and a block
    keeps its hash only while its content is that hash's tokens (the manager never writes into a hashed block).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks} and "
                             f"{block_size}")
        self._num_blocks, self._block_size = num_blocks, block_size
        # Reversed so that pop() hands out low ids first; freed blocks are reused first (LIFO).
        self._plain_free = list(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free hashed blocks, least recently released first
        self._refcount = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0  # cached blocks given up to make room

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never-used or released ones, cache entries included."""
        return len(self._plain_free) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks that carry a content hash, held or free."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    def refcount(self, block: int) -> int:
        self._check_ids([block])
        return self._refcount[block]

    def block_hash(self, block: int) -> bytes | None:
        return self._hash_of.get(block)

    def lookup(self, block_hash: bytes) -> int | None:
        return self._block_of.get(block_hash)

    def cached_index(self) -> dict[bytes, int]:
        return dict(self._block_of)

    def free_blocks(self) -> set[int]:
        return set(self._plain_free) | set(self._cached_free)

    def allocate(self, n: int) -> list[int]:
        """n blocks with refcount 1 and no hash; all or nothing. Uses never-cached blocks first, then evicts the
        least recently released cache entries."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            raise CacheFullError(
                f"KV cache full: {n} blocks wanted, {self.num_free} free of {self._num_blocks} total; "
                f"lower max_new_tokens or the prompt length, or give the KV cache a larger memory budget")
        blocks = []
        for _ in range(n):
            if self._plain_free:
                block = self._plain_free.pop()
            else:
                block, _ = self._cached_free.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
                self.evictions += 1
            self._refcount[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more owner for each block (a fork); only held blocks can be shared."""
        self._check_ids(blocks)
        unallocated = sorted({b for b in blocks if self._refcount[b] == 0})
        if unallocated:
            raise ValueError(f"cannot share free blocks {unallocated}: allocate them first")
        for b in blocks:
            self._refcount[b] += 1

    def acquire(self, block_hash: bytes) -> int:
        """One more owner for the block holding block_hash, taking it off the free list if it was a free cache
        entry."""
        block = self._block_of[block_hash]
        if self._refcount[block] == 0:
            del self._cached_free[block]
        self._refcount[block] += 1
        return block

    def register(self, block: int, block_hash: bytes) -> bool:
        """Indexes a held, fully written block under its content hash. False (nothing changes) when another
        block already holds that content: the index keeps one block per content."""
        self._check_ids([block])
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is free; only a held block can be registered")
        known = self._hash_of.get(block)
        if known is not None:
            if known != block_hash:
                raise ValueError(f"block {block} is already registered under another content hash")
            return True
        if block_hash in self._block_of:
            return False
        self._hash_of[block], self._block_of[block_hash] = block_hash, block
        return True

    def free(self, blocks: list[int]) -> None:
        """Drops one owner per listed block; a block returns to the free list when its count reaches 0 (as a
        cache entry if it carries a hash). List a sequence's blocks tail first: among blocks released together,
        the first listed is evicted first.

        Checked before anything changes, so a bad call (a double free: a caller bug) leaves the pool intact.
        """
        self._check_ids(blocks)
        over = sorted(b for b, n in Counter(blocks).items() if n > self._refcount[b])
        if over:
            raise ValueError(f"freeing blocks {over} more times than they are held (double free)")
        for b in blocks:
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                if b in self._hash_of:
                    self._cached_free[b] = None
                else:
                    self._plain_free.append(b)

    def forget_contents(self) -> None:
        """Empties the content index (free cache entries become plain free blocks): for when block contents can
        no longer be trusted."""
        self._plain_free.extend(self._cached_free)
        self._cached_free.clear()
        self._hash_of.clear()
        self._block_of.clear()

    def _check_ids(self, blocks: list[int]) -> None:
        bad = sorted({b for b in blocks if not 0 <= b < self._num_blocks})
        if bad:
            raise ValueError(f"block ids {bad} are outside the pool [0, {self._num_blocks})")


class PagedKVCache:
    """The k and v tensors [L, num_blocks, block_size, Hkv, D], allocated once, and the pool of their blocks;
    optionally a host tier of host_blocks blocks (host_k, host_v, host_pool) in pinned memory on CUDA."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", host_blocks: int = 0):
        self.pool = BlockPool(num_blocks, block_size)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Zeros, not empty: attention multiplies masked slots by a zero weight, and 0 * NaN garbage is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.host_pool = BlockPool(host_blocks, block_size) if host_blocks > 0 else None
        if self.host_pool is not None:
            host_shape = (num_layers, host_blocks, block_size, num_kv_heads, head_dim)
            pinned = self.k.device.type == "cuda"  # page-locked host memory: DMA copies, no staging buffer
            self.host_k = torch.zeros(host_shape, dtype=dtype, pin_memory=pinned)
            self.host_v = torch.zeros(host_shape, dtype=dtype, pin_memory=pinned)

    @classmethod
    def from_budget(cls, budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, device: str | torch.device = "cpu", host_budget_bytes: int = 0
                    ) -> PagedKVCache:
        """As many blocks as fit in budget_bytes (k and v together), and in host_budget_bytes on the host."""
        per_block = block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise UsageError(f"a KV cache budget of {budget_bytes} bytes holds no block ({per_block} bytes each); "
                             f"raise the KV cache memory budget or lower the block size")
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device,
                   host_blocks=max(0, host_budget_bytes) // per_block)

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

    @property
    def pool_bytes(self) -> int:
        """Bytes of the device pool, k and v together (the host tier apart: host_pool_bytes)."""
        return self.k.nbytes + self.v.nbytes

    @property
    def host_pool_bytes(self) -> int:
        return self.host_k.nbytes + self.host_v.nbytes if self.host_pool is not None else 0

    @property
    def capacity_tokens(self) -> int:
        """Tokens the device pool holds (all sequences together, before prefix sharing)."""
        return self.num_blocks * self.block_size

    @property
    def host_capacity_tokens(self) -> int:
        return self.host_pool.num_blocks * self.block_size if self.host_pool is not None else 0

    def describe(self) -> str:
        text = (f"KV cache {self.capacity_tokens} tokens ({self.num_blocks} blocks of {self.block_size}, "
                f"{format_bytes(self.capacity_tokens * self.bytes_per_token)} on {self.k.device})")
        if self.host_pool is not None:
            text += (f" + host tier {self.host_capacity_tokens} tokens "
                     f"({format_bytes(self.host_capacity_tokens * self.bytes_per_token)})")
        return text

    def apply(self, ops: list[BlockOp]) -> None:
        """Executes block transfers in list order. Consecutive ops of one kind run as one gather/scatter unless
        one reads or overwrites a block an earlier op of the run writes (then order matters)."""
        run: list[BlockOp] = []
        written: set[tuple[str, int]] = set()
        for op in ops:
            src_tier, dst_tier = TIERS[op.kind]
            if run and (op.kind != run[0].kind or (src_tier, op.src) in written or (dst_tier, op.dst) in written):
                self._transfer(run)
                run, written = [], set()
            run.append(op)
            written.add((dst_tier, op.dst))
        if run:
            self._transfer(run)

    def _transfer(self, run: list[BlockOp]) -> None:
        kind = run[0].kind
        if kind != "copy" and self.host_pool is None:
            raise ValueError(f"a {kind} needs a host tier; give the cache host blocks (kv_offload_memory)")
        src = torch.tensor([op.src for op in run], dtype=torch.long)
        dst = torch.tensor([op.dst for op in run], dtype=torch.long)
        device = self.k.device
        if kind == "copy":
            pairs = ((self.k, self.k), (self.v, self.v))
            src, dst = src.to(device), dst.to(device)
        elif kind == "swap_out":
            pairs = ((self.k, self.host_k), (self.v, self.host_v))
            src = src.to(device)
        else:
            pairs = ((self.host_k, self.k), (self.host_v, self.v))
            dst = dst.to(device)
        for source, target in pairs:
            # index_select gathers before index_copy_ scatters, so a run is one simultaneous move.
            target.index_copy_(1, dst, source.index_select(1, src).to(target.device))

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


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_memory_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GiB", "512 MiB", "1.5GB" or "1048576" (KiB/MiB/GiB/TiB are
    powers of 1024, KB/MB/GB/TB powers of 1000, a bare K/M/G/T is binary)."""
    if isinstance(size, bool):
        raise UsageError(f"memory size must be bytes or a string such as '2GiB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise UsageError(f"cannot read memory size {size!r}; write bytes or a number with KiB, MiB or GiB, "
                             f"such as 2GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 0:
        raise UsageError(f"memory size must not be negative, got {size!r}")
    return value


def format_bytes(n) -> str:
    """Bytes in binary units, as --kv-cache-memory takes them ("2.50 GiB"); "?" for what is not a byte count."""
    if not isinstance(n, int) or isinstance(n, bool):
        return "?"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
