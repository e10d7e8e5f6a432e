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
