"""FIFO continuous batching over a block pool.

A sequence is admitted only when the pool can reserve blocks for its whole length (prompt + max_new_tokens).
Reserving up front costs some memory for sequences that stop early, but a running sequence then never runs out
of blocks, so nothing is ever preempted or recomputed. Admission is strictly in arrival order: a head sequence
that does not fit yet holds back the ones behind it, so long requests are never starved by short ones.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockPool, CacheFullError


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    finished: bool = False
    cached: int = 0  # tokens already written to the KV cache (the caller advances it after each write)

    def __post_init__(self):
        if not self.prompt:
            raise ValueError(f"sequence {self.seq_id} has an empty prompt; give it at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"sequence {self.seq_id}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_tokens(self) -> int:
        """The most tokens this sequence can ever hold, and so the length its blocks are reserved for."""
        return len(self.prompt) + self.max_new_tokens


class Scheduler:
    """Decides each step which sequences to prefill (newly admitted) and which to decode (admitted earlier).

    Contract with the caller: every sequence returned in to_prefill is prefilled before the next `schedule()`,
    and `finish(seq)` is called once a sequence is done (it frees the sequence's blocks).
    """

    def __init__(self, pool: BlockPool, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.pool, self.max_batch = pool, max_batch
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}  # seq_id -> sequence, in admission order
        self._ids: set[int] = set()  # ids waiting or running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; raises CacheFullError if even the empty pool could not hold its full length."""
        needed = self.pool.blocks_for(seq.max_tokens)
        if needed > self.pool.num_blocks:
            raise CacheFullError(
                f"sequence {seq.seq_id} needs {needed} blocks ({seq.max_tokens} tokens) but the whole KV cache has "
                f"{self.pool.num_blocks}; lower max_new_tokens or the prompt length, or give the KV cache a "
                f"larger memory budget")
        if seq.finished or seq.blocks or seq.output or seq.cached:
            raise ValueError(f"sequence {seq.seq_id} was already run; add a fresh Sequence")
        if seq.seq_id in self._ids:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled; give each sequence its own id")
        self._ids.add(seq.seq_id)
        self._waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """(to_prefill, to_decode): newly admitted sequences, and the running ones prefilled in earlier steps."""
        # Everything already running was handed out in to_prefill by an earlier call, hence prefilled.
        to_decode = list(self._running.values())
        to_prefill = []
        while self._waiting and len(self._running) < self.max_batch:
            needed = self.pool.blocks_for(self._waiting[0].max_tokens)
            if needed > self.pool.num_free:
                break
            seq = self._waiting.popleft()
            seq.blocks = self.pool.allocate(needed)
            self._running[seq.seq_id] = seq
            to_prefill.append(seq)
        return to_prefill, to_decode

    def finish(self, seq: Sequence) -> None:
        """Marks a running sequence finished, returns its blocks to the pool and drops it from the batch."""
        if self._running.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id} is not running; only sequences returned by schedule() can "
                             f"be finished")
        del self._running[seq.seq_id]
        self._ids.discard(seq.seq_id)
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.finished = True
