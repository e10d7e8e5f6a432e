"""Quantized linear layers: the `llmc::quant_linear` op, its reference, and the weight formats it reads.

One op serves every scheme, with norm_linear's prologue (rms / layer norm, gain folded into the weight before
quantization) and epilogue (SwiGLU), so quantizing a fused GEMM keeps it fused:

    h = normalize(x, norm, eps) in x's dtype (float32 statistics), then h * in_scale in float32 when in_scale is
        given (SmoothQuant / AWQ: the weight's input channels were multiplied by 1 / in_scale before quantizing)
    y = epilogue(GEMM(h, W) + bias) in x's dtype

Schemes and weight formats (N output channels, K input channels, G = group_size):
- "fp8_w8a16"  qweight float8_e4m3fn [N, K], scale float32 [N]: W = qweight * scale[:, None], dequantized to x's
               dtype and multiplied in x's dtype (where the target has no FP8 tensor cores, before sm_89).
- "fp8_w8a8"   same weight; activations quantized per token (row) to e4m3 with scale amax(|h|) / 448, the
               product of the FP8 values accumulated in float32, then * a_scale[m] * scale[n] (sm_89+).
- "int8_w8a8"  qweight int8 [N, K] (symmetric, -127..127), scale float32 [N]; activations per token to int8 with
               scale amax(|h|) / 127 (round half to even, clamp); exact integer accumulation, * a_scale * scale.
- "int8_w8a16" the int8 weight above, W = qweight * scale[:, None] dequantized to x's dtype and multiplied in x's
               dtype (weight-only: ATen's int8 kernel on CPU, codegen/cpu/linear.py; quant_linear_a16 on GPUs).
- "int4_w4a16" qweight uint8 [N, K / 2]: k = 2j in the low nibble, k = 2j + 1 in the high one, 0..15; scale
               float32 [N, K / G], zero uint8 [N, K / G] (asymmetric): W = (q - zero) * scale per group,
               dequantized to x's dtype and multiplied in x's dtype.
- "int4_w4a8"  the int4 weight above with int8 per-token activations: per group g an exact integer dot
               sum_k hq[k] * (q[n, k] - zero[n, g]), scaled by a_scale[m] * scale[n, g] and summed in float32.
The a8 schemes add the bias in float32 before casting to x's dtype; the a16 ones are F.linear in x's dtype.
Integer accumulations here run in float64, which is exact for these ranges (|sum| < 2**53), so the reference is
the exact result that a Triton kernel's int32 accumulator must reproduce.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from llmc.codegen.ops import _epilogue, _normalize

SCHEMES = ("fp8_w8a16", "fp8_w8a8", "int8_w8a8", "int8_w8a16", "int4_w4a16", "int4_w4a8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_LEVELS = 15
TINY = 1e-12  # floor of a scale: an all-zero row or group quantizes to zeros instead of dividing by zero


def weight_bits(scheme: str) -> int:
    return 4 if scheme.startswith("int4") else 8


def act_bits(scheme: str) -> int:
    return 16 if scheme.endswith("a16") else 8


class QuantizedWeight(NamedTuple):
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None  # int4 only


def check_scheme(scheme: str, group_size: int, k: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; one of {', '.join(SCHEMES)}")
    if scheme.startswith("int4"):
        if group_size < 2 or group_size % 2 or k % group_size:
            raise ValueError(f"{scheme}: group size {group_size} must be even and divide the {k} input channels")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers 0..15 -> [N, K / 2] uint8, element 2j in the low nibble and 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 2] uint8 -> [N, K] uint8 in 0..15 (pack_int4's inverse)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight for `scheme` (calibration-aware schemes scale w first).

    Scales come from float32 statistics: per output channel amax / qmax (fp8, int8), per group (max - min) / 15
    with an integer zero point (int4). Works on meta tensors (shapes and dtypes only)."""
    check_scheme(scheme, group_size, w.shape[-1])
    w32 = w.float()
    if scheme.startswith("fp8"):
        scale = (w32.abs().amax(dim=1) / FP8_MAX).clamp(min=TINY)
        return QuantizedWeight((w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale, None)
    if scheme.startswith("int8"):
        scale = (w32.abs().amax(dim=1) / INT8_MAX).clamp(min=TINY)
        q = torch.round(w32 / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return QuantizedWeight(q, scale, None)
    n, k = w32.shape
    groups = w32.reshape(n, k // group_size, group_size)
    low = groups.amin(dim=-1).clamp(max=0.0)  # the range always holds 0, so zero weights stay exact
    high = groups.amax(dim=-1).clamp(min=0.0)
    scale = ((high - low) / INT4_LEVELS).clamp(min=TINY)
    zero = torch.round(-low / scale).clamp(0, INT4_LEVELS)
    q = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, INT4_LEVELS)
    return QuantizedWeight(pack_int4(q.reshape(n, k)), scale, zero.to(torch.uint8))


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: str,
                      group_size: int) -> torch.Tensor:
    """The float32 [N, K] weight the quantized one stands for."""
    if scheme.startswith(("fp8", "int8")):
        return qweight.float() * scale[:, None]
    q = unpack_int4(qweight).float()
    n, k = q.shape
    groups = q.reshape(n, k // group_size, group_size) - zero.float()[..., None]
    return (groups * scale[..., None]).reshape(n, k)


def quantize_activations(h: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last-dim row) dynamic quantization of float32 h: (values as float32 holding the quantized
    numbers exactly, a_scale [..., 1] float32)."""
    if scheme == "fp8_w8a8":
        a_scale = (h.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=TINY)
        return (h / a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float(), a_scale
    a_scale = (h.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=TINY)
    return torch.round(h / a_scale).clamp(-INT8_MAX, INT8_MAX), a_scale


def _gemm_a8(h32: torch.Tensor, qweight, scale, zero, scheme: str, group_size: int) -> torch.Tensor:
    hq, a_scale = quantize_activations(h32, scheme)
    if scheme != "int4_w4a8":
        acc = hq.double() @ qweight.double().T  # exact: fp8 and int8 products summed in float64
        return acc.float() * a_scale * scale
    w = unpack_int4(qweight).double()
    n, k = w.shape
    w = (w.reshape(n, k // group_size, group_size) - zero.double()[..., None])  # [N, groups, G]
    hg = hq.double().reshape(*hq.shape[:-1], k // group_size, group_size)  # [..., groups, G]
    acc = torch.einsum("...gk,ngk->...ng", hg, w)  # exact integer group sums
    return (acc.float() * scale).sum(dim=-1) * a_scale


@torch.library.custom_op("llmc::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 in_scale: torch.Tensor | None, bias: torch.Tensor | None, eps: float, norm: str, epilogue: str,
                 scheme: str, group_size: int) -> torch.Tensor:
    """epilogue(GEMM(normalize(x) * in_scale, W(qweight, scale, zero)) + bias) in x's dtype; see the module
    docstring for the schemes. norm: none | rms | layer; epilogue: none | swiglu; group_size: int4's group."""
    k = qweight.shape[1] * (2 if scheme.startswith("int4") else 1)
    check_scheme(scheme, group_size, k)
    h = _normalize(x, norm, eps)
    h32 = h.float() * in_scale if in_scale is not None else h.float()
    if act_bits(scheme) == 16:
        w = dequantize_weight(qweight, scale, zero, scheme, group_size).to(x.dtype)
        y = torch.nn.functional.linear(h32.to(x.dtype), w, bias)
    else:
        y = _gemm_a8(h32, qweight, scale, zero, scheme, group_size)
        y = (y + bias.float() if bias is not None else y).to(x.dtype)
    return _epilogue(y, epilogue)


@quant_linear.register_fake
def _quant_linear_fake(x, qweight, scale, zero, in_scale, bias, eps, norm, epilogue, scheme, group_size):
    n = qweight.shape[0] // 2 if epilogue == "swiglu" else qweight.shape[0]
    return x.new_empty([*x.shape[:-1], n])


# The CPU lowerings need this module's op and fake: registered once both exist, whichever module came first.
from llmc.codegen.cpu import linear as cpu_linear  # noqa: E402,F401  (llmc::*_linear_cpu, issue 14)
