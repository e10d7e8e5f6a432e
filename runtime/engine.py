"""Engine: a loaded bundle that generates. Owns the graphs, the paged KV cache and the scheduling loop.

Each step runs one graph over a batch: newly admitted sequences are prefilled (right-padded to the longest
prompt; padding never reaches a real token because attention is causal), running ones decode one token. The
graph returns the step's keys and values; the engine writes them into each sequence's blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmc.codegen import ops  # noqa: F401  (registers llmc:: ops the graphs call)
from llmc.codegen.graph_io import graph_from_json
from llmc.runtime.bundle import Bundle, BundleError, open_bundle
from llmc.runtime.kv_cache import PagedKVCache
from llmc.runtime.sampling import make_generators, sample
from llmc.runtime.scheduler import Scheduler, Sequence


class PromptTooLongError(ValueError):
    pass


@dataclass
class Timing:
    """Wall-clock figures of the last generate() call."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
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

    @property
    def max_seq_len(self) -> int:
        return self.bundle.manifest["max_seq_len"]

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.bundle.manifest.get("eos_token_ids") or [])

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[list[int]]:
        """The new tokens of each prompt (ending at an end-of-sequence token if one is produced)."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens that exceeds the bundle's "
                    f"maximum sequence length {self.max_seq_len} (recompile with a larger --max-seq-len)")
            bad = [t for t in p if not 0 <= t < self.bundle.config["vocab_size"]]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary")
        seqs = [Sequence(i, list(p), max_new_tokens) for i, p in enumerate(prompts)]
        scheduler = Scheduler(self.cache.pool, max_batch=self.max_batch)
        for s in seqs:
            scheduler.add(s)
        generators = make_generators(seed, [s.seq_id for s in seqs]) if temperature > 0 else None
        self.timing = Timing()
        start = time.perf_counter()
        while scheduler.has_work:
            to_prefill, to_decode = scheduler.schedule()
            for group, kind in ((to_prefill, "prefill"), (to_decode, "decode")):
                if not group:
                    continue
                t = time.perf_counter()
                logits = self._step(group, kind)
                picks = generators and [generators[s.seq_id] for s in group]
                tokens = sample(logits.float(), temperature, top_p, picks).tolist()
                for s, tok in zip(group, tokens):
                    s.output.append(tok)
                    if len(s.output) >= s.max_new_tokens or tok in self.eos_token_ids:
                        s.finished = True
                        scheduler.finish(s)
                elapsed = time.perf_counter() - t
                if kind == "prefill":
                    self.timing.prefill_s += elapsed
                    self.timing.prefill_tokens += sum(len(s.prompt) for s in group)
                    if self.timing.first_token_s is None:
                        self.timing.first_token_s = time.perf_counter() - start
                else:
                    self.timing.decode_s += elapsed
                    self.timing.decode_tokens += len(group)
                self.timing.steps += 1
        return [s.output for s in seqs]

    @torch.no_grad()
    def _step(self, group: list[Sequence], kind: str) -> torch.Tensor:
        dev = self.device
        if kind == "prefill":
            tokens = [s.prompt[s.cached:] for s in group]
        else:
            tokens = [[s.output[-1] if s.output else s.prompt[-1]] for s in group]
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens], dtype=torch.long, device=dev)
        past = torch.tensor([s.cached for s in group], dtype=torch.long, device=dev)
        positions = past[:, None] + torch.arange(width, device=dev)
        # A prefill with nothing cached reads no past: one (fully masked) block keeps the gather tiny.
        tables = [s.blocks if s.cached else s.blocks[:1] for s in group]
        table = self.cache.block_table_tensor(tables).to(dev)
        last = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=dev)
        logits, new_k, new_v = self.graphs[kind](ids, positions, self.cache.k, self.cache.v, table, past, last)
        self.cache.write([s.blocks for s in group], [s.cached for s in group], lengths, new_k, new_v)
        for s, n in zip(group, lengths):
            s.cached += n
        return logits

    @torch.no_grad()
    def warm_up(self) -> None:
        """Runs each graph once on one token, writing nothing to the cache, so first-call costs (lazy imports,
        kernel and allocator set-up) land in load time, not in the first request's time to first token."""
        dev = self.device
        one = torch.zeros(1, 1, dtype=torch.long, device=dev)
        table = torch.zeros(1, 1, dtype=torch.long, device=dev)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        for graph in self.graphs.values():
            graph(one, one, self.cache.k, self.cache.v, table, zero, zero)

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("this bundle has no tokenizer; pass token ids instead of text")
        return self.tokenizer.decode(tokens)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this bundle has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text).ids


def _use_shipped_kernels(kernels_dir: Path) -> None:
    """On CUDA the llmc ops run their Triton launchers, which launch the bundle's cubins (no Triton compilation)
    where it ships them for this GPU; what it lacks, they JIT-compile."""
    from llmc.codegen.triton import launch
    from llmc.runtime.kernels import KernelLibrary

    launch.register_cuda_impls()
    library = KernelLibrary(kernels_dir) if (kernels_dir / "index.json").is_file() else None
    if library is not None:
        library.load_all()
    launch.use_library(library)


def load(path: str | Path, device: str | None = None, kv_cache_tokens: int | None = None, max_batch: int = 32) -> Engine:
    """Opens and verifies a bundle, loads its weights and graphs, and allocates the KV cache."""
    bundle = open_bundle(path)
    if not bundle.has_weights:
        raise BundleError(f"{path} was compiled without weights; bind a checkpoint first (llmc compile ... --weights DIR)")
    dev = torch.device(device or ("cuda" if bundle.target.get("arch", "cpu") != "cpu" else "cpu"))
    if dev.type == "cuda":
        _use_shipped_kernels(bundle.path / "kernels")
    weights = bundle.load_weights(dev)
    graphs = {name: graph_from_json(g, weights, dev) for name, g in bundle.graph["graphs"].items()}
    cfg, block_size = bundle.config, bundle.manifest["block_size"]
    tokens = kv_cache_tokens or bundle.manifest["max_seq_len"] * 4
    num_blocks = -(-tokens // block_size)
    cache = PagedKVCache(cfg["num_layers"], num_blocks, block_size, cfg["num_kv_heads"], cfg["head_dim"],
                         getattr(torch, bundle.dtype), dev)
    tokenizer = None
    if bundle.tokenizer_dir is not None and (bundle.tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(bundle.tokenizer_dir / "tokenizer.json"))
    engine = Engine(bundle, dev, cache, graphs, max_batch, tokenizer)
    engine.warm_up()
    return engine
