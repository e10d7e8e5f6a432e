"""Block configurations per GPU arch, op family and shape class, and a short autotuner that refines them.

Shape classes: "decode" when the op sees at most DECODE_MAX_M token rows (one token per sequence in a batch of
at most 16: the GEMM is bound by reading the weight, so BLOCK_M is the tensor-core minimum and N is split finely
to fill the SMs), "prefill" otherwise (compute bound: large square tiles, deeper pipelines where shared memory
allows). "interpret" is the CPU interpreter (TRITON_INTERPRET=1): few, large-ish programs, since the
interpreter's cost is per program and per op, not per element.

Shared memory per SM bounds BLOCK_M*BLOCK_K + BLOCK_N*BLOCK_K elements times num_stages: sm_75 64 KiB,
sm_86 / sm_89 100 KiB, sm_80 164 KiB, sm_90 228 KiB. The swiglu GEMM loads two weight tiles per step and keeps
two accumulators, so its tiles are narrower in N.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

DECODE_MAX_M = 16
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "interpret")


@dataclass(frozen=True)
class Config:
    block_m: int = 1  # GEMM: rows (tokens) per program; rope: heads per program
    block_n: int = 1  # GEMM: output features per program; row norms: largest chunk of the hidden dim
    block_k: int = 1  # GEMM only: reduction step
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

# Shared memory per block a kernel may use, in bytes (the opt-in maximum per arch).
SHARED_MEMORY = {"sm_75": 64 * 1024, "sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024,
                 "sm_90": 227 * 1024}

_FAMILY = {"rms_norm": "row_norm", "add_rms_norm": "row_norm", "norm_linear": "gemm", "add_norm_linear": "gemm",
           "rope": "rope"}


def shape_class(m: int) -> str:
    return "decode" if m <= DECODE_MAX_M else "prefill"


def family(op: str, epilogue: str = "none") -> str:
    if op not in _FAMILY:
        raise ValueError(f"no Triton kernel for op {op!r}; known: {', '.join(_FAMILY)}")
    name = _FAMILY[op]
    return "gemm_swiglu" if name == "gemm" and epilogue == "swiglu" else name


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
