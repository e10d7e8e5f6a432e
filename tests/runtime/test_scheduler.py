import random

import pytest

from llmc.runtime.kv_cache import BlockPool, CacheFullError
from llmc.runtime.scheduler import Scheduler, Sequence


def random_sequence(rng: random.Random, seq_id: int) -> Sequence:
    prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 30))]
    return Sequence(seq_id, prompt, max_new_tokens=rng.randint(1, 20))


def check_ownership(pool: BlockPool, live: list[Sequence]) -> None:
    held = [b for s in live for b in s.blocks]
    assert len(held) == len(set(held)), "a block is held by two live sequences"
    assert all(pool.refcount(b) == 1 for b in held)
    assert pool.num_free + len(held) == pool.num_blocks
    for s in live:
        assert len(s.blocks) == pool.blocks_for(s.max_tokens)
        assert s.num_tokens <= len(s.blocks) * pool.block_size


def test_many_sequences_through_a_small_pool():
    seed = random.randrange(2**32)
    print(f"simulation seed {seed}")  # shown by pytest on failure, to replay the run
    rng = random.Random(seed)
    pool = BlockPool(num_blocks=30, block_size=4)
    scheduler = Scheduler(pool, max_batch=6)
    sequences = [random_sequence(rng, i) for i in range(100)]
    assert sum(pool.blocks_for(s.max_tokens) for s in sequences) > 5 * pool.num_blocks
    for s in sequences:
        scheduler.add(s)
    admitted, saw_waiting, steps = [], False, 0

    while scheduler.has_work:
        steps += 1
        assert steps < 10_000, "the scheduler stopped making progress"
        live_before = [s for s in sequences if s.blocks]
        to_prefill, to_decode = scheduler.schedule()
        saw_waiting |= scheduler.num_waiting > 0 and bool(to_prefill or to_decode)
        assert to_prefill or to_decode, "a step with work scheduled nothing"
        assert not {s.seq_id for s in to_prefill} & {s.seq_id for s in to_decode}
        assert {s.seq_id for s in to_decode} == {s.seq_id for s in live_before}, "a running sequence stalled"
        assert len(to_prefill) + len(to_decode) == scheduler.num_running <= 6
        admitted += [s.seq_id for s in to_prefill]
        live = to_prefill + to_decode
        check_ownership(pool, live)

        for s in to_prefill:
            assert s.cached == 0 and not s.output
            s.cached = len(s.prompt)
        for s in to_decode:
            assert s.cached == s.num_tokens - 1
            s.cached += 1  # the last sampled token is written this step
        for s in live:
            s.output.append(rng.randrange(1000))
            if len(s.output) == s.max_new_tokens or rng.random() < 0.08:  # length limit or a random "EOS"
                scheduler.finish(s)
                assert s.finished and not s.blocks

    assert all(s.finished for s in sequences)
    assert all(1 <= len(s.output) <= s.max_new_tokens for s in sequences)
    assert admitted == list(range(100)), "admission was not first in, first out"
    assert pool.num_free == pool.num_blocks and scheduler.num_running == scheduler.num_waiting == 0
    assert saw_waiting, "the pool never filled up, so the queue was not exercised"


def test_head_of_queue_that_does_not_fit_waits_and_holds_back_later_ones():
    pool = BlockPool(num_blocks=6, block_size=4)
    scheduler = Scheduler(pool)
    first = Sequence(0, [1] * 12, max_new_tokens=4)  # 4 blocks
    big = Sequence(1, [2] * 16, max_new_tokens=4)  # 5 blocks: waits for `first`
    small = Sequence(2, [3] * 5, max_new_tokens=1)  # 2 blocks: fit beside `first`, but must not overtake `big`
    for s in (first, big, small):
        scheduler.add(s)
    assert scheduler.schedule() == ([first], [])
    assert scheduler.schedule() == ([], [first])
    assert scheduler.num_waiting == 2 and pool.num_free == 2
    scheduler.finish(first)
    assert scheduler.schedule() == ([big], [])
    assert scheduler.schedule() == ([], [big])
    assert scheduler.num_waiting == 1 and pool.num_free == 1
    scheduler.finish(big)
    assert scheduler.schedule() == ([small], [])


def test_max_batch_limits_admission():
    pool = BlockPool(num_blocks=100, block_size=4)
    scheduler = Scheduler(pool, max_batch=3)
    sequences = [Sequence(i, [i + 1, 7], max_new_tokens=2) for i in range(5)]
    for s in sequences:
        scheduler.add(s)
    assert scheduler.schedule() == (sequences[:3], [])
    scheduler.finish(sequences[1])
    assert scheduler.schedule() == ([sequences[3]], [sequences[0], sequences[2]])
    assert scheduler.num_running == 3 and scheduler.num_waiting == 1


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
    with pytest.raises(ValueError, match="empty prompt"):
        Sequence(1, [], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sequence(1, [1], max_new_tokens=0)
