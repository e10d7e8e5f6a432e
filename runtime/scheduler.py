"""Continuous batching over the block manager: blocks on demand, prefix sharing, preemption.

Each `schedule()` builds one step, in three phases:
1. Running sequences, oldest admitted first, get room for the token they write this step (a new block only when
   decode crosses a block boundary). When the device pool has no block left, the most recently admitted other
   running sequence is preempted: swapped out to the host tier if there is one with room, otherwise its blocks
   are released (the full ones stay in the prefix cache) and it returns to the head of the queue, to be
   prefilled again from its prompt and the tokens it generated so far (recompute). A sequence with nothing newer
   to preempt preempts itself, so the oldest running sequence is never preempted; the pool holds at least one
   longest sequence (checked at load), so every step makes progress.
2. If nothing was preempted, swapped-out sequences come back, oldest first, as room allows.
3. If nothing is swapped out or preempted, waiting sequences are admitted in arrival order (a head that does not
   fit holds back the ones behind it, so long prompts are never starved by short ones). Only the prompt's blocks
   are allocated; leading blocks in the prefix cache are shared. A prompt identical to one admitted in this
   step forks it (takes its blocks and its logits); a prompt whose first uncached block another sequence is
   computing in this step waits one step, to share that block rather than compute it twice.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from llmc.common.contract import DEFAULT_MAX_BATCH

from .block_manager import BlockManager
from .kv_cache import BlockOp, BlockPool, CacheFullError


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    finished: bool = False
    cached: int = 0  # tokens already written to the KV cache (the caller advances it after each write)
    admitted_at: int | None = None  # admission order, kept across preemptions

    def __post_init__(self):
        if not self.prompt:
            raise ValueError(f"sequence {self.seq_id} has an empty prompt; give it at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"sequence {self.seq_id}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_tokens(self) -> int:
        """The most tokens this sequence can ever hold."""
        return len(self.prompt) + self.max_new_tokens


@dataclass
class Step:
    """One model step. prefill: compute tokens[cached:] of each; decode: compute the last token of each; forks:
    (parent in prefill, child) pairs, the child sharing the parent's blocks and sampling from its logits;
    ops: block transfers to run, in order, before the step."""

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    ops: list[BlockOp] = field(default_factory=list)


class Scheduler:
    """Decides each step which sequences to prefill and which to decode.

    Contract with the caller: every sequence of a step is computed before the next `schedule()` (its `cached`
    advanced, and `commit(seq)` called after the write), and `finish(seq)` is called once a sequence is done.
    """

    def __init__(self, blocks: BlockManager | BlockPool, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.blocks = blocks if isinstance(blocks, BlockManager) else BlockManager(blocks)
        self.pool, self.max_batch = self.blocks.device, max_batch
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # ordered by admitted_at
        self._swapped: list[Sequence] = []  # ordered by admitted_at
        self._ids: set[int] = set()  # ids waiting, running or swapped out
        self._admissions = 0
        self._head_hashes: tuple[Sequence, int, list[bytes]] | None = None  # a waiting head's, kept while it waits

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_swapped(self) -> int:
        return len(self._swapped)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._swapped)

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; raises CacheFullError if even the empty pool could not hold its full length."""
        needed = self.pool.blocks_for(seq.max_tokens)
        if needed > self.pool.num_blocks:
            raise CacheFullError(
                f"sequence {seq.seq_id} needs {needed} blocks ({seq.max_tokens} tokens) but the whole KV cache has "
                f"{self.pool.num_blocks}; lower max_new_tokens or the prompt length, or give the KV cache a "
                f"larger memory budget")
        if seq.finished or seq.output or seq.cached or seq.seq_id in self.blocks:
            raise ValueError(f"sequence {seq.seq_id} was already run; add a fresh Sequence")
        if seq.seq_id in self._ids:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled; give each sequence its own id")
        self._ids.add(seq.seq_id)
        self._waiting.append(seq)

    def block_table(self, seq: Sequence) -> list[int]:
        return self.blocks.table(seq.seq_id)

    def schedule(self) -> Step:
        step = Step()
        preempted = self._grow_running(step)
        if not preempted:
            self._swap_in(step)
        if not preempted and not self._swapped:
            self._admit(step)
        step.ops = self.blocks.take_ops()
        return step

    def commit(self, seq: Sequence) -> None:
        """After the step's keys and values are written: the sequence's newly full blocks become shareable."""
        if self.blocks.prefix_caching and seq.cached // self.blocks.block_size > self.blocks.num_hashed(seq.seq_id):
            self.blocks.commit(seq.seq_id, seq.tokens, seq.cached)

    def finish(self, seq: Sequence) -> None:
        """Marks a running sequence finished, returns its blocks to the pool and drops it from the batch."""
        if not any(s is seq for s in self._running):
            raise ValueError(f"sequence {seq.seq_id} is not running; only sequences returned by schedule() can "
                             f"be finished")
        self._running.remove(seq)
        self._ids.discard(seq.seq_id)
        self.blocks.free(seq.seq_id)
        seq.finished = True

    def _grow_running(self, step: Step) -> bool:
        preempted, i = False, 0
        while i < len(self._running):
            seq = self._running[i]
            while not self.blocks.prepare_write(seq.seq_id, seq.cached, seq.num_tokens):
                victim = self._running[-1]
                if victim is self._running[0]:
                    raise RuntimeError(f"the KV cache cannot hold sequence {seq.seq_id} alone ({seq.num_tokens} "
                                       f"tokens); the pool must hold at least one longest sequence")
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                step.decode.append(seq)
                i += 1
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        if self.blocks.swap_out(seq.seq_id):
            bisect.insort(self._swapped, seq, key=_admission)
            self.blocks.stats.preempted_to_host += 1
        else:
            self.blocks.free(seq.seq_id)
            seq.cached = 0
            # Victims go newest first, so the oldest ends up at the head of the queue.
            self._waiting.appendleft(seq)
            self.blocks.stats.preempted_to_recompute += 1

    def _swap_in(self, step: Step) -> None:
        while self._swapped and len(self._running) < self.max_batch:
            seq = self._swapped[0]
            if not self.blocks.swap_in(seq.seq_id, reserve_tokens=seq.num_tokens):
                return
            self._swapped.pop(0)
            if not self.blocks.prepare_write(seq.seq_id, seq.cached, seq.num_tokens):
                raise RuntimeError(f"sequence {seq.seq_id} came back from the host tier without room to write")
            bisect.insort(self._running, seq, key=_admission)
            step.decode.append(seq)

    def _admit(self, step: Step) -> None:
        computing: set[bytes] = set()  # hashes of the full blocks this step's prefills write
        prefilling: dict[tuple[int, ...], Sequence] = {}
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            tokens = seq.tokens
            hashes = self._prefix_hashes(seq, tokens)
            parent = prefilling.get(tuple(tokens)) if self.blocks.prefix_caching else None
            if parent is not None:
                self.blocks.fork(parent.seq_id, seq.seq_id)
                seq.cached = parent.cached
                step.forks.append((parent, seq))
            else:
                matched = self.blocks.num_cached_blocks(hashes)
                if matched < len(hashes) and hashes[matched] in computing:
                    return
                cached = self.blocks.admit(seq.seq_id, tokens, hashes)
                if cached is None:
                    return
                seq.cached = cached
                step.prefill.append(seq)
                computing.update(hashes[cached // self.blocks.block_size:])
                prefilling[tuple(tokens)] = seq
            self._waiting.popleft()
            self._head_hashes = None
            if seq.admitted_at is None:
                seq.admitted_at, self._admissions = self._admissions, self._admissions + 1
            bisect.insort(self._running, seq, key=_admission)

    def _prefix_hashes(self, seq: Sequence, tokens: list[int]) -> list[bytes]:
        """The head's block hashes, computed once however many steps it waits (a long prompt has many)."""
        kept = self._head_hashes
        if kept is None or kept[0] is not seq or kept[1] != len(tokens):
            self._head_hashes = kept = (seq, len(tokens), self.blocks.prefix_hashes(tokens))
        return kept[2]


def _admission(seq: Sequence) -> int:
    return seq.admitted_at
