"""Launchers of the attention ops (llmc::causal_attention, llmc::paged_attention) and their example inputs.

Three kernels: attention_prefill (block attention, FlashAttention-2; both ops, with the paged cache when the
step has past keys), attention_decode (split-K over the cached keys, S == 1) and attention_combine (merges the
splits). The block configuration comes from configs.pick_attention by arch, head_dim and sequence-length bucket
and is rendered into the kernel source, so a planned launch records it in the KernelSpec. The number of decode
splits depends on the batch, the context the block table can hold and the SM count: it is the grid's third dim
and a runtime argument of the combine, never part of a spec, so one cubin serves every split count.
"""
from __future__ import annotations

import torch
import triton

from llmc.codegen.triton import configs
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.hooks import active_recorder, current_arch, dtype_name, empty_output, load

COMBINE_SPLITS_PER_STEP = 16


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> int:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"{op}: q {tuple(q.shape)} must be [B, S, H, D] and k, v {tuple(k.shape)}, "
                         f"{tuple(v.shape)} [B, S, Hkv, D] with the same B and S")
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    if kv_heads == 0 or heads % kv_heads or k.shape[3] != head_dim:
        raise ValueError(f"{op}: {heads} query heads of dim {head_dim} cannot share {kv_heads} kv heads of dim "
                         f"{k.shape[3]}; H must be a multiple of Hkv and the head dims equal")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{op}: q, k, v are {q.dtype}, {k.dtype}, {v.dtype}; give them one dtype")
    if window < 0:
        raise ValueError(f"{op}: window {window} must be >= 0 (0: no sliding window)")
    dtype_name(q, f"{op} q")
    return heads // kv_heads


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor, dims=(0, 1, 2)) -> list[int]:
    return [x.stride(d) for d in dims]


def _prefill_spec(q, k, config: Config, paged: bool, window: int, cache_block_size: int) -> dict:
    return dict(dtype=dtype_name(q, "q"), heads=q.shape[2], kv_heads=k.shape[2], head_dim=q.shape[3], paged=paged,
                windowed=window > 0, cache_block_size=cache_block_size, block_m=config.block_m,
                block_n=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages)


def launch_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int, *,
                            config: Config | None = None, poison: bool = False) -> torch.Tensor:
    _check_qkv("causal_attention", q, k, v, window)
    batch, seq, heads, head_dim = q.shape
    out = empty_output(q.shape, q.dtype, q.device, poison)
    if batch * seq * heads * head_dim == 0:
        return out
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    config = config or configs.pick_attention("prefill", current_arch(q.device), head_dim, seq, q.element_size())
    kernel = load("attention_prefill", **_prefill_spec(q, k, config, False, window, 0))
    grid = (triton.cdiv(seq, config.block_m), batch * heads)
    kernel[grid](q, k, v, out, seq, *_strides(q), *_strides(k), *_strides(v), float(scale), int(window),
                 num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def _check_cache(k, k_cache, v_cache, block_table, past_lens) -> None:
    batch, _, kv_heads, head_dim = k.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[2:] != (kv_heads, head_dim) or cache.dtype != k.dtype:
            raise ValueError(f"paged_attention: {name} {tuple(cache.shape)} {cache.dtype} must be [NB, BS, "
                             f"{kv_heads}, {head_dim}] in {k.dtype} (one layer's slice of the cache)")
        if cache.stride(-1) != 1:
            raise ValueError(f"paged_attention: {name} must have unit stride along head_dim (a slice of the "
                             "contiguous [L, NB, BS, Hkv, D] cache)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int64:
        raise ValueError(f"paged_attention: block_table {tuple(block_table.shape)} {block_table.dtype} must be "
                         f"[{batch}, max_blocks] int64")
    if past_lens.shape != (batch,) or past_lens.dtype != torch.int64:
        raise ValueError(f"paged_attention: past_lens {tuple(past_lens.shape)} {past_lens.dtype} must be "
                         f"[{batch}] int64")


def _sm_count(device: torch.device, arch: str) -> int:
    if device.type == "cuda" and active_recorder() is None:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return configs.SM_COUNT[arch]


def launch_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_table: torch.Tensor, past_lens: torch.Tensor, scale: float,
                           window: int, *, config: Config | None = None, num_splits: int | None = None,
                           poison: bool = False) -> torch.Tensor:
    """S == 1: split-K decode (num_splits overrides the launcher's choice); S > 1: block attention over the cache
    then the new keys. `config` overrides the table's choice for whichever kernel runs."""
    _check_qkv("paged_attention", q, k, v, window)
    _check_cache(k, k_cache, v_cache, block_table, past_lens)
    batch, seq, heads, head_dim = q.shape
    out = empty_output(q.shape, q.dtype, q.device, poison)
    if batch * seq * heads * head_dim == 0:
        return out
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    block_table, past_lens = _unit_last_stride(block_table), past_lens.contiguous()
    block_size = k_cache.shape[1]
    arch = current_arch(q.device)
    cache_strides = [*_strides(k_cache), *_strides(v_cache), block_table.stride(0)]
    if seq > 1:
        config = config or configs.pick_attention("prefill", arch, head_dim, seq, q.element_size())
        kernel = load("attention_prefill", **_prefill_spec(q, k, config, True, window, block_size))
        grid = (triton.cdiv(seq, config.block_m), batch * heads)
        kernel[grid](q, k, v, k_cache, v_cache, block_table, past_lens, out, seq, *_strides(q), *_strides(k),
                     *_strides(v), *cache_strides, float(scale), int(window),
                     num_warps=config.num_warps, num_stages=config.num_stages)
        return out
    kv_heads = k.shape[2]
    group = heads // kv_heads
    max_context = block_table.shape[1] * block_size
    config = config or configs.pick_attention("decode", arch, head_dim, max_context, q.element_size())
    splits = num_splits or configs.decode_splits(batch, kv_heads, max_context, _sm_count(q.device, arch), config)
    block_d = max(16, triton.next_power_of_2(head_dim))  # as the templates pad it: tl.dot needs dims >= 16
    maxima = empty_output((batch, heads, splits), torch.float32, q.device, poison)
    sums = empty_output((batch, heads, splits), torch.float32, q.device, poison)
    accs = empty_output((batch, heads, splits, block_d), torch.float32, q.device, poison)
    decode = load("attention_decode", dtype=dtype_name(q, "q"), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  windowed=window > 0, cache_block_size=block_size,
                  block_h=max(16, triton.next_power_of_2(group)) if group > 1 else 1, block_n=config.block_n,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    decode[(batch, kv_heads, splits)](q, k, v, k_cache, v_cache, block_table, past_lens, maxima, sums, accs,
                                      q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
                                      *cache_strides, float(scale), int(window),
                                      num_warps=config.num_warps, num_stages=config.num_stages)
    combine = load("attention_combine", dtype=dtype_name(q, "q"), head_dim=head_dim,
                   block_s=COMBINE_SPLITS_PER_STEP, num_warps=1)
    combine[(batch * heads,)](maxima, sums, accs, out, splits, num_warps=1)
    return out


def example_inputs(op: str, shapes: dict, dtype: torch.dtype, device: str) -> tuple:
    """Random inputs of an attention op in its argument order. shapes: b (batch), s (new tokens), h, kv (heads),
    d (head_dim), past (cached tokens per sequence, paged only), bs (cache block size, default 16), window
    (default 0). The cache holds exactly the blocks the batch needs, in shuffled order."""
    batch, seq, heads, kv_heads, head_dim = (shapes[key] for key in ("b", "s", "h", "kv", "d"))
    window = shapes.get("window", 0)
    scale = head_dim ** -0.5

    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    q, k, v = rand(batch, seq, heads, head_dim), rand(batch, seq, kv_heads, head_dim), rand(batch, seq, kv_heads,
                                                                                              head_dim)
    if op == "causal_attention":
        return q, k, v, scale, window
    if op != "paged_attention":
        raise ValueError(f"no attention kernel for op {op!r}; known: causal_attention, paged_attention")
    past, block_size = shapes["past"], shapes.get("bs", 16)
    max_blocks = -(-(past + seq) // block_size)
    k_cache, v_cache = rand(batch * max_blocks, block_size, kv_heads, head_dim), rand(batch * max_blocks, block_size,
                                                                                      kv_heads, head_dim)
    block_table = torch.randperm(batch * max_blocks, device=device).view(batch, max_blocks)
    past_lens = torch.full((batch,), past, dtype=torch.int64, device=device)
    return q, k, v, k_cache, v_cache, block_table, past_lens, scale, window
