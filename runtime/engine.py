"""Engine: a loaded bundle that generates. Owns the graphs, the paged KV cache and the scheduling loop.

Each step runs one graph over a batch: newly admitted (or recompute-preempted) sequences are prefilled from
their first uncached token (right-padded to the longest; padding never reaches a real token because attention
is causal), running ones decode one token. Each step's keys and values go into the sequences' blocks at the slots
the engine passes (slot_mapping): graphs compiled with the fuse_kv_write pass write them there themselves
(llmc::rope_write_kv); others return them (new_k, new_v) and the engine writes them with PagedKVCache.write. Before
the step, it runs the block transfers the scheduler decided (copy-on-write, swaps to and from the host tier).
On CUDA each graph call runs inside the engine's kernel scope, in which the Triton launchers launch its own
bundle's shipped kernels: two engines in one process never use each other's.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from llmc.codegen import ops  # noqa: F401  (registers llmc:: ops the graphs call)
from llmc.common.contract import DEFAULT_MAX_BATCH, STEP_INPUTS
from llmc.common.errors import LlmcError, UsageError
from llmc.runtime.block_manager import BlockManager, KVStats
from llmc.runtime.bundle import Bundle, BundleError, open_bundle
from llmc.runtime.chat import ChatTemplate, bundle_template, reply
from llmc.runtime.graphs import load_graphs
from llmc.runtime.kv_cache import PagedKVCache, block_bytes, format_bytes, parse_memory_size
from llmc.runtime.sampling import make_generators, sample
from llmc.runtime.scheduler import Scheduler, Sequence

# Without a budget: room for this many longest sequences (capped on CUDA by DEFAULT_CUDA_FRACTION of free memory).
DEFAULT_SEQUENCES = 4
DEFAULT_CUDA_FRACTION = 0.9
# Long prompts are prefilled this many tokens at a time, each chunk reading the cache the earlier ones wrote:
# activations then scale with the chunk, not the prompt, and the attention kernels still see long key ranges.
DEFAULT_PREFILL_CHUNK = 512


class PromptTooLongError(LlmcError, ValueError):
    pass


@dataclass
class Timing:
    """Wall-clock figures of the last generate() call."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0  # tokens computed by prefill steps (prefix cache hits excluded)
    decode_tokens: int = 0
    steps: int = 0
    first_token_s: float | None = None

    def summary(self) -> str:
        rate = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        ttft = f"{self.first_token_s * 1e3:.1f} ms" if self.first_token_s is not None else "-"
        return (f"prefill {self.prefill_tokens} tokens in {self.prefill_s * 1e3:.1f} ms, time to first token {ttft}; "
                f"decode {self.decode_tokens} tokens in {self.decode_s * 1e3:.1f} ms ({rate:.1f} tok/s)")


@dataclass
class Engine:
    bundle: Bundle
    device: torch.device
    cache: PagedKVCache
    graphs: dict
    max_batch: int
    tokenizer: object | None = None
    timing: Timing = field(default_factory=Timing)
    prefix_caching: bool = True
    kv_stats: KVStats = field(default_factory=KVStats)  # of the last generate() call
    # Graphs that write every layer's keys and values into the cache themselves (runtime/graphs.py graph_writes_kv).
    graphs_writing_kv: frozenset[str] = frozenset()
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # most tokens of one sequence a prefill graph call computes
    # Entered around every graph call: on CUDA, the scope in which the launchers launch this engine's bundle's
    # shipped kernels (codegen/triton/hooks.py `using`), whatever kernels other engines in the process use.
    kernel_scope: Callable[[], AbstractContextManager] = contextlib.nullcontext

    @property
    def max_seq_len(self) -> int:
        return self.bundle.manifest["max_seq_len"]

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.bundle.manifest.get("eos_token_ids") or [])

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """The new tokens of each prompt (ending at an end-of-sequence token if one is produced).

        on_token(index, token_id) is called as each token is generated, index being its prompt's position in
        prompts: what it receives for an index, in order, is that prompt's returned list."""
        if max_new_tokens < 1:
            raise UsageError("max_new_tokens must be at least 1")
        for i, p in enumerate(prompts):
            if not p:
                raise UsageError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens that exceeds the bundle's "
                    f"maximum sequence length {self.max_seq_len} (recompile with a larger --max-seq-len)")
            bad = [t for t in p if not 0 <= t < self.bundle.config["vocab_size"]]
            if bad:
                raise UsageError(f"prompt {i} has token id {bad[0]} outside the vocabulary")
        seqs = [Sequence(i, list(p), max_new_tokens) for i, p in enumerate(prompts)]
        self.kv_stats = KVStats()
        blocks = BlockManager(self.cache.pool, self.cache.host_pool, self.prefix_caching, self.kv_stats)
        scheduler = Scheduler(blocks, max_batch=self.max_batch)
        for s in seqs:
            scheduler.add(s)
        generators = make_generators(seed, [s.seq_id for s in seqs]) if temperature > 0 else None
        self.timing = Timing()
        try:
            self._run(scheduler, temperature, top_p, generators, on_token)
        except BaseException:
            # Interrupted (or failed) mid-generation: give the blocks back, and forget what the device blocks hold,
            # since a step may have stopped between deciding block transfers and running them.
            for seq_id in blocks.seq_ids():
                blocks.free(seq_id)
            self.cache.pool.forget_contents()
            raise
        return [s.output for s in seqs]

    def _run(self, scheduler: Scheduler, temperature: float, top_p: float, generators,
             on_token: Callable[[int, int], None] | None) -> None:
        start = time.perf_counter()
        while scheduler.has_work:
            step = scheduler.schedule()
            self.cache.apply(step.ops)
            for group, kind in ((step.prefill, "prefill"), (step.decode, "decode")):
                if not group:
                    continue
                t = time.perf_counter()
                logits, computed = self._step(scheduler, group, kind)
                samplers, rows = list(group), list(range(len(group)))
                if kind == "prefill" and step.forks:
                    # A fork shares its parent's blocks and prompt, hence its parent's logits.
                    row_of = {s.seq_id: r for r, s in enumerate(group)}
                    for parent, child in step.forks:
                        child.cached = parent.cached
                        samplers.append(child)
                        rows.append(row_of[parent.seq_id])
                    logits = logits[torch.tensor(rows, device=logits.device)]
                picks = generators and [generators[s.seq_id] for s in samplers]
                tokens = sample(logits.float(), temperature, top_p, picks).tolist()
                for s, tok in zip(samplers, tokens):
                    s.output.append(tok)
                    scheduler.commit(s)
                    if on_token is not None:
                        on_token(s.seq_id, tok)
                    if len(s.output) >= s.max_new_tokens or tok in self.eos_token_ids:
                        scheduler.finish(s)
                self._record(kind, computed, time.perf_counter() - t, start)

    def _record(self, kind: str, computed: int, elapsed: float, start: float) -> None:
        if kind == "prefill":
            self.timing.prefill_s += elapsed
            self.timing.prefill_tokens += computed
            if self.timing.first_token_s is None:
                self.timing.first_token_s = time.perf_counter() - start
        else:
            self.timing.decode_s += elapsed
            self.timing.decode_tokens += computed
        self.timing.steps += 1

    @torch.no_grad()
    def _step(self, scheduler: Scheduler, group: list[Sequence], kind: str) -> tuple[torch.Tensor, int]:
        """Runs group's step; returns its logits [B, V] and how many tokens it computed."""
        if kind == "decode":
            tokens = [[s.output[-1] if s.output else s.prompt[-1]] for s in group]
            return self._run_graph(scheduler, group, tokens, kind), len(group)
        # Prefill in chunks: each round takes the next prefill_chunk uncached tokens of every sequence that has
        # some left; a sequence's logits are those of the round that computed its last token.
        pending = {s.seq_id: _uncached(s) for s in group}
        last_logits, computed = {}, 0
        while active := [s for s in group if pending[s.seq_id]]:
            chunks = [pending[s.seq_id][:self.prefill_chunk] for s in active]
            logits = self._run_graph(scheduler, active, chunks, kind)
            for row, (s, chunk) in enumerate(zip(active, chunks)):
                pending[s.seq_id] = pending[s.seq_id][len(chunk):]
                if not pending[s.seq_id]:
                    last_logits[s.seq_id] = logits[row]
            computed += sum(map(len, chunks))
        return torch.stack([last_logits[s.seq_id] for s in group]), computed

    @torch.no_grad()
    def _run_graph(self, scheduler: Scheduler, group: list[Sequence], tokens: list[list[int]], kind: str
                   ) -> torch.Tensor:
        """One call of graph `kind` over group, tokens[i] following what sequence i has cached; logits [B, V]."""
        logits = self.run_step(kind, [scheduler.block_table(s) for s in group], [s.cached for s in group], tokens)
        for s, t in zip(group, tokens):
            s.cached += len(t)
        return logits

    @torch.no_grad()
    def run_step(self, kind: str, blocks: list[list[int]], cached: list[int], tokens: list[list[int]]
                 ) -> torch.Tensor:
        """Graph `kind` over a batch: row i's tokens follow the cached[i] tokens its blocks hold, and their keys
        and values land in those blocks (which must have room); logits [B, V] of each row's last token."""
        dev = self.device
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens], dtype=torch.long, device=dev)
        past = torch.tensor(cached, dtype=torch.long, device=dev)
        positions = past[:, None] + torch.arange(width, device=dev)
        # Only the blocks holding cached tokens are read; one (fully masked) block when nothing is cached.
        reads = [b[:max(1, self.cache.pool.blocks_for(n))] for n, b in zip(cached, blocks)]
        table = self.cache.block_table_tensor(reads).to(dev)
        last = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=dev)
        slots = slot_mapping(blocks, cached, lengths, width, self.cache.block_size).to(dev)
        with self.kernel_scope():
            logits, new_k, new_v = self.graphs[kind](ids, positions, self.cache.k, self.cache.v, table, past, last,
                                                     slots)
        if kind not in self.graphs_writing_kv:
            self.cache.write(blocks, cached, lengths, new_k, new_v)
        return logits

    @torch.no_grad()
    def warm_up(self) -> None:
        """Runs each graph once on one token, writing nothing to the cache, so first-call costs (lazy imports,
        kernel and allocator set-up) land in load time, not in the first request's time to first token."""
        dev = self.device
        one = torch.zeros(1, 1, dtype=torch.long, device=dev)
        table = torch.zeros(1, 1, dtype=torch.long, device=dev)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        nowhere = torch.full((1, 1), -1, dtype=torch.long, device=dev)  # a graph that writes the cache skips -1
        for graph in self.graphs.values():
            with self.kernel_scope():
                graph(one, one, self.cache.k, self.cache.v, table, zero, zero, nowhere)

    @cached_property
    def chat_template(self) -> ChatTemplate:
        """The bundle's chat template (read on first use); ValueError when it has none."""
        return bundle_template(self)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The token ids of messages rendered with the chat template, ending where the assistant's reply begins."""
        return self.chat_template.encode(self.tokenizer, messages)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
        """The assistant's reply to messages ([{"role": "user", "content": "..."}, ...]), streamed to on_text in
        whole characters (runtime/chat.py's reply)."""
        return reply(self, messages, max_new_tokens, temperature, top_p, seed, on_text)

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            raise UsageError("this bundle has no tokenizer; pass token ids instead of text")
        return self.tokenizer.decode(tokens)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UsageError("this bundle has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text).ids


def slot_mapping(block_tables: list[list[int]], starts: list[int], lengths: list[int], width: int,
                 block_size: int) -> torch.Tensor:
    """[B, width] int64 (on the CPU): the flat cache slot (block * block_size + offset) of token i < lengths[b] of
    row b, which sits at position starts[b] + i of the sequence whose blocks are block_tables[b]; -1 for the
    padding past lengths[b]. The slots PagedKVCache.write fills, in the form the graphs take them."""
    rows, count = [], 0
    for b, (blocks, start, length) in enumerate(zip(block_tables, starts, lengths, strict=True)):
        if start + length > len(blocks) * block_size:
            raise ValueError(f"sequence {b}: positions up to {start + length} do not fit its {len(blocks)} blocks of "
                             f"{block_size}; allocate its blocks before the step")
        row = [blocks[p // block_size] * block_size + p % block_size for p in range(start, start + length)]
        rows.append(row + [-1] * (width - length))
        count += length
    # Two tokens aimed at one slot would race in the kernel that writes them.
    if len({slot for row in rows for slot in row if slot >= 0}) != count:
        raise ValueError("the step writes one cache slot twice; sequences in a batch must not share the blocks "
                         "they write")
    return torch.tensor(rows, dtype=torch.long)


def _uncached(seq: Sequence) -> list[int]:
    """seq's tokens from its first uncached one (without building prompt + output in full)."""
    prompt_len = len(seq.prompt)
    if seq.cached >= prompt_len:
        return seq.output[seq.cached - prompt_len:]
    return seq.prompt[seq.cached:] + seq.output


def load(path: str | Path, device: str | None = None, kv_cache_memory: int | str | None = None,
         kv_cache_fraction: float | None = None, kv_offload_memory: int | str = 0, kv_cache_tokens: int | None = None,
         max_batch: int = DEFAULT_MAX_BATCH, prefix_caching: bool = True,
         prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Engine:
    """Opens and verifies a bundle, loads its weights and graphs, and allocates the KV cache.

    The device pool's size comes from at most one of: kv_cache_memory (bytes, or a string such as "2GiB"),
    kv_cache_fraction (of the GPU memory still free once the weights are loaded; CUDA only: the rest is left to
    activations), kv_cache_tokens. Without any: room for DEFAULT_SEQUENCES sequences of the bundle's
    max_seq_len, capped on CUDA at DEFAULT_CUDA_FRACTION of free memory. The pool must hold one max_seq_len
    sequence. kv_offload_memory (bytes or a string) sizes the host tier that preempted sequences are swapped to
    (0: none; they are then recomputed). prefix_caching shares cached prompt blocks between sequences.
    prefill_chunk: the most tokens of one prompt a prefill step computes at once (longer prompts take several).
    """
    bundle = open_bundle(path)
    if not bundle.has_weights:
        raise BundleError(f"{path} was compiled without weights; bind a checkpoint first (llmc compile ... --weights DIR)")
    backend = bundle.manifest.get("backend", "triton")
    if backend == "triton" and STEP_INPUTS[-1] not in bundle.graph.get("inputs", []):
        raise BundleError(f"{path} was compiled by an older llmc whose graphs take no slot_mapping input; "
                          "compile it again")
    if max_batch < 1:
        raise UsageError(f"max_batch must be at least 1, got {max_batch}")
    if prefill_chunk < 1:
        raise UsageError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
    offload = parse_memory_size(kv_offload_memory)
    dev = torch.device(device or ("cuda" if bundle.target.get("arch", "cpu") != "cpu" else "cpu"))
    cfg, block_size, dtype = bundle.config, bundle.manifest["block_size"], getattr(torch, bundle.dtype)
    per_block = block_bytes(cfg["num_layers"], block_size, cfg["num_kv_heads"], cfg["head_dim"], dtype)
    sizing = (dev, per_block, block_size, bundle.manifest["max_seq_len"], kv_cache_memory, kv_cache_fraction,
              kv_cache_tokens)
    # A budget that does not depend on free GPU memory is checked before the weights load: a bad one fails fast.
    depends_on_free_memory = dev.type == "cuda" and kv_cache_memory is None and kv_cache_tokens is None
    budget = None if depends_on_free_memory else kv_cache_budget(*sizing)
    graphs, writing, kernel_scope = load_graphs(bundle, backend, dev, dtype)
    if budget is None:
        budget = kv_cache_budget(*sizing)
    cache = PagedKVCache.from_budget(budget, cfg["num_layers"], block_size, cfg["num_kv_heads"], cfg["head_dim"],
                                     dtype, dev, host_budget_bytes=offload)
    tokenizer = None
    if bundle.tokenizer_dir is not None and (bundle.tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(bundle.tokenizer_dir / "tokenizer.json"))
    engine = Engine(bundle, dev, cache, graphs, max_batch, tokenizer, prefix_caching=prefix_caching,
                    graphs_writing_kv=writing, prefill_chunk=prefill_chunk, kernel_scope=kernel_scope)
    engine.warm_up()
    return engine


def kv_cache_budget(device: torch.device, per_block: int, block_size: int, max_seq_len: int,
                    memory: int | str | None = None, fraction: float | None = None, tokens: int | None = None) -> int:
    """Bytes for the device pool (see `load`); raises ValueError when they hold no max_seq_len sequence."""
    given = [name for name, value in (("kv_cache_memory", memory), ("kv_cache_fraction", fraction),
                                      ("kv_cache_tokens", tokens)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"give only one of {' and '.join(given)} (--kv-cache-*): each sets the KV cache size")
    longest = -(-max_seq_len // block_size) * per_block
    if memory is not None:
        budget = parse_memory_size(memory)
    elif tokens is not None:
        if tokens < 1:
            raise UsageError(f"kv_cache_tokens must be at least 1, got {tokens}")
        budget = -(-tokens // block_size) * per_block
    elif fraction is not None:
        if not 0 < fraction <= 1:
            raise UsageError(f"kv_cache_fraction must be in (0, 1], got {fraction}")
        if device.type != "cuda":
            raise UsageError(f"kv_cache_fraction needs a CUDA device, not {device}; give kv_cache_memory "
                             f"(--kv-cache-memory) instead")
        budget = int(torch.cuda.mem_get_info(device)[0] * fraction)
    else:
        budget = DEFAULT_SEQUENCES * longest
        if device.type == "cuda":
            budget = min(budget, int(torch.cuda.mem_get_info(device)[0] * DEFAULT_CUDA_FRACTION))
    if budget < longest:
        raise UsageError(
            f"a KV cache of {format_bytes(budget)} holds {budget // per_block * block_size} tokens, fewer than one "
            f"sequence of the bundle's max_seq_len {max_seq_len}; give it at least {format_bytes(longest)} "
            f"({longest} bytes, --kv-cache-memory) or recompile with a smaller --max-seq-len")
    return budget
