"""Block configurations per GPU arch, op family and shape class, and a short autotuner that refines them.

Shape classes: "decode" when the op sees at most DECODE_MAX_M token rows (one token per sequence in a batch of
at most 16: the GEMM is bound by reading the weight, so BLOCK_M is the tensor-core minimum and N is split finely
to fill the SMs), "prefill" otherwise (compute bound: large square tiles, deeper pipelines where shared memory
allows). "interpret" is the CPU interpreter (TRITON_INTERPRET=1): few, large-ish programs, since the
interpreter's cost is per program and per op, not per element.

Shared memory per SM bounds BLOCK_M*BLOCK_K + BLOCK_N*BLOCK_K elements times num_stages: sm_75 64 KiB,
sm_86 / sm_89 100 KiB, sm_80 164 KiB, sm_90 228 KiB. The swiglu GEMM loads two weight tiles per step and keeps
two accumulators, so its tiles are narrower in N.

Attention has its own table (pick_attention, below): by head_dim and a sequence-length bucket rather than by
shape class, and a split-K heuristic for decode (decode_splits).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

DECODE_MAX_M = 16
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "interpret")


@dataclass(frozen=True)
class Config:
    block_m: int = 1  # GEMM: rows (tokens) per program; rope: heads per program; attention: queries per program
    block_n: int = 1  # GEMM: output features per program; row norms: largest chunk of the hidden dim; attention:
    #                   keys per step
    block_k: int = 1  # GEMM: reduction step; decode attention: fewest keys one split-K program reduces
    num_warps: int = 4
    num_stages: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


# op family -> arch -> shape class -> Config
_TABLE: dict[str, dict[str, dict[str, Config]]] = {
    "gemm": {
        "sm_75": {"decode": Config(16, 64, 64, 4, 2), "prefill": Config(64, 128, 32, 4, 2)},
        "sm_80": {"decode": Config(16, 64, 128, 4, 4), "prefill": Config(128, 128, 64, 8, 3)},
        "sm_86": {"decode": Config(16, 64, 128, 4, 3), "prefill": Config(128, 128, 32, 8, 3)},
        "sm_89": {"decode": Config(16, 64, 128, 4, 3), "prefill": Config(128, 128, 32, 8, 3)},
        "sm_90": {"decode": Config(16, 32, 256, 4, 4), "prefill": Config(128, 128, 64, 8, 4)},
        "interpret": {"decode": Config(16, 32, 32, 1, 1), "prefill": Config(32, 32, 32, 1, 1)},
    },
    "gemm_swiglu": {
        "sm_75": {"decode": Config(16, 32, 64, 4, 2), "prefill": Config(64, 64, 32, 4, 2)},
        "sm_80": {"decode": Config(16, 32, 128, 4, 4), "prefill": Config(128, 64, 64, 8, 3)},
        "sm_86": {"decode": Config(16, 32, 128, 4, 3), "prefill": Config(64, 64, 64, 4, 3)},
        "sm_89": {"decode": Config(16, 32, 128, 4, 3), "prefill": Config(64, 64, 64, 4, 3)},
        "sm_90": {"decode": Config(16, 32, 256, 4, 4), "prefill": Config(128, 64, 64, 8, 4)},
        "interpret": {"decode": Config(16, 32, 32, 1, 1), "prefill": Config(32, 32, 32, 1, 1)},
    },
    # One program per row; block_n caps the chunk the row is streamed in, num_warps caps the warps per row.
    "row_norm": {
        **{arch: {"decode": Config(block_n=8192, num_warps=8), "prefill": Config(block_n=8192, num_warps=16)}
           for arch in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")},
        "interpret": {"decode": Config(block_n=1024, num_warps=1), "prefill": Config(block_n=1024, num_warps=1)},
    },
    # One program per (token, block of block_m heads).
    "rope": {
        **{arch: {"decode": Config(block_m=4, num_warps=4), "prefill": Config(block_m=4, num_warps=4)}
           for arch in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")},
        "interpret": {"decode": Config(block_m=8, num_warps=1), "prefill": Config(block_m=8, num_warps=1)},
    },
}

# quant_linear (codegen/triton/quant.py). The weight-only GEMM (a16) starts from the 16-bit GEMM's tiles (its x
# tiles are 16-bit, its weight tiles smaller); the a8 GEMM's operands are bytes, so its K steps are twice as
# long for the same shared memory, and its K step is at least 32 (the 8-bit dot's K). Not yet tuned on a GPU.
# quant_rows: one program per token row, block_k its chunk of the row.
_TABLE["quant_a16"] = _TABLE["gemm"]
_TABLE["quant_a16_swiglu"] = _TABLE["gemm_swiglu"]
_TABLE["quant_a8"] = {
    "sm_75": {"decode": Config(16, 64, 64, 4, 2), "prefill": Config(64, 128, 64, 4, 2)},
    "sm_80": {"decode": Config(16, 64, 128, 4, 4), "prefill": Config(128, 128, 128, 8, 3)},
    "sm_86": {"decode": Config(16, 64, 128, 4, 3), "prefill": Config(128, 128, 64, 8, 3)},
    "sm_89": {"decode": Config(16, 64, 128, 4, 3), "prefill": Config(128, 128, 64, 8, 3)},
    "sm_90": {"decode": Config(16, 32, 256, 4, 4), "prefill": Config(128, 128, 128, 8, 4)},
    "interpret": {"decode": Config(16, 32, 32, 1, 1), "prefill": Config(32, 32, 32, 1, 1)},
}
_TABLE["quant_a8_swiglu"] = {
    "sm_75": {"decode": Config(16, 32, 64, 4, 2), "prefill": Config(64, 64, 64, 4, 2)},
    "sm_80": {"decode": Config(16, 32, 128, 4, 4), "prefill": Config(128, 64, 128, 8, 3)},
    "sm_86": {"decode": Config(16, 32, 128, 4, 3), "prefill": Config(64, 64, 128, 4, 3)},
    "sm_89": {"decode": Config(16, 32, 128, 4, 3), "prefill": Config(64, 64, 128, 4, 3)},
    "sm_90": {"decode": Config(16, 32, 256, 4, 4), "prefill": Config(128, 64, 128, 8, 4)},
    "interpret": {"decode": Config(16, 32, 32, 1, 1), "prefill": Config(32, 32, 32, 1, 1)},
}
_TABLE["quant_rows"] = {
    **{arch: {"decode": Config(block_k=4096, num_warps=4), "prefill": Config(block_k=4096, num_warps=8)}
       for arch in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")},
    "interpret": {"decode": Config(block_k=1024, num_warps=1), "prefill": Config(block_k=1024, num_warps=1)},
}

# Shared memory per block a kernel may use, in bytes (the opt-in maximum per arch).
SHARED_MEMORY = {"sm_75": 64 * 1024, "sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024,
                 "sm_90": 227 * 1024}

ATTENTION_OPS = ("causal_attention", "paged_attention", "sparse_paged_attention")
_FAMILY = {"rms_norm": "row_norm", "add_rms_norm": "row_norm", "norm_linear": "gemm", "add_norm_linear": "gemm",
           "rope": "rope", "rope_write_kv": "rope"}
# quant_linear's kernels (codegen/triton/quant.py), by kernel name: its launcher picks one config per kernel.
_FAMILY |= {"quant_linear_a16": "quant_a16", "quant_linear_a8": "quant_a8", "quant_linear_rows": "quant_rows"}


def shape_class(m: int) -> str:
    return "decode" if m <= DECODE_MAX_M else "prefill"


def family(op: str, epilogue: str = "none") -> str:
    if op in ATTENTION_OPS:
        raise ValueError(f"{op}'s block configurations come from pick_attention (its own table, not autotuned)")
    if op not in _FAMILY:
        raise ValueError(f"no Triton kernel for op {op!r}; known: {', '.join(_FAMILY)}")
    name = _FAMILY[op]
    return f"{name}_swiglu" if epilogue == "swiglu" and f"{name}_swiglu" in _TABLE else name


def tuning_key(op: str, arch: str, m: int, n: int, k: int = 0, epilogue: str = "none") -> str:
    """The key a tuned choice is recorded under: one per shape class, not per exact token count."""
    return f"{family(op, epilogue)}/{arch}/{shape_class(m)}/n{n}/k{k}"


def pick(op: str, arch: str, m: int, n: int, k: int = 0, epilogue: str = "none",
         tuned: dict | None = None) -> Config:
    """The block configuration for `op` on `arch` with m rows (tokens), n output features (the hidden size for
    row norms, heads for rope) and reduction size k; a choice recorded by `autotune` in `tuned` wins."""
    if arch not in ARCHS:
        raise ValueError(f"no kernel configurations for arch {arch!r}; known: {', '.join(ARCHS)}")
    if tuned is not None:
        recorded = tuned.get(tuning_key(op, arch, m, n, k, epilogue))
        if recorded is not None:
            return Config(**recorded["config"])
    return _TABLE[family(op, epilogue)][arch][shape_class(m)]


def fit_shared_memory(config: Config, arch: str, element_bytes: int, weight_tiles: int = 1) -> Config:
    """The GEMM config with fewer pipeline stages, then a shorter K step, until its tiles fit the arch's shared
    memory: the tables are written for 2-byte inputs, and float32 tiles are twice as large."""
    limit = SHARED_MEMORY.get(arch)
    if limit is None:  # the interpreter has no shared memory
        return config

    def need(c: Config) -> int:
        return (c.block_m + weight_tiles * c.block_n) * c.block_k * element_bytes * c.num_stages

    while need(config) > limit and (config.num_stages > 2 or config.block_k > 16):
        if config.num_stages > 2:
            config = Config(config.block_m, config.block_n, config.block_k, config.num_warps, config.num_stages - 1)
        else:
            config = Config(config.block_m, config.block_n, config.block_k // 2, config.num_warps, config.num_stages)
    return config


def candidates(op: str, arch: str, m: int, epilogue: str = "none") -> list[Config]:
    """A small search space around the table's choice: the table entry first, then tile and warp variants."""
    base = pick(op, arch, m, 0, 0, epilogue)
    fam = family(op, epilogue)
    if fam.startswith("gemm"):
        variants = [base]
        for block_n in (32, 64, 128):
            for block_k in (64, 128) if m <= DECODE_MAX_M else (32, 64):
                for num_stages in (3, 4):
                    variants.append(Config(base.block_m, block_n, block_k, base.num_warps, num_stages))
        return list(dict.fromkeys(variants))
    if fam == "rope":
        return list(dict.fromkeys([base] + [Config(block_m=h, num_warps=w) for h in (1, 2, 4, 8) for w in (2, 4)]))
    return list(dict.fromkeys([base] + [Config(block_n=base.block_n, num_warps=w) for w in (4, 8, 16)]))


def autotune(op: str, arch: str, shapes: dict, candidate_configs: list[Config] | None = None, *,
             dtype=None, record: dict | None = None, **options) -> Config:
    """Times each candidate with triton.testing.do_bench on the current GPU and returns the fastest.

    shapes: {"m": tokens, "n": ..., "k": ...} as `launch.example_inputs` takes them; options: the op's string
    options (norm, epilogue, bias, with_norm_weight). The choice is written to `record` (a plain dict the
    bundle stores as JSON) under `tuning_key`, and `pick(..., tuned=record)` returns it from then on.
    """
    import torch
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    from llmc.codegen.triton import launch

    if not torch.cuda.is_available():
        raise RuntimeError("autotune needs a CUDA GPU; on this host use pick() and the built-in tables")
    inputs = launch.example_inputs(op, shapes, dtype or torch.bfloat16, "cuda", **options)
    launcher = launch.LAUNCHERS[op]
    timings = {}
    for config in candidate_configs or candidates(op, arch, shapes["m"], options.get("epilogue", "none")):
        try:
            timings[config] = do_bench(lambda: launcher(*inputs, config=config), warmup=5, rep=20)
        except OutOfResources:  # too much shared memory or registers on this GPU: not a candidate here
            continue
    if not timings:
        raise RuntimeError(f"no candidate configuration of {op} fits this GPU; pass smaller blocks")
    best = min(timings, key=timings.get)
    if record is not None:
        key = tuning_key(op, arch, shapes["m"], shapes["n"], shapes.get("k", 0), options.get("epilogue", "none"))
        record[key] = {"config": best.to_dict(), "ms": timings[best]}
    return best


# ---- Attention -------------------------------------------------------------------------------------------------
#
# Keyed by arch, head_dim bucket (head_dim padded to a power of two: 64, 128, 256) and a sequence-length bucket.
# Prefill (attention_prefill, also chunked prefill and causal_attention): block_m queries per program against
# tiles of block_n keys; the bucket is the step's query count S: "tiny" up to 16 (small chunks), "short" up to 512,
# "long" beyond; larger tiles for long prompts, where there are enough query blocks to fill the GPU.
# Decode (attention_decode, S == 1): block_n keys per step; the bucket is the context the block table can hold
# (MB * BS). block_k is the dynamic block of the seed's "64 to 512 tokens": the fewest keys one split-K program
# reduces. The launcher splits a sequence's keys into as many chunks as fill the GPU (decode_splits) but no
# chunk below block_k: 64 keys for short contexts, where filling the SMs matters most, up to 512 for long ones,
# where a 32K-token sequence still gets enough splits and fewer partials to merge.
# Shared memory holds the Q tile and num_stages buffers of the K and V tiles: (block_m + 2 * num_stages *
# block_n) * head_dim elements; the entries are sized for 2-byte elements, fit_attention shrinks them for float32.

HEAD_DIM_BUCKETS = (64, 128, 256)
PREFILL_BUCKETS = (("tiny", 16), ("short", 512), ("long", None))
DECODE_BUCKETS = (("short", 2048), ("medium", 16384), ("long", None))
DECODE_CHUNK = {"short": 64, "medium": 256, "long": 512}
# SMs of each arch's reference part, for splitting decode while planning or interpreting (no device to ask).
SM_COUNT = {"sm_75": 40, "sm_80": 108, "sm_86": 84, "sm_89": 128, "sm_90": 132, "interpret": 4}


def _prefill(tiny: tuple, short: tuple, long: tuple) -> dict[str, Config]:
    return {name: Config(block_m=m, block_n=n, num_warps=w, num_stages=s)
            for name, (m, n, w, s) in (("tiny", tiny), ("short", short), ("long", long))}


def _decode(block_n: int, num_warps: int, num_stages: int) -> dict[str, Config]:
    return {name: Config(block_n=block_n, block_k=chunk, num_warps=num_warps, num_stages=num_stages)
            for name, chunk in DECODE_CHUNK.items()}


# kind -> arch -> padded head_dim -> bucket -> Config
_ATTENTION: dict[str, dict[str, dict[int, dict[str, Config]]]] = {
    "prefill": {
        "sm_75": {64: _prefill((16, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
                  128: _prefill((16, 32, 4, 2), (64, 32, 4, 2), (64, 32, 4, 2)),
                  256: _prefill((16, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1))},
        "sm_80": {64: _prefill((16, 64, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3)),
                  128: _prefill((16, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)),
                  256: _prefill((16, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2))},
        "sm_86": {64: _prefill((16, 64, 4, 2), (64, 64, 4, 2), (128, 64, 4, 2)),
                  128: _prefill((16, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
                  256: _prefill((16, 32, 4, 2), (32, 32, 4, 2), (64, 32, 4, 1))},
        "sm_90": {64: _prefill((16, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)),
                  128: _prefill((16, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)),
                  256: _prefill((16, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2))},
        "interpret": {d: _prefill((16, 16, 1, 1), (16, 16, 1, 1), (32, 16, 1, 1)) for d in HEAD_DIM_BUCKETS},
    },
    "decode": {
        "sm_75": {64: _decode(64, 4, 1), 128: _decode(32, 4, 1), 256: _decode(16, 4, 1)},
        "sm_80": {64: _decode(64, 4, 3), 128: _decode(64, 4, 2), 256: _decode(32, 4, 2)},
        "sm_86": {64: _decode(64, 4, 2), 128: _decode(64, 4, 2), 256: _decode(32, 4, 1)},
        "sm_90": {64: _decode(64, 4, 3), 128: _decode(64, 4, 3), 256: _decode(32, 4, 2)},
        "interpret": {d: {name: Config(block_n=16, block_k=16, num_warps=1, num_stages=1) for name in DECODE_CHUNK}
                      for d in HEAD_DIM_BUCKETS},
    },
}
for _kind in _ATTENTION.values():
    _kind["sm_89"] = _kind["sm_86"]  # the same SM generation's shared memory (99 KiB) and register file


def _bucket(buckets: tuple, tokens: int) -> str:
    return next(name for name, limit in buckets if limit is None or tokens <= limit)


def attention_bucket(kind: str, tokens: int) -> str:
    """The sequence-length bucket: prefill by query count, decode by the context the block table holds."""
    return _bucket(PREFILL_BUCKETS if kind == "prefill" else DECODE_BUCKETS, tokens)


def pick_attention(kind: str, arch: str, head_dim: int, tokens: int, element_bytes: int = 2) -> Config:
    """The block configuration of attention `kind` ("prefill" | "decode") on `arch` for head_dim and `tokens`
    (prefill: the step's query count; decode: the most keys the block table can address), fitted to shared
    memory for `element_bytes`-byte elements."""
    if arch not in ARCHS:
        raise ValueError(f"no kernel configurations for arch {arch!r}; known: {', '.join(ARCHS)}")
    padded = next((d for d in HEAD_DIM_BUCKETS if head_dim <= d), None)
    if padded is None:
        raise ValueError(f"attention kernels take head_dim up to {HEAD_DIM_BUCKETS[-1]}, got {head_dim}")
    config = _ATTENTION[kind][arch][padded][attention_bucket(kind, tokens)]
    return fit_attention(config, arch, padded, element_bytes, kind)


def attention_shared_bytes(config: Config, head_dim: int, element_bytes: int, kind: str) -> int:
    query_rows = config.block_m if kind == "prefill" else 16
    return (query_rows + 2 * config.num_stages * config.block_n) * head_dim * element_bytes


def fit_attention(config: Config, arch: str, head_dim: int, element_bytes: int, kind: str) -> Config:
    """`config` with fewer stages, then narrower key tiles, until its tiles fit `arch`'s shared memory."""
    limit = SHARED_MEMORY.get(arch)
    if limit is None:
        return config
    while attention_shared_bytes(config, head_dim, element_bytes, kind) > limit:
        if config.num_stages > 1:
            config = replace(config, num_stages=config.num_stages - 1)
        elif config.block_n > 16:
            config = replace(config, block_n=config.block_n // 2)
        else:
            raise ValueError(f"no {kind} attention tile of head_dim {head_dim} fits {arch}'s shared memory")
    return config


def decode_splits(batch: int, kv_heads: int, max_context: int, sm_count: int, config: Config) -> int:
    """How many split-K programs share one sequence's keys: enough for two programs per SM over the batch and kv
    heads (one 32K-token sequence fills the GPU), no split smaller than config.block_k keys, at least one."""
    wanted = -(-2 * sm_count // max(1, batch * kv_heads))
    return max(1, min(wanted, -(-max_context // config.block_k)))



def attention_plan_sizes() -> dict[str, int]:
    """A size for the symbolic dims per prefill bucket, above 1 so that a paged step takes the prefill kernel:
    planning an attention call at each of them covers every block configuration a prompt can launch. (Decode's
    buckets differ only in block_k, which the kernel does not see.)"""
    sizes, below = {}, 1
    for name, limit in PREFILL_BUCKETS:
        sizes[f"prefill-{name}"] = below + 1
        below = limit
    return sizes

