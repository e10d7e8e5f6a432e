"""The llmc:: custom ops: each declared once with torch.library, with a reference implementation in plain torch
(the definition of correct, and what runs on CPU) and a fake implementation for tracing and export.

Importing this module registers the ops; afterwards they are callable as `torch.ops.llmc.<name>.default`, stay
single nodes through torch.export and run_decompositions, and every lowering (Triton, ONNX, TensorRT) is tested
against the reference here.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("llmc::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, exactly as models/transformer.py's RMSNorm and transformers' Qwen3RMSNorm /
    LlamaRMSNorm compute it: statistics and scaling in float32, cast back to x's dtype, then `weight * h`.

    The result dtype is torch's promotion of weight's and x's dtypes (bf16 weight and bf16 x give bf16; an
    fp32 weight with a bf16 x gives fp32), as in the models.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@rms_norm.register_fake
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = torch.broadcast_shapes(weight.shape, x.shape)
    return x.new_empty(shape, dtype=torch.promote_types(weight.dtype, x.dtype))


# ---- Fused ops of the fusion passes (issue: fusion passes and Triton kernels) ----------------------------------
#
# The linear ops take weights with the norm's gain already folded in by the pass (W'[n, k] = W[n, k] * g[k]),
# so "rms" and "layer" below normalise without an affine step. Every reference computes the statistics in
# float32 and casts back to x's dtype before the matrix product, as the unfused models do.

NORMS = ("none", "rms", "layer")
EPILOGUES = ("none", "swiglu")


def _normalize(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "none":
        return x
    h = x.float()
    if norm == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + eps)
    else:
        raise ValueError(f"unknown norm {norm!r}; one of {NORMS}")
    return h.to(x.dtype)


def _epilogue(y: torch.Tensor, epilogue: str) -> torch.Tensor:
    if epilogue == "none":
        return y
    if epilogue == "swiglu":
        gate, up = y.chunk(2, dim=-1)  # weight rows are [gate; up]
        return torch.nn.functional.silu(gate) * up
    raise ValueError(f"unknown epilogue {epilogue!r}; one of {EPILOGUES}")


def _linear_out_shape(x: torch.Tensor, weight: torch.Tensor, epilogue: str) -> list:
    n = weight.shape[0] // 2 if epilogue == "swiglu" else weight.shape[0]
    return [*x.shape[:-1], n]


@torch.library.custom_op("llmc::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s, weight, eps)) with s = x + residual: the residual stream and the next layer's input."""
    s = x + residual
    return s, rms_norm(s, weight, eps)


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    s = torch.empty_like(x + residual)
    return s, s.new_empty(s.shape, dtype=torch.promote_types(weight.dtype, s.dtype))


@torch.library.custom_op("llmc::norm_linear", mutates_args=())
def norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, norm: str,
                epilogue: str) -> torch.Tensor:
    """epilogue(normalize(x) @ weight.T + bias): a GEMM with the norm in its prologue (the per-row statistic
    scales the accumulator) and SwiGLU in its epilogue. norm: none | rms | layer; epilogue: none | swiglu."""
    return _epilogue(torch.nn.functional.linear(_normalize(x, norm, eps), weight, bias), epilogue)


@norm_linear.register_fake
def _norm_linear_fake(x, weight, bias, eps, norm, epilogue):
    return x.new_empty(_linear_out_shape(x, weight, epilogue))


@torch.library.custom_op("llmc::add_norm_linear", mutates_args=())
def add_norm_linear(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float, norm: str, epilogue: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm_linear(s, ...)) with s = x + residual: residual add, norm and GEMM in one kernel."""
    s = x + residual
    return s, norm_linear(s, weight, bias, eps, norm, epilogue)


@add_norm_linear.register_fake
def _add_norm_linear_fake(x, residual, weight, bias, eps, norm, epilogue):
    s = torch.empty_like(x + residual)
    return s, s.new_empty(_linear_out_shape(s, weight, epilogue))


@torch.library.custom_op("llmc::rope", mutates_args=())
def rope(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
         norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Rotary embedding from precomputed tables, optionally after a per-head RMSNorm (Qwen3's q/k norm).

    x [B, S, H, D]; positions [B, S] int64; cos_table, sin_table [max_len, D] float32 (already multiplied by
    the RoPE attention scaling). out = h * cos[pos] + rotate_half(h) * sin[pos] in x's dtype, where
    h = rms_norm(x, norm_weight, eps) when norm_weight is given, else x (the unfused models' arithmetic).
    """
    h = rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    cos = cos_table[positions].to(h.dtype).unsqueeze(2)  # [B, S, 1, D]
    sin = sin_table[positions].to(h.dtype).unsqueeze(2)
    half = h.shape[-1] // 2
    rotated = torch.cat((-h[..., half:], h[..., :half]), dim=-1)
    return h * cos + rotated * sin


@rope.register_fake
def _rope_fake(x, positions, cos_table, sin_table, norm_weight, eps):
    dtype = torch.promote_types(norm_weight.dtype, x.dtype) if norm_weight is not None else x.dtype
    return x.new_empty(x.shape, dtype=dtype)


# ---- Attention (issue 5: dynamic block attention over the paged KV cache) --------------------------------------
#
# Both references are one scaled_dot_product_attention call per (sequence of the) batch: SDPA is what the unpassed
# models call, so a graph keeps its numerics when the pass swaps its attention for these ops (scores, softmax and
# the probabilities' accumulation in float32, the probabilities rounded to q's dtype before the product with V,
# as SDPA's CPU and flash kernels do). Query head h reads kv head h // (H // Hkv) (repeat_interleave order).


def _check_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str) -> int:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"{op}: q {tuple(q.shape)} must be [B, S, H, D] and k, v {tuple(k.shape)}, "
                         f"{tuple(v.shape)} equal [B, S, Hkv, D]")
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads == 0 or heads % kv_heads or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: {heads} query heads of dim {q.shape[-1]} cannot share {kv_heads} kv heads of dim "
                         f"{k.shape[-1]}; H must be a multiple of Hkv and the head dims equal")
    return heads // kv_heads


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
            mask: torch.Tensor | None) -> torch.Tensor:
    """q [S, H, D], keys / values [T, Hkv, D], mask [S, T] bool or None for causal with S == T -> [S, H, D]."""
    qh, kh, vh = q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                                           scale=scale, enable_gqa=q.shape[1] != keys.shape[1])
    return out[0].transpose(0, 1)


def _visible(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """[S, T] True where a query at its position may attend a key at its: causal, and within `window` if > 0."""
    offset = query_positions[:, None] - key_positions[None, :]
    return (offset >= 0) & (offset < window) if window > 0 else offset >= 0


@torch.library.custom_op("llmc::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """Causal attention without a cache: q [B, S, H, D], k / v [B, S, Hkv, D] -> [B, S, H, D] in q's dtype.

    Query i attends keys j <= i, and with window > 0 only those with i - j < window (sliding window).
    """
    _check_attention_heads(q, k, v, "causal_attention")
    positions = torch.arange(q.shape[1], device=q.device)
    mask = _visible(positions, positions, window) if window > 0 else None
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                                           scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).contiguous()


@causal_attention.register_fake
def _causal_attention_fake(q, k, v, scale, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llmc::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, past_lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """One layer's attention of a paged step: this step's queries over the sequence's cached keys and its new ones.

    q [B, S, H, D]; k / v [B, S, Hkv, D]: the step's new keys / values, not yet in the cache; k_cache / v_cache
    [NB, BS, Hkv, D]; block_table [B, MB] int64; past_lens [B] int64. Query i of sequence b sits at position
    p = past_lens[b] + i and attends the cached keys at positions t < past_lens[b] (block block_table[b, t // BS],
    slot t % BS) and the new keys j <= i (position past_lens[b] + j); with window > 0 only keys at positions
    > p - window. Rows are right-padded to the longest S (padded rows come out finite, otherwise arbitrary).

    Per sequence, only the cache blocks holding keys some query may see are gathered (ceil(past / BS) of them,
    fewer under a window), then one SDPA call.
    """
    _check_attention_heads(q, k, v, "paged_attention")
    batch, seq = q.shape[:2]
    block_size = k_cache.shape[1]
    if seq == 1 and batch > 1:
        return _paged_decode(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    new_positions = torch.arange(seq, device=q.device)
    for b, past in enumerate(past_lens.tolist()):
        first = max(0, past - window + 1) if window > 0 else 0  # the oldest position query 0 may see
        first_block, end_block = first // block_size, -(-past // block_size)
        blocks = block_table[b, first_block:end_block]
        start = first_block * block_size
        past_k = k_cache[blocks].flatten(0, 1)[: past - start]  # [past - start, Hkv, D]
        past_v = v_cache[blocks].flatten(0, 1)[: past - start]
        keys, values = torch.cat([past_k, k[b]]), torch.cat([past_v, v[b]])
        if past == 0 and window == 0:
            mask = None
        else:
            key_positions = torch.arange(start, past + seq, device=q.device)
            mask = _visible(past + new_positions, key_positions, window)
        out[b] = _attend(q[b], keys, values, scale, mask)
    return out


def _paged_decode(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window) -> torch.Tensor:
    """paged_attention for one new token per sequence, batched: every row gathers the blocks of the longest
    cached sequence, keys past a row's own length are masked (and zeroed, so stale cache contents, whatever their
    bits, cannot reach the softmax), and one SDPA call serves the batch instead of one per sequence."""
    block_size = k_cache.shape[1]
    longest = int(past_lens.max())
    blocks = block_table[:, : -(-longest // block_size)]  # [B, nb]
    past_k = k_cache[blocks].flatten(1, 2)[:, :longest]  # [B, longest, Hkv, D]
    past_v = v_cache[blocks].flatten(1, 2)[:, :longest]
    cached = torch.arange(longest, device=q.device)[None, :] < past_lens[:, None]  # [B, longest]
    if window > 0:
        cached &= torch.arange(longest, device=q.device)[None, :] > past_lens[:, None] - window
    keep = cached[..., None, None]
    keys = torch.cat([torch.where(keep, past_k, 0), k], 1).transpose(1, 2)  # [B, Hkv, T, D]
    values = torch.cat([torch.where(keep, past_v, 0), v], 1).transpose(1, 2)
    mask = torch.cat([cached, cached.new_ones(cached.shape[0], 1)], 1)[:, None, None, :]  # [B, 1, 1, T]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                           scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).contiguous()


@paged_attention.register_fake
def _paged_attention_fake(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---- KV-cache write fused with RoPE (issue 5 item 3) --------------------------------------------------------------

def check_kv_write(k: torch.Tensor, v: torch.Tensor, rotated_dtype: torch.dtype, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, layer: int, slots: torch.Tensor) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"rope_write_kv: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B, S, Hkv, D]")
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape or tuple(k_cache.shape[3:]) != tuple(k.shape[2:]):
        raise ValueError(f"rope_write_kv: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must both be "
                         f"[L, NB, BS, Hkv={k.shape[2]}, D={k.shape[3]}]")
    if not 0 <= layer < k_cache.shape[0]:
        raise ValueError(f"rope_write_kv: layer {layer} is outside the caches' {k_cache.shape[0]} layers")
    if tuple(slots.shape) != tuple(k.shape[:2]) or slots.dtype != torch.int64:
        raise ValueError(f"rope_write_kv: slots {tuple(slots.shape)} {slots.dtype} must be [B, S] = "
                         f"{tuple(k.shape[:2])} int64")
    if k_cache.dtype != rotated_dtype or v_cache.dtype != v.dtype:
        raise ValueError(f"rope_write_kv: rotated keys {rotated_dtype} and values {v.dtype} cannot go into "
                         f"{k_cache.dtype} / {v_cache.dtype} caches; build the caches in the model's dtype")


@torch.library.custom_op("llmc::rope_write_kv", mutates_args=("k_cache", "v_cache"))
def rope_write_kv(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                  sin_table: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """rope(k, positions, cos_table, sin_table, norm_weight, eps), also written with v into layer `layer` of the
    paged caches: the step's keys and values stored where attention of later steps reads them.

    k, v [B, S, Hkv, D] (k before the rotation, as llmc::rope takes it); k_cache, v_cache the whole
    [L, NB, BS, Hkv, D] caches; slots [B, S] int64: the flat slot block * BS + offset of each token, -1 for batch
    padding (not written). Returns the rotated keys, exactly llmc::rope's result. The slots of one call must be
    distinct (the runtime's block manager never lets two tokens share one), else which token lands is unspecified.
    """
    out = rope(k, positions, cos_table, sin_table, norm_weight, eps)
    check_kv_write(k, v, out.dtype, k_cache, v_cache, layer, slots)
    block_size = k_cache.shape[2]
    flat = slots.reshape(-1)
    keep = flat >= 0
    targets = flat[keep]
    index = (torch.full_like(targets, layer), targets // block_size, targets % block_size)
    k_cache.index_put_(index, out.reshape(-1, *out.shape[2:])[keep])  # any cache strides: no flattening view
    v_cache.index_put_(index, v.reshape(-1, *v.shape[2:])[keep])
    return out


@rope_write_kv.register_fake
def _rope_write_kv_fake(k, v, positions, cos_table, sin_table, norm_weight, eps, k_cache, v_cache, layer, slots):
    # No shape checks against slots here: in a traced graph its sizes are symbols of their own (an input the
    # model does not read), equal to k's only at run time.
    return _rope_fake(k, positions, cos_table, sin_table, norm_weight, eps)


# Ops declared in their own modules, registered whenever the ops are (graph.json names them all as llmc.*).
from llmc.codegen import quant  # noqa: E402,F401
from llmc.codegen import sparse_linear  # noqa: E402,F401  (llmc::sparse_linear, issue 7)


# llmc::sparse_paged_attention (issue 7) lives in its own module and registers with this one.
from llmc.codegen import sparse_attention  # noqa: E402,F401
from llmc.codegen.cpu import attention as cpu_attention  # noqa: E402,F401  (llmc::paged_attention_cpu, issue 14)
from llmc.codegen.cpu import rope as cpu_rope  # noqa: E402,F401  (llmc::rope_cpu, rope_write_kv_cpu)
