"""Block tables of sequences over the device pool and the host tier: on-demand growth, prefix sharing,
copy-on-write and swapping. Bookkeeping only: the block transfers it decides are queued as `BlockOp`s, which the
caller runs in order (`PagedKVCache.apply`) before the next model step reads the cache.

Prefix sharing (as vLLM's automatic prefix caching): a full block is named by a chained hash, sha256 of its
parent block's hash and its own token ids, so equal hashes mean equal prefixes up to the block's end. Once a
sequence's block is full and written (`commit`), the device pool indexes it by that hash; a later sequence whose
prompt starts with the same blocks takes them (refcount) instead of computing them. Invariants:
- a sequence's blocks all live in one tier; a block's refcount is the number of sequences holding it;
- a sequence writes only into blocks it holds alone that carry no hash (`prepare_write` copies the others
  first): a shared or indexed block is never written, so an indexed block always holds its hash's tokens.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from .kv_cache import BlockOp, BlockPool


def chain_hash(parent: bytes, block_tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + struct.pack(f"<{len(block_tokens)}q", *block_tokens)).digest()


def block_hashes(tokens: list[int], block_size: int, start: int = 0, parents: list[bytes] | None = None
                 ) -> list[bytes]:
    """The chained hashes of tokens' full blocks; with `parents` (the hashes of blocks 0..start-1), only
    blocks start.. are hashed and appended to a copy of it."""
    hashes = list(parents or [])
    for i in range(start, len(tokens) // block_size):
        hashes.append(chain_hash(hashes[-1] if hashes else b"", tokens[i * block_size:(i + 1) * block_size]))
    return hashes


@dataclass
class KVStats:
    """What the cache did during one generate() call."""

    prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache at admission, so not computed
    shared_blocks: int = 0  # blocks taken from the prefix cache (at admission or swap-in) instead of computed
    forked_sequences: int = 0  # sequences that took another's blocks whole (identical prompts)
    copy_on_write: int = 0  # blocks copied because a sequence was about to write into a shared one
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    preempted_to_host: int = 0  # sequences swapped out to the host tier
    preempted_to_recompute: int = 0  # sequences whose blocks were dropped, to be prefilled again
    peak_used_blocks: int = 0  # most device blocks held at once

    def summary(self) -> str:
        return (f"prefix hits {self.prefix_hit_tokens} tokens ({self.shared_blocks} blocks shared, "
                f"{self.forked_sequences} forks, {self.copy_on_write} copied on write); preempted "
                f"{self.preempted_to_host} to host ({self.swapped_out_blocks} blocks out, {self.swapped_in_blocks} "
                f"in), {self.preempted_to_recompute} to recompute; peak {self.peak_used_blocks} blocks")


@dataclass
class _Table:
    blocks: list[int]
    on_host: bool = False
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the leading full, written blocks


class BlockManager:
    """Who holds which block. Calls that need blocks are all or nothing: they return False / None and change
    nothing when the pool lacks room."""

    def __init__(self, device: BlockPool, host: BlockPool | None = None, prefix_caching: bool = True,
                 stats: KVStats | None = None):
        if host is not None and host.block_size != device.block_size:
            raise ValueError(f"host blocks of {host.block_size} tokens do not match device blocks of "
                             f"{device.block_size}")
        self.device, self.host, self.prefix_caching = device, host, prefix_caching
        self.block_size = device.block_size
        self.stats = stats if stats is not None else KVStats()
        self._tables: dict[int, _Table] = {}
        self._ops: list[BlockOp] = []

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[int]:
        return list(self._tables)

    def table(self, seq_id: int) -> list[int]:
        """The sequence's block ids in its tier (the manager's own list: read, do not modify)."""
        return self._get(seq_id).blocks

    def on_host(self, seq_id: int) -> bool:
        return self._get(seq_id).on_host

    def take_ops(self) -> list[BlockOp]:
        """The transfers decided since the last call, to run in order before the next step."""
        ops, self._ops = self._ops, []
        return ops

    def prefix_hashes(self, tokens: list[int]) -> list[bytes]:
        return block_hashes(tokens, self.block_size) if self.prefix_caching else []

    def num_cached_blocks(self, hashes: list[bytes]) -> int:
        """How many leading blocks of hashes the device pool holds."""
        n = 0
        while n < len(hashes) and self.device.lookup(hashes[n]) is not None:
            n += 1
        return n

    def admit(self, seq_id: int, tokens: list[int], hashes: list[bytes] | None = None) -> int | None:
        """Blocks for all of tokens, for a sequence about to prefill them: leading full blocks found in the
        prefix cache are shared, the rest allocated. Returns how many tokens are already cached (at most
        len(tokens) - 1: the last token is always computed, for its logits), or None when the pool lacks room."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds blocks; free it before admitting it again")
        if not tokens:
            raise ValueError(f"sequence {seq_id} has no tokens to admit")
        hashes = self.prefix_hashes(tokens) if hashes is None else hashes
        matched = self.num_cached_blocks(hashes)
        cached = min(matched * self.block_size, len(tokens) - 1)
        recompute_in_matched = matched * self.block_size > cached  # the last token lands in a shared block
        from_free = sum(self.device.refcount(self.device.lookup(h)) == 0 for h in hashes[:matched])
        fresh = self.device.blocks_for(len(tokens)) - matched + recompute_in_matched
        if from_free + fresh > self.device.num_free:
            return None
        # Matched blocks first: allocating first could evict the very entries about to be matched.
        blocks = [self.device.acquire(h) for h in hashes[:matched]]
        if recompute_in_matched:
            blocks[-1] = self._copy_for_write(blocks[-1])
        blocks += self.device.allocate(self.device.blocks_for(len(tokens)) - matched)
        self._tables[seq_id] = _Table(blocks, hashes=hashes[:cached // self.block_size])
        self.stats.prefix_hit_tokens += cached
        self.stats.shared_blocks += matched
        self._note_usage()
        return cached

    def fork(self, parent_id: int, child_id: int) -> None:
        """child_id takes all of parent_id's blocks (the partial last one too); either copies a block before
        writing into it while the other still holds it."""
        parent = self._get(parent_id)
        if parent.on_host:
            raise ValueError(f"sequence {parent_id} is swapped out; fork it once it is back on the device")
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} already holds blocks; a fork needs a fresh sequence")
        self.device.share(parent.blocks)
        self._tables[child_id] = _Table(list(parent.blocks), hashes=list(parent.hashes))
        self.stats.forked_sequences += 1

    def prepare_write(self, seq_id: int, start: int, end: int) -> bool:
        """Makes positions [start, end) writable: allocates the blocks up to end, and copies any block in the
        range that another sequence holds or the prefix cache indexes. False when the pool lacks room."""
        table = self._get(seq_id)
        if table.on_host:
            raise ValueError(f"sequence {seq_id} is swapped out; swap it in before writing")
        blocks, pool = table.blocks, self.device
        missing = max(0, pool.blocks_for(end) - len(blocks))
        shared = [i for i in range(start // self.block_size, min(len(blocks), pool.blocks_for(end)))
                  if pool.refcount(blocks[i]) > 1 or pool.block_hash(blocks[i]) is not None]
        if missing + len(shared) > pool.num_free:
            return False
        for i in shared:
            blocks[i] = self._copy_for_write(blocks[i])
        blocks += pool.allocate(missing)
        self._note_usage()
        return True

    def commit(self, seq_id: int, tokens: list[int], num_written: int) -> None:
        """Records that positions [0, num_written) of the sequence hold tokens' keys and values: its newly full
        blocks enter the prefix cache (unless another block already holds the same content)."""
        table = self._get(seq_id)
        full = num_written // self.block_size
        if not self.prefix_caching or len(table.hashes) >= full:
            return
        table.hashes = block_hashes(tokens[:full * self.block_size], self.block_size, len(table.hashes),
                                    table.hashes)
        if not table.on_host:
            for block, block_hash in zip(table.blocks[:full], table.hashes):
                self.device.register(block, block_hash)

    def num_hashed(self, seq_id: int) -> int:
        return len(self._get(seq_id).hashes)

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks; indexed ones stay in the prefix cache until the pool needs them."""
        table = self._tables.pop(seq_id)
        # Tail first: of one sequence's blocks, its last (least likely to be shared) are evicted first.
        (self.host if table.on_host else self.device).free(table.blocks[::-1])

    def swap_out(self, seq_id: int) -> bool:
        """Moves the sequence's blocks to the host tier. False when there is none or it lacks room."""
        table = self._get(seq_id)
        if table.on_host:
            raise ValueError(f"sequence {seq_id} is already swapped out")
        if self.host is None or self.host.num_free < len(table.blocks):
            return False
        host_blocks = self.host.allocate(len(table.blocks))
        self._ops += [BlockOp("swap_out", d, h) for d, h in zip(table.blocks, host_blocks)]
        self.device.free(table.blocks[::-1])
        table.blocks, table.on_host = host_blocks, True
        self.stats.swapped_out_blocks += len(host_blocks)
        return True

    def swap_in(self, seq_id: int, reserve_tokens: int = 0) -> bool:
        """Brings a swapped-out sequence back (into any free device blocks) with room for reserve_tokens.
        Full blocks the prefix cache still holds are shared instead of copied. False when the pool lacks room."""
        table = self._get(seq_id)
        if not table.on_host:
            raise ValueError(f"sequence {seq_id} is not swapped out")
        count = len(table.blocks)
        extra = max(0, self.device.blocks_for(reserve_tokens) - count)
        reuse = {i: h for i, h in enumerate(table.hashes[:count]) if self.device.lookup(h) is not None}
        from_free = sum(self.device.refcount(self.device.lookup(h)) == 0 for h in reuse.values())
        if from_free + count - len(reuse) + extra > self.device.num_free:
            return False
        device_blocks = {i: self.device.acquire(h) for i, h in reuse.items()}
        for i, host_block in enumerate(table.blocks):
            if i not in device_blocks:
                device_blocks[i] = self.device.allocate(1)[0]
                self._ops.append(BlockOp("swap_in", host_block, device_blocks[i]))
                if i < len(table.hashes):
                    # Readable by the time any step runs: the caller applies ops before each step.
                    self.device.register(device_blocks[i], table.hashes[i])
        self.host.free(table.blocks[::-1])
        table.blocks = [device_blocks[i] for i in range(count)] + self.device.allocate(extra)
        table.on_host = False
        self.stats.shared_blocks += len(reuse)
        self.stats.swapped_in_blocks += count - len(reuse)
        self._note_usage()
        return True

    def _copy_for_write(self, block: int) -> int:
        """A private copy of block (the caller holds one reference to block, which this drops)."""
        (copy,) = self.device.allocate(1)
        self._ops.append(BlockOp("copy", block, copy))
        self.device.free([block])
        self.stats.copy_on_write += 1
        return copy

    def _note_usage(self) -> None:
        used = self.device.num_blocks - self.device.num_free
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, used)

    def _get(self, seq_id: int) -> _Table:
        table = self._tables.get(seq_id)
        if table is None:
            raise ValueError(f"sequence {seq_id} holds no blocks; admit it first")
        return table
