import random
from collections import Counter

import pytest

from llmc.runtime.block_manager import BlockManager
from llmc.runtime.kv_cache import BlockPool, CacheFullError
from llmc.runtime.scheduler import Scheduler, Sequence


def run_step(scheduler: Scheduler, step) -> None:
    """What the engine does with a step, minus the model: advance what is cached, commit, sample."""
    for s in step.prefill + step.decode:
        s.cached = s.num_tokens
    for parent, child in step.forks:
        child.cached = parent.cached
    for s in step.prefill + step.decode + [child for _, child in step.forks]:
        scheduler.commit(s)


def check_ownership(manager: BlockManager, running: list[Sequence]) -> None:
    holders = Counter(b for s in running for b in manager.table(s.seq_id))
    pool = manager.device
    assert all(pool.refcount(b) == holders[b] for b in range(pool.num_blocks)), "refcounts differ from holders"
    assert not pool.free_blocks() & holders.keys(), "a block is both free and held"
    for s in running:
        assert len(manager.table(s.seq_id)) >= pool.blocks_for(s.num_tokens), "a sequence lacks room to write"


@pytest.mark.parametrize("host_blocks", [0, 12])
def test_many_sequences_through_a_small_pool(host_blocks):
    seed = random.randrange(2**32)
    print(f"simulation seed {seed}")  # shown by pytest on failure, to replay the run
    rng = random.Random(seed)
    pool = BlockPool(num_blocks=30, block_size=4)
    manager = BlockManager(pool, BlockPool(host_blocks, 4) if host_blocks else None)
    scheduler = Scheduler(manager, max_batch=6)
    stems = [[rng.randrange(1000) for _ in range(rng.randint(4, 16))] for _ in range(3)]
    sequences = [Sequence(i, rng.choice(stems) + [rng.randrange(1000) for _ in range(rng.randint(1, 14))],
                          max_new_tokens=rng.randint(1, 40)) for i in range(100)]
    for s in sequences:
        scheduler.add(s)
    saw_waiting, steps = False, 0

    while scheduler.has_work:
        steps += 1
        assert steps < 20_000, "the scheduler stopped making progress"
        running_before = sorted((s for s in sequences if s.seq_id in manager and not manager.on_host(s.seq_id)),
                                key=lambda s: s.admitted_at)
        step = scheduler.schedule()
        saw_waiting |= scheduler.num_waiting > 0 and bool(step.prefill or step.decode)
        assert step.prefill or step.decode, "a step with work scheduled nothing"
        live = step.prefill + step.decode + [child for _, child in step.forks]
        assert len({s.seq_id for s in live}) == len(live) == scheduler.num_running <= 6
        if running_before:
            assert running_before[0] in step.decode, "the oldest running sequence was preempted"
        for s in running_before:
            assert s in step.decode or s.seq_id not in manager or manager.on_host(s.seq_id), "a sequence stalled"
        for s in step.decode:
            assert s.cached == s.num_tokens - 1
        check_ownership(manager, live)
        run_step(scheduler, step)
        for s in live:
            s.output.append(rng.randrange(1000))
            if len(s.output) == s.max_new_tokens or rng.random() < 0.03:  # length limit or a random "EOS"
                scheduler.finish(s)
                assert s.finished and s.seq_id not in manager

    assert all(s.finished for s in sequences)
    assert all(1 <= len(s.output) <= s.max_new_tokens for s in sequences)
    order = sorted(sequences, key=lambda s: s.admitted_at)
    assert [s.seq_id for s in order] == list(range(100)), "admission was not first in, first out"
    assert pool.num_free == pool.num_blocks and scheduler.num_running == scheduler.num_waiting == 0
    assert saw_waiting, "the pool never filled up, so the queue was not exercised"
    stats = manager.stats
    assert stats.shared_blocks > 0, stats
    if host_blocks:
        assert stats.preempted_to_host > 0 and stats.swapped_in_blocks > 0, stats
        assert manager.host.num_free == host_blocks
    else:
        assert stats.preempted_to_recompute > 0, stats


def test_blocks_are_allocated_on_demand():
    pool = BlockPool(num_blocks=10, block_size=4)
    scheduler = Scheduler(pool)
    seq = Sequence(0, [1, 2, 3, 4, 5], max_new_tokens=20)
    scheduler.add(seq)
    step = scheduler.schedule()
    assert step.prefill == [seq] and len(scheduler.block_table(seq)) == 2  # the prompt's blocks only
    held = []
    for _ in range(6):
        run_step(scheduler, step)
        seq.output.append(7)
        step = scheduler.schedule()
        held.append(len(scheduler.block_table(seq)))
    # Tokens 6..11 are in the cache once written: a third block when position 8 is written.
    assert held == [2, 2, 2, 3, 3, 3]


def test_head_of_queue_that_does_not_fit_waits_and_holds_back_later_ones():
    pool = BlockPool(num_blocks=6, block_size=4)
    scheduler = Scheduler(pool)
    first = Sequence(0, [1] * 12, max_new_tokens=4)  # 3 blocks, a 4th for its last token
    big = Sequence(1, [2] * 16, max_new_tokens=4)  # 4 blocks: waits for `first`
    small = Sequence(2, [3] * 5, max_new_tokens=1)  # 2 blocks: fit beside `first`, but must not overtake `big`
    for s in (first, big, small):
        scheduler.add(s)
    step = scheduler.schedule()
    assert (step.prefill, step.decode) == ([first], [])
    run_step(scheduler, step)
    first.output.append(9)
    step = scheduler.schedule()
    assert (step.prefill, step.decode) == ([], [first])
    assert scheduler.num_waiting == 2 and pool.num_free == 2
    scheduler.finish(first)
    step = scheduler.schedule()
    assert (step.prefill, step.decode) == ([big, small], [])  # 4 + 2 blocks: both fit now, in arrival order
    assert scheduler.num_waiting == 0 and pool.num_free == 0


def test_max_batch_limits_admission():
    pool = BlockPool(num_blocks=100, block_size=4)
    scheduler = Scheduler(pool, max_batch=3)
    sequences = [Sequence(i, [i + 1, 7], max_new_tokens=2) for i in range(5)]
    for s in sequences:
        scheduler.add(s)
    step = scheduler.schedule()
    assert step.prefill == sequences[:3]
    run_step(scheduler, step)
    for s in sequences[:3]:
        s.output.append(1)
    scheduler.finish(sequences[1])
    step = scheduler.schedule()
    assert (step.prefill, step.decode) == ([sequences[3]], [sequences[0], sequences[2]])
    assert scheduler.num_running == 3 and scheduler.num_waiting == 1


@pytest.mark.parametrize("with_host", [True, False])
def test_preemption_takes_the_newest_and_resumes_it(with_host):
    pool = BlockPool(num_blocks=4, block_size=4)
    manager = BlockManager(pool, BlockPool(4, 4) if with_host else None)
    scheduler = Scheduler(manager)
    old, new = Sequence(0, [1] * 7, max_new_tokens=9), Sequence(1, [2] * 7, max_new_tokens=9)
    scheduler.add(old)
    scheduler.add(new)
    step = scheduler.schedule()
    assert step.prefill == [old, new] and pool.num_free == 0
    run_step(scheduler, step)
    old.output.append(5)
    new.output.append(6)
    step = scheduler.schedule()  # both write position 7: still inside their second block
    assert step.decode == [old, new]
    run_step(scheduler, step)
    old.output.append(5)
    new.output.append(6)
    step = scheduler.schedule()  # position 8 needs a third block: the newer sequence makes room
    assert step.decode == [old] and len(scheduler.block_table(old)) == 3
    if with_host:
        assert [op.kind for op in step.ops] == ["swap_out", "swap_out"] and manager.on_host(new.seq_id)
        assert scheduler.num_swapped == 1 and new.cached == 8 and manager.stats.preempted_to_host == 1
    else:
        assert step.ops == [] and new.seq_id not in manager and new.cached == 0
        assert scheduler.num_waiting == 1 and manager.stats.preempted_to_recompute == 1
    run_step(scheduler, step)
    scheduler.finish(old)
    step = scheduler.schedule()
    if with_host:
        # Its full first block was still in the prefix cache: shared back; only the partial one crosses.
        assert step.decode == [new] and [op.kind for op in step.ops] == ["swap_in"]
        assert manager.stats.swapped_in_blocks == 1 and manager.host.num_free == 4
    else:
        # Prefilled again from prompt + output; its full first block was still in the prefix cache.
        assert step.prefill == [new] and new.cached == 4 and manager.stats.prefix_hit_tokens == 4
    assert len(scheduler.block_table(new)) == 3


def test_identical_prompts_fork_and_prefixes_being_computed_wait_one_step():
    pool = BlockPool(num_blocks=20, block_size=4)
    scheduler = Scheduler(pool)
    stem = [5, 6, 7, 8, 9, 10, 11, 12]
    first, twin, cousin = Sequence(0, stem + [1], 3), Sequence(1, stem + [1], 3), Sequence(2, stem + [2], 3)
    for s in (first, twin, cousin):
        scheduler.add(s)
    step = scheduler.schedule()
    assert step.prefill == [first] and step.forks == [(first, twin)]
    assert scheduler.block_table(twin) == scheduler.block_table(first)
    assert scheduler.num_waiting == 1  # cousin waits: its first blocks are being computed by `first`
    run_step(scheduler, step)
    for s in (first, twin):
        s.output.append(3)
    step = scheduler.schedule()
    assert step.prefill == [cousin] and cousin.cached == 8 and step.decode == [first, twin]
    assert [op.kind for op in step.ops] == ["copy"]  # one of the twins copies the shared partial block
    assert scheduler.block_table(cousin)[:2] == scheduler.block_table(first)[:2]


def test_add_rejects_a_sequence_longer_than_the_whole_pool():
    pool = BlockPool(num_blocks=4, block_size=8)
    scheduler = Scheduler(pool)
    scheduler.add(Sequence(0, [5] * 30, max_new_tokens=2))  # exactly 32 tokens: fits the empty pool
    with pytest.raises(CacheFullError, match="needs 5 blocks"):
        scheduler.add(Sequence(1, [5] * 30, max_new_tokens=3))
    assert scheduler.num_waiting == 1


def test_misuse_raises():
    scheduler = Scheduler(BlockPool(8, 4))
    seq = Sequence(0, [1, 2], max_new_tokens=3)
    with pytest.raises(ValueError, match="not running"):
        scheduler.finish(seq)
    scheduler.add(seq)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(Sequence(0, [3], max_new_tokens=1))
    scheduler.schedule()
    scheduler.finish(seq)
    with pytest.raises(ValueError, match="not running"):
        scheduler.finish(seq)  # a second finish would double-free its blocks
    with pytest.raises(ValueError, match="already run"):
        scheduler.add(seq)
    with pytest.raises(ValueError, match="empty prompt"):
        Sequence(1, [], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sequence(1, [1], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(BlockPool(8, 4), max_batch=0)
