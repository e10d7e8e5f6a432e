"""Engine: batching, queueing through a small KV pool, block reuse, prefix sharing, offload and preemption,
the KV budget, length limits and seeded sampling; two engines in one process launching their own kernels."""
import functools
from pathlib import Path

import pytest
import torch

import llmc
from llmc.runtime.engine import PromptTooLongError, slot_mapping


def random_prompts(n, low=1, high=40, vocab=97, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def test_many_sequences_through_a_small_pool(tiny_bundle):
    _, bundle = tiny_bundle
    prompts = random_prompts(100)
    small = llmc.load(bundle, kv_cache_tokens=8 * 16, max_batch=8)  # 8 blocks: a few sequences at a time
    pool = small.cache.pool
    initial = pool.num_free
    seen_full = []
    allocate = pool.allocate

    def watch(n):
        blocks = allocate(n)
        seen_full.append(pool.num_free < 2)
        return blocks

    pool.allocate = watch
    got = small.generate(prompts, max_new_tokens=6)
    assert all(len(g) == 6 or g[-1] in small.eos_token_ids for g in got)
    assert pool.num_free == initial
    assert any(seen_full), "the pool never ran short: the test did not exercise queueing"
    # The same prompts, all admitted at once into a large pool, give the same tokens.
    large = llmc.load(bundle, kv_cache_tokens=100 * 64, max_batch=100)
    assert large.generate(prompts, max_new_tokens=6) == got


def test_blocks_are_reused_across_calls(tiny_bundle):
    _, bundle = tiny_bundle
    # Room for all three at once (3 blocks each at most): a preempted and recomputed prompt would hit its own
    # cached blocks within the first call (a flake when the random lengths came out long).
    engine = llmc.load(bundle, kv_cache_tokens=9 * 16, max_batch=4)
    prompts = random_prompts(3, 17, 40)
    first = engine.generate(prompts, max_new_tokens=5)
    assert engine.kv_stats.prefix_hit_tokens == 0
    assert engine.generate(prompts, max_new_tokens=5) == first  # stale cache contents never leak into results
    assert engine.kv_stats.prefix_hit_tokens > 0, "the second call did not reuse the first call's full blocks"
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


def test_matches_single_prompt_generation(tiny_bundle):
    ckpt, bundle = tiny_bundle
    engine = llmc.load(bundle)
    prompts = random_prompts(4, 1, 50)
    batched = engine.generate(prompts, max_new_tokens=12)
    assert [engine.generate([p], max_new_tokens=12)[0] for p in prompts] == batched


def test_long_prompts_prefill_in_chunks_that_read_the_cache(tiny_bundle):
    _, bundle = tiny_bundle
    prompts = random_prompts(5, 20, 61)
    whole = llmc.load(bundle, prefill_chunk=10_000)
    chunked = llmc.load(bundle, prefill_chunk=7)
    calls = []
    graph = chunked.graphs["prefill"]

    def counting(*inputs):
        calls.append(int(inputs[0].shape[1]))  # tokens per row this call
        return graph(*inputs)

    chunked.graphs["prefill"] = counting
    assert chunked.generate(prompts, max_new_tokens=10) == whole.generate(prompts, max_new_tokens=10)
    longest = max(map(len, prompts))
    assert len(calls) == -(-longest // 7) and max(calls) == 7, calls
    assert chunked.timing.prefill_tokens == sum(map(len, prompts))
    with pytest.raises(ValueError, match="prefill_chunk"):
        llmc.load(bundle, prefill_chunk=0)


def test_prompt_over_max_length_is_refused(tiny_bundle):
    _, bundle = tiny_bundle
    engine = llmc.load(bundle)
    limit = engine.max_seq_len
    with pytest.raises(PromptTooLongError, match="maximum sequence length"):
        engine.generate([[1] * (limit - 3)], max_new_tokens=4)
    assert len(engine.generate([[1] * (limit - 4)], max_new_tokens=4)[0]) <= 4
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[10**6]])


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny_bundle):
    _, bundle = tiny_bundle
    engine = llmc.load(bundle)
    a, b = random_prompts(2, 3, 20)
    both = engine.generate([a, b], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert engine.generate([a, b], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7) == both
    assert engine.generate([a], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)[0] == both[0]
    others = [engine.generate([a], max_new_tokens=16, temperature=1.0, seed=s)[0] for s in range(8, 12)]
    assert any(o != both[0] for o in others), "different seeds never changed the sample"


def shared_prefix_prompts(vocab=97):
    """Fresh tokens, fixed structure: twins (identical, partial last block), prompts continuing three stems,
    and a block-aligned prompt that comes back later; lengths 5 to 74."""
    stems = [torch.randint(0, vocab, (n,)).tolist() for n in (40, 23, 33)]
    aligned = torch.randint(0, vocab, (32,)).tolist()

    def tail(n):
        return torch.randint(0, vocab, (n,)).tolist()

    twin = stems[0] + tail(5)
    return [twin, list(twin), stems[0] + tail(9), stems[1] + tail(3), aligned, stems[2] + tail(17),
            stems[1] + tail(30), tail(5), stems[0] + tail(34), stems[2] + tail(1), list(aligned), stems[1] + tail(12)]


@pytest.fixture(scope="module")
def unbounded_run(tiny_bundle):
    """Reference tokens: a pool that holds every sequence at once, no prefix sharing."""
    _, bundle = tiny_bundle
    prompts = shared_prefix_prompts()
    engine = llmc.load(bundle, kv_cache_tokens=len(prompts) * 128, max_batch=len(prompts), prefix_caching=False)
    runs = {t: engine.generate(prompts, max_new_tokens=24, temperature=t, seed=11) for t in (0.0, 0.9)}
    assert engine.kv_stats.preempted_to_host == engine.kv_stats.preempted_to_recompute == 0
    assert engine.kv_stats.shared_blocks == 0
    return prompts, runs


@pytest.mark.parametrize("offload, temperature", [("64KiB", 0.0), ("64KiB", 0.9), (0, 0.0)])
def test_small_pool_with_sharing_and_preemption_generates_the_unbounded_tokens(tiny_bundle, unbounded_run,
                                                                               offload, temperature):
    _, bundle = tiny_bundle
    prompts, want = unbounded_run
    # 10 blocks: a few sequences at a time, growing into each other; the host tier holds 8 blocks.
    engine = llmc.load(bundle, kv_cache_tokens=10 * 16, kv_offload_memory=offload, max_batch=8)
    assert engine.cache.capacity_tokens == 160
    got = engine.generate(prompts, max_new_tokens=24, temperature=temperature, seed=11)
    assert got == want[temperature]
    stats = engine.kv_stats
    assert stats.shared_blocks > 0 and stats.prefix_hit_tokens > 0, stats
    assert stats.forked_sequences >= 1 and stats.copy_on_write >= 1, stats  # the twins
    assert stats.peak_used_blocks == engine.cache.num_blocks, stats  # the pool ran full
    if offload:
        assert engine.cache.host_capacity_tokens == 128
        assert stats.preempted_to_host > 0 and stats.swapped_in_blocks > 0, stats
        assert engine.cache.host_pool.num_free == engine.cache.host_pool.num_blocks
    else:
        assert stats.preempted_to_recompute > 0 and stats.preempted_to_host == 0, stats
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_on_token_streams_each_prompts_tokens_as_they_are_generated(tiny_bundle, unbounded_run, temperature):
    """Through forks, prefix sharing and preemption (a small pool): each prompt's streamed tokens are its returned
    tokens, in order, and they arrive step by step, not at the end."""
    _, bundle = tiny_bundle
    prompts, want = unbounded_run
    engine = llmc.load(bundle, kv_cache_tokens=10 * 16, max_batch=8)
    streamed = {i: [] for i in range(len(prompts))}
    steps_seen = []

    def on_token(index, token):
        streamed[index].append(token)
        steps_seen.append(engine.timing.steps)

    got = engine.generate(prompts, max_new_tokens=24, temperature=temperature, seed=11, on_token=on_token)
    assert got == want[temperature]
    assert [streamed[i] for i in range(len(prompts))] == got
    assert engine.kv_stats.preempted_to_recompute > 0 and engine.kv_stats.forked_sequences >= 1, engine.kv_stats
    assert len(set(steps_seen)) == engine.timing.steps, "tokens were not handed out at each step"


def test_prompts_sharing_a_long_prefix_hold_fewer_blocks(tiny_bundle):
    _, bundle = tiny_bundle
    prefix = torch.randint(0, 97, (64,)).tolist()  # 4 full blocks of 16
    prompts = [prefix + torch.randint(0, 97, (5,)).tolist() for _ in range(6)]
    held, outputs = {}, {}
    for sharing in (True, False):
        engine = llmc.load(bundle, kv_cache_tokens=40 * 16, max_batch=8, prefix_caching=sharing)
        outputs[sharing] = engine.generate(prompts, max_new_tokens=8)
        held[sharing] = engine.kv_stats.peak_used_blocks
    # Each sequence caches at most 64 + 5 + 7 = 76 tokens: 5 blocks alone, or the 4 shared ones plus 1 of its own.
    message = f"6 prompts with a 64-token common prefix held {held[True]} blocks shared, {held[False]} unshared"
    assert held[True] == 4 + 6 * 1 and held[False] == 6 * 5, message
    assert outputs[True] == outputs[False]


def test_kv_cache_budget(tiny_bundle):
    _, bundle = tiny_bundle
    default = llmc.load(bundle)
    longest = default.max_seq_len * default.cache.bytes_per_token  # max_seq_len is a whole number of blocks
    assert default.cache.capacity_tokens == 4 * default.max_seq_len and default.cache.host_pool is None
    exact = llmc.load(bundle, kv_cache_memory=longest)
    assert exact.cache.capacity_tokens == exact.max_seq_len
    assert len(exact.generate([[1] * (exact.max_seq_len - 4)], max_new_tokens=4)[0]) == 4
    kib = llmc.load(bundle, kv_cache_memory=f"{3 * longest // 1024}KiB", kv_offload_memory=f"{longest}")
    assert kib.cache.capacity_tokens == 3 * kib.max_seq_len and kib.cache.host_capacity_tokens == kib.max_seq_len
    with pytest.raises(ValueError, match="fewer than one sequence of the bundle's max_seq_len"):
        llmc.load(bundle, kv_cache_memory=longest - 1)
    with pytest.raises(ValueError, match="one of"):
        llmc.load(bundle, kv_cache_memory=longest, kv_cache_tokens=128)
    with pytest.raises(ValueError, match="CUDA"):
        llmc.load(bundle, kv_cache_fraction=0.5)
    with pytest.raises(ValueError, match="memory size"):
        llmc.load(bundle, kv_cache_memory="lots")


def test_an_interrupted_generate_gives_its_blocks_back(tiny_bundle):
    _, bundle = tiny_bundle
    engine = llmc.load(bundle, kv_cache_tokens=10 * 16, kv_offload_memory="64KiB", max_batch=8)
    prompts = shared_prefix_prompts()
    want = engine.generate(prompts, max_new_tokens=10)
    decode, calls = engine.graphs["decode"], 0

    def interrupted(*inputs):
        nonlocal calls
        calls += 1
        if calls == 8:
            host = engine.cache.host_pool
            assert host.num_free < host.num_blocks, "interrupt while a sequence is swapped out"
            raise KeyboardInterrupt
        return decode(*inputs)

    engine.graphs["decode"] = interrupted
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts, max_new_tokens=10)
    pool, host = engine.cache.pool, engine.cache.host_pool
    assert pool.num_free == pool.num_blocks and pool.num_cached == 0 and host.num_free == host.num_blocks
    engine.graphs["decode"] = decode
    assert engine.generate(prompts, max_new_tokens=10) == want


def test_slot_mapping_follows_the_block_tables():
    tables = [[5, 2, 7], [3], [4, 0]]
    slots = slot_mapping(tables, [14, 1, 6], [4, 2, 1], 4, 8)
    assert slots.dtype == torch.long and slots.tolist() == [
        [2 * 8 + 6, 2 * 8 + 7, 7 * 8 + 0, 7 * 8 + 1],  # positions 14..17 cross from block 2 into block 7
        [3 * 8 + 1, 3 * 8 + 2, -1, -1],  # padding past the row's length is -1
        [4 * 8 + 6, -1, -1, -1]]
    with pytest.raises(ValueError, match="allocate its blocks"):
        slot_mapping([[1]], [7], [2], 2, 8)
    with pytest.raises(ValueError, match="one cache slot twice"):
        slot_mapping([[1], [1]], [0, 0], [1, 1], 1, 8)


def test_graphs_that_write_the_cache_give_the_tokens_of_the_engines_write(tiny_bundle, tmp_path):
    """The default bundle's graphs write the KV cache (fuse_kv_write); compiled without that pass, the engine writes
    new_k / new_v itself. Same greedy tokens, through prefix sharing, forks and copy-on-write."""
    ckpt, bundle = tiny_bundle
    unfused = llmc.compile(ckpt.path, target="cpu", dtype="float32", out=tmp_path / "unfused.llmc", passes="-fuse_kv_write")
    engines = {"graph": llmc.load(bundle, max_batch=8), "engine": llmc.load(unfused, max_batch=8)}
    assert engines["graph"].graphs_writing_kv == {"prefill", "decode"}
    assert engines["engine"].graphs_writing_kv == frozenset()
    writes = {}
    for who, engine in engines.items():
        writes[who] = 0

        def counted(*args, who=who, write=engine.cache.write):
            writes[who] += 1
            return write(*args)

        engine.cache.write = counted
    prompts = shared_prefix_prompts()
    tokens = {who: engine.generate(prompts, max_new_tokens=12) for who, engine in engines.items()}
    assert tokens["graph"] == tokens["engine"]
    assert writes["graph"] == 0 and writes["engine"] > 0
    assert engines["graph"].kv_stats.copy_on_write >= 1  # the twins: a shared block written after a fork


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kv_cache_fraction_follows_free_memory():
    from llmc.runtime.engine import kv_cache_budget

    device = torch.device("cuda")
    per_block = 1 << 20
    free = torch.cuda.mem_get_info(device)[0]
    budget = kv_cache_budget(device, per_block, 16, 128, fraction=0.5)
    assert abs(budget - free // 2) <= free // 50  # free memory moves a little between the two readings
    assert free > 64 * per_block, "the GPU is nearly full"
    assert kv_cache_budget(device, per_block, 16, 128) == 4 * 8 * per_block  # 4 sequences of 128 tokens


def test_two_engines_each_launch_their_own_bundles_kernels(tiny_bundle, tmp_path, monkeypatch):
    """Two engines in one process, each given the kernel scope load() gives an engine on CUDA over its bundle's
    kernels/ (each library stands in for a bundle built for another target: here both ship the kernel the steps
    launch), their steps interleaved and one engine generating inside the other's token callback: every launch
    a graph makes goes to its own engine's library, none to the other's nor to the JIT kernel. With the kernels
    chosen process-wide (the last loaded bundle's), engine a's launches went to b's library."""
    from triton import knobs

    from llmc.codegen.triton import launch, render
    from llmc.runtime import graphs as graphs_module, kernels

    spec = dict(dtype="float32", weight_dtype="float32", out_dtype="float32", n=32, block_n=32, num_warps=1)
    x, weight = torch.randn(5, 32), torch.randn(32)
    args = (x, weight, torch.empty_like(x), x.stride(0), 1e-6)
    with launch.recording("sm_80") as recorder:
        launch.load("rms_norm", **spec)[(5,)](*args, num_warps=1)
    (planned,) = recorder.specs
    libraries, jit_launches = {}, []

    class Library:  # KernelLibrary's interface (a real one loads cubins onto a GPU); records its launches
        def __init__(self, directory):
            self.index = type("Index", (), {"kernels": {planned.key(): None}})()
            self.launches = 0
            libraries[Path(directory).parent.name] = self

        def load_all(self):
            return {}

        def kernel(self, key):
            def launch_kernel(grid, *runtime_args):
                self.launches += 1
            return launch_kernel

    class JitKernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: jit_launches.append(grid)

    monkeypatch.setattr(kernels, "KernelLibrary", Library)
    monkeypatch.setattr(render, "load", lambda op, **spec: JitKernel())  # what a launch without a cubin compiles
    _, bundle = tiny_bundle
    engines, calls = {}, {}
    for name in ("a", "b"):
        (tmp_path / name / "kernels").mkdir(parents=True)
        (tmp_path / name / "kernels" / "index.json").write_text("{}")
        engine = engines[name] = llmc.load(bundle)
        engine.kernel_scope = graphs_module.shipped_kernel_scope(tmp_path / name / "kernels")
        calls[name] = 0

        def launching(*inputs, graph, name=name):
            calls[name] += 1  # a step's llmc op on CUDA: its launcher loads the kernel and launches it
            launch.load("rms_norm", **spec)[(5,)](*args, num_warps=1)
            return graph(*inputs)

        engine.graphs = {kind: functools.partial(launching, graph=g) for kind, g in engine.graphs.items()}
    prompts = random_prompts(3, high=12, seed=0)
    with knobs.runtime.scope():
        knobs.runtime.interpret = False  # shipped kernels serve compiled launches only
        engines["a"].generate(prompts, max_new_tokens=3)
        engines["b"].generate(prompts, max_new_tokens=2)
        engines["a"].generate(prompts, max_new_tokens=2,
                              on_token=lambda i, t: engines["b"].generate([[t]], max_new_tokens=1))
        engines["b"].generate(prompts, max_new_tokens=1)
    assert calls["a"] > 0 and calls["b"] > 0
    assert {name: library.launches for name, library in libraries.items()} == calls
    assert jit_launches == []
