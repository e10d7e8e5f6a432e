"""The block manager alone: a randomized simulation checked after every event, and the single behaviours."""
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from llmc.runtime.block_manager import BlockManager, block_hashes
from llmc.runtime.kv_cache import TIERS, BlockPool

BLOCK_SIZE = 4


@dataclass
class SimSequence:
    tokens: list[int]
    cached: int = 0  # positions [0, cached) are written


class Simulation:
    """Drives a BlockManager as the engine would, over fake memory: each cache slot holds the token id whose keys
    and values it stands for, so transfers and writes can be checked to put the right tokens in the right place."""

    def __init__(self, rng: random.Random, device_blocks: int = 40, host_blocks: int = 24):
        self.rng = rng
        self.device, self.host = BlockPool(device_blocks, BLOCK_SIZE), BlockPool(host_blocks, BLOCK_SIZE)
        self.manager = BlockManager(self.device, self.host)
        self.memory = {"device": [[None] * BLOCK_SIZE for _ in range(device_blocks)],
                       "host": [[None] * BLOCK_SIZE for _ in range(host_blocks)]}
        self.seqs: dict[int, SimSequence] = {}
        self.block_tokens: dict[bytes, list[int]] = {}  # every hash seen -> the tokens of its block
        self.next_id = 0
        # Few short stems over a small vocabulary: many prompts share prefixes, some are identical.
        self.stems = [[rng.randrange(20) for _ in range(rng.randint(0, 13))] for _ in range(4)]

    def run_ops(self) -> None:
        for op in self.manager.take_ops():
            src_tier, dst_tier = TIERS[op.kind]
            self.memory[dst_tier][op.dst] = list(self.memory[src_tier][op.src])

    def write(self, seq_id: int, start: int, end: int) -> None:
        seq, table = self.seqs[seq_id], self.manager.table(seq_id)
        for p in range(start, end):
            block = table[p // BLOCK_SIZE]
            assert self.device.refcount(block) == 1 and self.device.block_hash(block) is None, \
                f"sequence {seq_id} writes into shared or indexed block {block}"
            self.memory["device"][block][p % BLOCK_SIZE] = seq.tokens[p]
        seq.cached = end
        self.manager.commit(seq_id, seq.tokens, end)

    def remember_hashes(self, tokens: list[int]) -> None:
        for i, h in enumerate(block_hashes(tokens, BLOCK_SIZE)):
            self.block_tokens[h] = tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]

    def pick(self, on_host: bool) -> int | None:
        ids = [i for i in self.seqs if self.manager.on_host(i) == on_host]
        return self.rng.choice(ids) if ids else None

    # Events: each returns quietly when the pool lacks room, as the scheduler would wait.
    def arrive(self) -> None:
        rng = self.rng
        if self.seqs and rng.random() < 0.15:
            tokens = list(rng.choice(list(self.seqs.values())).tokens)  # identical to a live sequence
        else:
            tokens = rng.choice(self.stems) + [rng.randrange(20) for _ in range(rng.randint(1, 10))]
        seq_id, self.next_id = self.next_id, self.next_id + 1
        cached = self.manager.admit(seq_id, tokens)
        if cached is None:
            return
        assert 0 <= cached <= len(tokens) - 1 and cached % BLOCK_SIZE in (0, BLOCK_SIZE - 1)
        self.seqs[seq_id] = SimSequence(tokens, cached)
        self.remember_hashes(tokens)
        self.run_ops()
        self.write(seq_id, cached, len(tokens))

    def fork(self) -> None:
        parent = self.pick(on_host=False)
        if parent is None:
            return
        seq_id, self.next_id = self.next_id, self.next_id + 1
        self.manager.fork(parent, seq_id)
        self.seqs[seq_id] = SimSequence(list(self.seqs[parent].tokens), self.seqs[parent].cached)

    def append(self) -> None:
        seq_id = self.pick(on_host=False)
        if seq_id is None:
            return
        seq = self.seqs[seq_id]
        if len(seq.tokens) >= 48:
            return self.finish(seq_id)
        if not self.manager.prepare_write(seq_id, seq.cached, seq.cached + 1):
            return
        seq.tokens.append(self.rng.randrange(20))
        self.remember_hashes(seq.tokens)
        self.run_ops()
        self.write(seq_id, seq.cached, seq.cached + 1)

    def finish(self, seq_id: int | None = None) -> None:
        seq_id = seq_id if seq_id is not None else self.pick(on_host=self.rng.random() < 0.3)
        if seq_id is not None:
            self.manager.free(seq_id)
            del self.seqs[seq_id]

    def offload(self) -> None:
        seq_id = self.pick(on_host=False)
        if seq_id is not None and self.manager.swap_out(seq_id):
            self.run_ops()

    def swap_in(self) -> None:
        seq_id = self.pick(on_host=True)
        if seq_id is not None and self.manager.swap_in(seq_id, self.seqs[seq_id].cached + self.rng.randint(0, 5)):
            self.run_ops()

    def check(self) -> None:
        manager = self.manager
        for tier, pool in (("device", self.device), ("host", self.host)):
            tables = [manager.table(i) for i in self.seqs if manager.on_host(i) == (tier == "host")]
            holders = Counter(b for table in tables for b in table)
            free = pool.free_blocks()
            assert not free & holders.keys(), f"{tier} blocks {free & holders.keys()} are both free and held"
            assert free | holders.keys() == set(range(pool.num_blocks)), f"{tier} blocks leaked"
            assert pool.num_free == len(free)
            assert all(pool.refcount(b) == holders[b] for b in range(pool.num_blocks)), f"{tier} refcounts wrong"
            assert all(len(set(table)) == len(table) for table in tables)
        assert set(manager.seq_ids()) == set(self.seqs)
        for seq_id, seq in self.seqs.items():
            tier = "host" if manager.on_host(seq_id) else "device"
            table = manager.table(seq_id)
            assert len(table) >= self.device.blocks_for(seq.cached)
            written = [self.memory[tier][table[p // BLOCK_SIZE]][p % BLOCK_SIZE] for p in range(seq.cached)]
            assert written == seq.tokens[:seq.cached], f"sequence {seq_id} reads wrong tokens from the {tier}"
        for h, block in self.device.cached_index().items():
            assert self.device.block_hash(block) == h
            assert self.memory["device"][block] == self.block_tokens[h], f"block {block} does not hold its hash"
        assert self.host.num_cached == 0


def test_random_events_keep_every_invariant_and_leak_nothing():
    seed = random.randrange(2**32)
    print(f"simulation seed {seed}")  # shown by pytest on failure, to replay the run
    rng = random.Random(seed)
    sim = Simulation(rng)
    events = [sim.arrive, sim.fork, sim.append, sim.finish, sim.offload, sim.swap_in]
    weights = [3, 0.5, 8, 1.5, 1, 1.5]
    for _ in range(4000):
        rng.choices(events, weights)[0]()
        sim.check()
    stats = sim.manager.stats
    # Each mechanism really ran, so the invariants above were checked against it.
    assert stats.shared_blocks > 50 and stats.prefix_hit_tokens > 0, stats
    assert stats.forked_sequences > 10 and stats.copy_on_write > 10, stats
    assert stats.swapped_out_blocks > 50 and stats.swapped_in_blocks > 20, stats
    assert sim.device.evictions > 0, "the prefix cache never had to give a block up"
    for seq_id in list(sim.seqs):
        sim.finish(seq_id)
    sim.check()
    assert sim.device.num_free == sim.device.num_blocks and sim.host.num_free == sim.host.num_blocks
    assert all(sim.device.refcount(b) == 0 for b in range(sim.device.num_blocks))


def make_manager(device_blocks=16, host_blocks=0, prefix_caching=True):
    host = BlockPool(host_blocks, BLOCK_SIZE) if host_blocks else None
    return BlockManager(BlockPool(device_blocks, BLOCK_SIZE), host, prefix_caching)


def test_admit_shares_committed_full_blocks_and_computes_the_rest():
    manager = make_manager()
    first = list(range(10))  # 2 full blocks + 2 tokens
    assert manager.admit(0, first) == 0
    manager.commit(0, first, 10)
    second = first[:8] + [50, 51, 52]
    assert manager.admit(1, second) == 8
    assert manager.table(1)[:2] == manager.table(0)[:2] and manager.table(1)[2] != manager.table(0)[2]
    assert [manager.device.refcount(b) for b in manager.table(1)] == [2, 2, 1]
    third = [99] + first[1:8]  # differs in the first block: the chained hash of block 1 differs too
    assert manager.admit(2, third) == 0
    assert not set(manager.table(2)) & set(manager.table(0))
    assert manager.stats.prefix_hit_tokens == 8 and manager.stats.shared_blocks == 2
    assert manager.take_ops() == []


def test_fully_cached_prompt_recomputes_its_last_token_in_a_copy():
    manager = make_manager()
    tokens = [int(t) for t in random.Random(1).choices(range(30), k=8)]
    manager.admit(0, tokens)
    manager.commit(0, tokens, 8)
    original = list(manager.table(0))
    assert manager.admit(1, tokens) == 7  # the last token is computed again, for its logits
    (op,) = manager.take_ops()
    assert (op.kind, op.src) == ("copy", original[1]) and manager.table(1) == [original[0], op.dst]
    assert manager.device.refcount(original[1]) == 1 and manager.device.block_hash(op.dst) is None
    manager.free(0)
    assert manager.device.lookup(block_hashes(tokens, BLOCK_SIZE)[1]) == original[1]  # still cached when free


def test_fork_copies_the_shared_partial_block_before_writing():
    manager = make_manager()
    manager.admit(0, [1, 2, 3, 4, 5, 6])
    manager.fork(0, 1)
    assert manager.table(1) == manager.table(0) and manager.stats.forked_sequences == 1
    assert manager.prepare_write(1, 6, 7)
    (op,) = manager.take_ops()
    assert op.kind == "copy" and op.src == manager.table(0)[1] and manager.table(1)[1] == op.dst
    assert manager.prepare_write(0, 6, 7) and manager.take_ops() == []  # now held alone: written in place
    assert manager.device.refcount(manager.table(0)[0]) == 2


def test_eviction_takes_unindexed_blocks_first_then_the_least_recently_released():
    manager = make_manager(device_blocks=4)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    for seq_id, tokens in ((0, a), (1, b)):
        manager.admit(seq_id, tokens + [0])
        manager.commit(seq_id, tokens + [0], 5)
    manager.free(1)
    manager.free(0)  # a's full block released last: it outlives b's
    pool = manager.device
    assert pool.num_free == 4 and pool.num_cached == 2
    assert manager.admit(2, [9, 9]) == 0 and pool.num_cached == 2  # an unindexed block, no eviction
    assert manager.admit(3, [7, 7]) == 0 and pool.num_cached == 2
    assert manager.admit(4, [8, 8]) == 0 and pool.evictions == 1
    assert manager.num_cached_blocks(manager.prefix_hashes(a)) == 1
    assert manager.num_cached_blocks(manager.prefix_hashes(b)) == 0


def test_admission_is_all_or_nothing():
    manager = make_manager(device_blocks=3)
    assert manager.admit(0, list(range(8))) == 0
    assert manager.admit(1, list(range(20, 29))) is None  # 3 blocks wanted, 1 free
    assert 1 not in manager and manager.device.num_free == 1
    assert not manager.prepare_write(0, 8, 13) and len(manager.table(0)) == 2


def test_swap_out_and_in_moves_blocks_and_reuses_cached_ones():
    manager = make_manager(device_blocks=6, host_blocks=4)
    tokens = list(range(10))
    manager.admit(0, tokens)
    manager.commit(0, tokens, 10)
    device_blocks = list(manager.table(0))
    assert manager.swap_out(0) and manager.on_host(0)
    out = manager.take_ops()
    assert [(op.kind, op.src) for op in out] == [("swap_out", b) for b in device_blocks]
    assert [op.dst for op in out] == manager.table(0)
    assert manager.device.num_free == 6 and manager.host.num_free == 1
    with pytest.raises(ValueError, match="already swapped out"):
        manager.swap_out(0)
    assert manager.swap_in(0, reserve_tokens=13)
    ops = manager.take_ops()
    # The two full blocks are still in the prefix cache: shared back, only the partial one crosses.
    assert [op.kind for op in ops] == ["swap_in"] and manager.table(0)[:2] == device_blocks[:2]
    assert len(manager.table(0)) == 4 and manager.host.num_free == 4
    assert manager.stats.swapped_in_blocks == 1 and manager.stats.shared_blocks == 2


def test_swap_out_needs_room_on_the_host():
    manager = make_manager(device_blocks=8, host_blocks=2)
    manager.admit(0, list(range(9)))
    assert not manager.swap_out(0) and not manager.on_host(0) and manager.take_ops() == []
    assert manager.device.num_free == 5 and manager.host.num_free == 2
    without_host = make_manager()
    without_host.admit(0, [1])
    assert not without_host.swap_out(0)


def test_without_prefix_caching_nothing_is_shared_or_indexed():
    manager = make_manager(prefix_caching=False)
    tokens = list(range(8))
    manager.admit(0, tokens)
    manager.commit(0, tokens, 8)
    assert manager.admit(1, tokens) == 0 and manager.device.num_cached == 0
    assert not set(manager.table(0)) & set(manager.table(1))


def test_misuse_raises():
    manager = make_manager(host_blocks=4)
    manager.admit(0, [1, 2])
    with pytest.raises(ValueError, match="already holds"):
        manager.admit(0, [1, 2])
    with pytest.raises(ValueError, match="admit it first"):
        manager.prepare_write(7, 0, 1)
    manager.swap_out(0)
    with pytest.raises(ValueError, match="swapped out"):
        manager.prepare_write(0, 2, 3)
    with pytest.raises(ValueError, match="swapped out"):
        manager.fork(0, 1)
    manager.swap_in(0)
    with pytest.raises(ValueError, match="not swapped out"):
        manager.swap_in(0)
