"""TensorRT build settings: what `llmc build-engine` (runtime/tensorrt.py) hands the TensorRT builder, as JSON data.

The engine is built from the bundle's ONNX on the inference host (TensorRT needs the target GPU to build), so the
compiler only decides the settings and the lead writes them into the bundle as tensorrt/settings.json. Pure data:
nothing here imports tensorrt.

Two optimization profiles, because one engine serves both steps the runtime runs: "decode" (one token per sequence,
tuned at a full batch) and "prefill" (up to max_seq_len tokens, tuned at one sequence of a prefill chunk). Each
profile gives min / opt / max per input of the ONNX contract; the KV cache's block count ranges up to what the
target's memory could hold, but is tuned at a modest count since TensorRT allocates opt-shaped inputs while
timing kernels.

Typing: the ONNX already carries the model's dtype, so the network is built strongly typed by default (TensorRT
10.12 deprecated and 11 removed the weak-typing precision flags). `precision_flags` are still decided here from
the target (what it can legally compute in) and are applied only to a weakly typed build (strongly_typed=False,
TensorRT 10).
"""
from __future__ import annotations

from llmc.common.errors import LlmcError
from llmc.common.targets import BF16_MIN_CAPABILITY, Target, describe

SETTINGS_VERSION = 1
HARDWARE_COMPATIBILITY_LEVELS = ("none", "ampere_plus")
AMPERE = (8, 0)
DEFAULT_BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's own default; 4-5 search longer for faster kernels
DEFAULT_WORKSPACE_BYTES = 4 << 30
# The prefill profile is tuned at one sequence of this many tokens (the runtime's default prefill chunk).
DEFAULT_PREFILL_OPT_TOKENS = 512
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
PRECISION_FLAGS = {"float32": [], "float16": ["fp16"], "bfloat16": ["bf16"], "float8_e4m3fn": ["fp8"]}


class TensorRTSettingsError(LlmcError, ValueError):
    pass


def build_settings(target: Target, dtype: str, max_batch: int, max_seq_len: int, block_size: int, num_layers: int,
                   num_kv_heads: int, head_dim: int, *, hardware_compatibility: str = "none",
                   builder_optimization_level: int = DEFAULT_BUILDER_OPTIMIZATION_LEVEL,
                   workspace_bytes: int | None = None, strongly_typed: bool = True,
                   prefill_opt_tokens: int = DEFAULT_PREFILL_OPT_TOKENS, max_cache_blocks: int | None = None) -> dict:
    """The JSON-able settings runtime/tensorrt.build_engine applies; raises TensorRTSettingsError (one line) for
    what the target cannot do. max_cache_blocks: the most KV cache blocks the engine accepts (default: as many as
    the target's memory holds; the runtime refuses a larger cache with a message)."""
    if not target.is_gpu:
        raise TensorRTSettingsError("--backend tensorrt needs a GPU target (TensorRT runs on NVIDIA GPUs only); "
                                    "choose one with --target, e.g. --target h100")
    for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("block_size", block_size),
                        ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("prefill_opt_tokens", prefill_opt_tokens)):
        if value < 1:
            raise TensorRTSettingsError(f"{name} must be at least 1, got {value}")
    if hardware_compatibility not in HARDWARE_COMPATIBILITY_LEVELS:
        raise TensorRTSettingsError(f"unknown hardware compatibility level {hardware_compatibility!r}; choose one "
                                    f"of {', '.join(HARDWARE_COMPATIBILITY_LEVELS)}")
    if hardware_compatibility == "ampere_plus" and target.capability < AMPERE:
        raise TensorRTSettingsError(f"{describe(target)} is older than Ampere; hardware compatibility ampere_plus "
                                    f"needs an sm_80 or newer target (use none)")
    if not 0 <= builder_optimization_level <= 5:
        raise TensorRTSettingsError(f"builder optimization level must be 0 to 5, got {builder_optimization_level}")
    workspace = workspace_bytes if workspace_bytes is not None else _default_workspace(target)
    if workspace < 1:
        raise TensorRTSettingsError(f"workspace must be positive, got {workspace} bytes")
    cache_bytes_per_block = num_layers * block_size * num_kv_heads * head_dim * ELEMENT_BYTES[dtype]
    # Keys and values together can never exceed the GPU's memory: that bounds the block count.
    max_blocks = max(1, target.memory_gb * (1 << 30) // (2 * cache_bytes_per_block))
    if max_cache_blocks is not None:
        if max_cache_blocks < 1:
            raise TensorRTSettingsError(f"max_cache_blocks must be at least 1, got {max_cache_blocks}")
        max_blocks = max_cache_blocks
    table_width = -(-max_seq_len // block_size)
    return {
        "version": SETTINGS_VERSION,
        "target": target.name,
        "compute_capability": list(target.capability),
        "dtype": dtype,
        "precision_flags": precision_flags(target, dtype),
        "strongly_typed": strongly_typed,
        "hardware_compatibility_level": hardware_compatibility,
        "builder_optimization_level": builder_optimization_level,
        "workspace_bytes": workspace,
        "profiles": [
            # Decode is tuned at a full batch reading half the longest context, prefill at one chunk from empty.
            _profile("decode", (1, max_batch, max_batch), (1, 1, 1), (1, max(1, table_width // 2), table_width),
                     max_blocks, (num_layers, block_size, num_kv_heads, head_dim)),
            _profile("prefill", (1, 1, max_batch), (1, min(prefill_opt_tokens, max_seq_len), max_seq_len),
                     (1, 1, table_width), max_blocks, (num_layers, block_size, num_kv_heads, head_dim)),
        ],
    }


def precision_flags(target: Target, dtype: str) -> list[str]:
    """Builder precision flags for a model in dtype: its own, plus fp8 wherever the target has fp8 GEMMs (so a
    graph with fp8 Q/DQ nodes from the quantize pass builds). Refuses a dtype the target lacks."""
    if dtype not in PRECISION_FLAGS:
        raise TensorRTSettingsError(f"TensorRT has no precision for dtype {dtype!r}; use one of "
                                    f"{', '.join(PRECISION_FLAGS)}")
    if not target.supports(dtype):
        why = " (Turing has no bf16 arithmetic)" if dtype == "bfloat16" and target.capability < BF16_MIN_CAPABILITY \
            else ""
        raise TensorRTSettingsError(f"{describe(target)} has no {dtype}{why}; use --dtype {target.default_dtype}")
    flags = list(PRECISION_FLAGS[dtype])
    if dtype == "float8_e4m3fn":
        flags.append("bf16")  # what fp8 layers fall back to and accumulate around; every fp8 target has bf16
    elif target.supports("float8_e4m3fn"):
        flags.append("fp8")
    return flags


def _default_workspace(target: Target) -> int:
    return min(DEFAULT_WORKSPACE_BYTES, target.memory_gb * (1 << 30) // 4)


def _profile(name: str, batch: tuple[int, int, int], tokens: tuple[int, int, int], widths: tuple[int, int, int],
             max_blocks: int, cache_dims: tuple[int, int, int, int]) -> dict:
    """min / opt / max shapes of every ONNX input; batch, tokens and block-table widths are (min, opt, max)."""
    layers, block_size, kv_heads, head_dim = cache_dims
    # Timing allocates opt-shaped inputs: enough blocks for the opt batch at the opt width, within an eighth of
    # the memory (the weights and the builder's workspace need the rest).
    opt_blocks = max(1, min(batch[1] * widths[1], max_blocks // 8))
    names = ("min", "opt", "max")
    tokens_shape = [[b, t] for b, t in zip(batch, tokens)]
    cache = [[layers, n, block_size, kv_heads, head_dim] for n in (1, opt_blocks, max_blocks)]
    inputs = {"input_ids": tokens_shape, "positions": tokens_shape, "k_cache": cache, "v_cache": cache,
              "block_table": [[b, w] for b, w in zip(batch, widths)], "past_lens": [[b] for b in batch],
              "last_index": [[b] for b in batch]}
    return {"name": name, "shapes": {k: dict(zip(names, v)) for k, v in inputs.items()}}
