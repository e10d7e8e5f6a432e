"""ONNX translations of the llmc:: ops (codegen/ops.py holds the references: the definition of correct).

Each translation is an onnxscript function in trace mode: torch.onnx's dynamo exporter calls it with the node's
tensors as onnx_ir values (static head counts and head dims are read from their shapes) and its scalars as
Python values, and it returns the op's outputs. codegen/onnx.py passes `translation_table()` to
torch.onnx.export(custom_translation_table=...). ONNX ops emitted, all default domain, opset 23:

  rms_norm          RMSNormalization(axis=-1, stash_type=float32)  (+ Cast / Mul when x and weight dtypes differ)
  add_rms_norm      Add + RMSNormalization
  norm_linear       RMSNormalization | LayerNormalization with a unit scale (the gain is folded into the weight)
                    + Gemm(x as [rows, K], W, bias, transB=1) (+ SwiGLU: Split, Sigmoid, Mul) + Reshape
                    (aten.linear too: `linear` below says why not MatMul(x, Transpose(W)))
  add_norm_linear   Add + the above
  rope              (RMSNormalization for the q/k norm) + Reshape to [B, S, H*D] + RotaryEmbedding(num_heads=H)
                    with cos/sin caches sliced to [max_len, D/2]; where a table's halves differ (RotaryEmbedding
                    cannot express it) Gather / Split / Neg / Concat / Mul / Add instead
  causal_attention  Attention(is_causal=1, q_num_heads, kv_num_heads) on [B, S, H*D]; with a window, a boolean
                    attn_mask instead of is_causal
  paged_attention   Gather of the block table's cache blocks, Concat with the step's keys / values, a boolean
                    [B, 1, S, T] visibility mask (Range / Where / Sub / GreaterOrEqual (/ Less, And)), Attention

onnxruntime 1.31's CPU execution provider runs all of these (RMSNormalization, RotaryEmbedding and Attention of
opset 23 included, GQA through q_num_heads / kv_num_heads, boolean masks) in float32 and float16, so no
com.microsoft contrib op is needed. It has no bfloat16 kernels at all (not even Add or MatMul): a bfloat16 model
exports and passes the checker, but runs only on an execution provider with bfloat16 kernels (CUDA).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset23 as op

_FLOAT32 = ir.DataType.FLOAT
# Key position given to cache slots past a sequence's length: every query position minus it is negative, so the
# causal test alone hides them (positions are far below 2**62, no overflow).
_NO_POSITION = 2**62


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _scalar(value: int):
    return op.Constant(value_int=value)


def _ones(size: int, dtype: ir.DataType):
    return op.Constant(value=ir.tensor(np.ones(size, dtype=dtype.numpy())))


def _promoted(a: ir.DataType, b: ir.DataType) -> ir.DataType:
    """torch's promotion among float32 / float16 / bfloat16: equal stays, any other pair is float32."""
    return a if a == b else _FLOAT32


def _static(value, dims: range, what: str) -> list[int]:
    sizes = [value.shape[i] for i in dims]
    if not all(isinstance(s, int) for s in sizes):
        raise ValueError(f"{what}: dims {list(dims)} of {value.shape} must be static (head counts and head dims)")
    return sizes


def _normalize(x, norm: str, eps: float, size: int, dtype: ir.DataType):
    """The references' _normalize over the last dim (`size` wide; x's dtype given, as a value an op produced
    carries no type here): statistics in float32 (stash_type 1), the result cast back to x's dtype."""
    if norm == "none":
        return x
    unit = _ones(size, dtype)
    if norm == "rms":
        return op.RMSNormalization(x, unit, axis=-1, epsilon=eps, stash_type=1)
    if norm == "layer":
        y, _, _ = op.LayerNormalization(x, unit, axis=-1, epsilon=eps, stash_type=1)  # also its mean and 1/std
        return y
    raise ValueError(f"unknown norm {norm!r}")


def _rms_norm(x, weight, eps: float, dtype: ir.DataType):
    if dtype == weight.dtype:
        return op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)
    out = _promoted(dtype, weight.dtype)  # weight * h.to(x.dtype) in torch's promoted dtype
    h = _normalize(x, "rms", eps, _static(weight, range(-1, 0), "rms_norm")[0], dtype)
    return op.Mul(op.Cast(weight, to=out), op.Cast(h, to=out))


def rms_norm(x, weight, eps: float):
    return _rms_norm(x, weight, eps, x.dtype)


def add_rms_norm(x, residual, weight, eps: float):
    s = op.Add(x, residual)
    return s, _rms_norm(s, weight, eps, _promoted(x.dtype, residual.dtype))


def _norm_linear(x, weight, bias, eps: float, norm: str, epilogue: str, dtype: ir.DataType):
    out, size = _static(weight, range(2), "norm_linear")
    h = _normalize(x, norm, eps, size, dtype)
    rows = op.Gemm(op.Reshape(h, _ints(-1, size)), weight, bias, transB=1)
    if epilogue == "swiglu":
        gate, up = op.Split(rows, axis=-1, num_outputs=2)  # weight rows are [gate; up]
        rows, out = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), out // 2
    elif epilogue != "none":
        raise ValueError(f"unknown epilogue {epilogue!r}")
    return op.Reshape(rows, op.Concat(op.Shape(x, end=-1), _ints(out), axis=0))


def linear(input, weight, bias=None):
    """aten.linear, in place of torch.onnx's MatMul(x, Transpose(W)): its optimizer folds that Transpose into a
    transposed, renamed copy of every weight (twice the weight memory while exporting). Gemm(transB=1) reads W
    as stored."""
    return _norm_linear(input, weight, bias, 0.0, "none", "none", input.dtype)


def norm_linear(x, weight, bias, eps: float, norm: str, epilogue: str):
    return _norm_linear(x, weight, bias, eps, norm, epilogue, x.dtype)


def add_norm_linear(x, residual, weight, bias, eps: float, norm: str, epilogue: str):
    s = op.Add(x, residual)
    return s, _norm_linear(s, weight, bias, eps, norm, epilogue, _promoted(x.dtype, residual.dtype))


def _rope_input(x, norm_weight, eps: float):
    """h (x after the optional q/k norm) and its dtype."""
    if norm_weight is None:
        return x, x.dtype
    return rms_norm(x, norm_weight, eps), _promoted(x.dtype, norm_weight.dtype)


def rope_with_rotary_embedding(x, positions, cos_table, sin_table, norm_weight, eps: float):
    """RotaryEmbedding rotates (x1, x2) halves by cos / sin caches of D/2 columns; ours hold D columns with equal
    halves (export checks that), so the first half is the cache. Caches are cast to h's dtype as the reference's
    `.to(h.dtype)` does."""
    h, dtype = _rope_input(x, norm_weight, eps)
    heads, dim = _static(x, range(2, 4), "rope")
    half = _ints(dim // 2)
    cos = op.Cast(op.Slice(cos_table, _ints(0), half, _ints(1)), to=dtype)
    sin = op.Cast(op.Slice(sin_table, _ints(0), half, _ints(1)), to=dtype)
    rotated = op.RotaryEmbedding(op.Reshape(h, _ints(0, 0, -1)), cos, sin, positions, num_heads=heads)
    return op.Reshape(rotated, _ints(0, 0, heads, dim))


def rope_with_plain_ops(x, positions, cos_table, sin_table, norm_weight, eps: float):
    """The reference's arithmetic op by op: h * cos[pos] + rotate_half(h) * sin[pos]."""
    h, dtype = _rope_input(x, norm_weight, eps)
    cos = op.Unsqueeze(op.Cast(op.Gather(cos_table, positions, axis=0), to=dtype), _ints(2))  # [B, S, 1, D]
    sin = op.Unsqueeze(op.Cast(op.Gather(sin_table, positions, axis=0), to=dtype), _ints(2))
    first, second = op.Split(h, axis=-1, num_outputs=2)
    rotated = op.Concat(op.Neg(second), first, axis=-1)
    return op.Add(op.Mul(h, cos), op.Mul(rotated, sin))


def _attention(q, keys, values, mask, scale: float, kv_heads: int, is_causal: bool):
    """q [B, S, H, D]; keys / values [B, T, Hkv*D] -> [B, S, H, D]; query head h reads kv head h // (H / Hkv),
    the Attention op's GQA order and the reference's. softmax_precision=1 asks for SDPA's float32 softmax;
    onnxruntime 1.31's CPU kernel ignores it in float16 (about 1.5x SDPA's error, still within 1e-3 of float64)."""
    heads, dim = _static(q, range(2, 4), "attention")
    y, _, _, _ = op.Attention(op.Reshape(q, _ints(0, 0, -1)), keys, values, mask, q_num_heads=heads,
                              kv_num_heads=kv_heads, scale=scale, is_causal=int(is_causal), softmax_precision=1)
    return op.Reshape(y, _ints(0, 0, heads, dim))


def _visibility(query_positions, key_positions, window: int):
    """[B, 1, S, T] bool: key at its position visible from the query at its: causal, within window if > 0."""
    offset = op.Sub(op.Unsqueeze(query_positions, _ints(2)), op.Unsqueeze(key_positions, _ints(1)))
    visible = op.GreaterOrEqual(offset, _scalar(0))
    if window > 0:
        visible = op.And(visible, op.Less(offset, _scalar(window)))
    return op.Unsqueeze(visible, _ints(1))


def causal_attention(q, k, v, scale: float, window: int):
    kv_heads = _static(k, range(2, 3), "causal_attention")[0]
    keys, values = op.Reshape(k, _ints(0, 0, -1)), op.Reshape(v, _ints(0, 0, -1))
    if window == 0:
        return _attention(q, keys, values, None, scale, kv_heads, is_causal=True)
    seq = op.Squeeze(op.Shape(q, start=1, end=2), _ints(0))
    positions = op.Unsqueeze(op.Range(_scalar(0), seq, _scalar(1)), _ints(0))  # [1, S]
    return _attention(q, keys, values, _visibility(positions, positions, window), scale, kv_heads, is_causal=False)


def paged_attention(q, k, v, k_cache, v_cache, block_table, past_lens, scale: float, window: int):
    """Every block of each sequence's table is gathered (the reference gathers only the ones a query may see) and
    the mask hides cache slots at positions >= past_lens[b]: one batched Attention call instead of a loop."""
    block_size, kv_heads = _static(k_cache, range(1, 3), "paged_attention")
    flat = _ints(0, -1, kv_heads * _static(k_cache, range(3, 4), "paged_attention")[0])
    keys = op.Concat(op.Reshape(op.Gather(k_cache, block_table, axis=0), flat), op.Reshape(k, flat), axis=1)
    values = op.Concat(op.Reshape(op.Gather(v_cache, block_table, axis=0), flat), op.Reshape(v, flat), axis=1)

    capacity = op.Mul(op.Squeeze(op.Shape(block_table, start=1, end=2), _ints(0)), _scalar(block_size))
    seq = op.Squeeze(op.Shape(q, start=1, end=2), _ints(0))
    slots = op.Range(_scalar(0), capacity, _scalar(1))  # [MB*BS]: a slot's position in its sequence
    past = op.Unsqueeze(past_lens, _ints(1))  # [B, 1]
    query_positions = op.Add(past, op.Range(_scalar(0), seq, _scalar(1)))  # [B, S]
    cached_positions = op.Where(op.Less(slots, past), slots, _scalar(_NO_POSITION))  # [B, MB*BS]
    key_positions = op.Concat(cached_positions, query_positions, axis=1)  # [B, T], T = MB*BS + S
    return _attention(q, keys, values, _visibility(query_positions, key_positions, window), scale, kv_heads,
                      is_causal=False)


def translation_table(rope_uses_rotary_embedding: bool = True) -> dict:
    """llmc op overload -> translation, for torch.onnx.export's custom_translation_table."""
    llmc = torch.ops.llmc
    rope = rope_with_rotary_embedding if rope_uses_rotary_embedding else rope_with_plain_ops
    return {
        torch.ops.aten.linear.default: linear,
        llmc.rms_norm.default: rms_norm,
        llmc.add_rms_norm.default: add_rms_norm,
        llmc.norm_linear.default: norm_linear,
        llmc.add_norm_linear.default: add_norm_linear,
        llmc.rope.default: rope,
        llmc.causal_attention.default: causal_attention,
        llmc.paged_attention.default: paged_attention,
    }
