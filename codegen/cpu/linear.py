"""CPU lowerings of the GEMM ops: llmc::norm_linear_cpu, llmc::add_norm_linear_cpu and llmc::quant_linear_cpu take
their reference's arguments (codegen/ops.py, codegen/quant.py: same schema, same meaning, same fake) and run them
on ATen's CPU kernels; passes/lower_cpu.py puts them in the references' place in cpu bundles.

- float GEMMs: bf16 through oneDNN with the weight prepacked into its blocked layout (2x F.linear's bf16 on the
  qwen3-0.6b / SmolLM2 shapes at M = 1, where F.linear upcasts); fp32 through F.linear (MKL sgemm, which beat
  oneDNN's prepacked fp32 at every M = 1 shape measured); float16 through F.linear.
- int4_w4a16: ATen's packed int4 kernel (`_weight_int4pack_mm_for_cpu`, group 32..256), 3-5x the bf16 GEMM at
  M = 1. Its dequantization is W = (q - 8) * s + z with s, z per group in x's dtype; llmc's format is
  W = (q - zero) * scale, so s = scale and z = (8 - zero) * scale, both rounded once to x's dtype (the reference
  rounds W itself to x's dtype: the two differ within x's rounding, exactly equal in float32 whenever
  (8 - zero) * scale is).
- int8_w8a16: ATen's `_weight_int8pack_mm` (per-channel scale in x's dtype).
- other schemes (the a8 ones, fp8 weights): the reference.

Packing happens on a weight's first use, in its own process (the engine's warm-up, at load), and is kept while the
weight lives: ATen's packed int4 layout depends on the CPU capability ATen dispatches to at run time (AVX512,
AVX2 and the default kernel each pack differently), and oneDNN's packed weights are opaque tensors with no
storage to save, so neither can be written into a bundle that another host loads. The bundle stores llmc's
portable formats; packing SmolLM2-135M's weights takes well under a second.

On CPU the engine calls these Python implementations directly (codegen/cpu/direct.py), not through the dispatcher.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from llmc.codegen import ops, quant
from llmc.codegen.ops import _epilogue, _normalize

# weight tensor -> its packed form for one dtype: (dtype, packed...) ; dropped with the weight.
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes ATen's packed int4 CPU kernel takes


def _packed(weight: torch.Tensor, dtype: torch.dtype, pack):
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != dtype:
        entry = (dtype, pack())
        _PACKED[weight] = entry
    return entry[1]


def _gemm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h @ weight.T + bias in h's dtype (weight has h's dtype)."""
    if h.dtype != torch.bfloat16 or h.device.type != "cpu" or weight.device.type != "cpu":
        return torch.nn.functional.linear(h, weight, bias)
    packed = _packed(weight, h.dtype, lambda: torch.ops.mkldnn._reorder_linear_weight(weight, 1))
    rows = h.reshape(-1, h.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return y.reshape(*h.shape[:-1], weight.shape[0])


def norm_linear_impl(x, weight, bias, eps, norm, epilogue):
    return _epilogue(_gemm(_normalize(x, norm, eps), weight, bias), epilogue)


def add_norm_linear_impl(x, residual, weight, bias, eps, norm, epilogue):
    s = x + residual
    return s, norm_linear_impl(s, weight, bias, eps, norm, epilogue)


def int4_packed(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """(ATen's packed int4 weight, its [K / G, N, 2] scales and zeros in dtype) for llmc's int4 format."""
    levels = quant.unpack_int4(qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
    s = scale.float()
    scale_zero = torch.stack((s, (8.0 - zero.float()) * s), dim=-1)  # [N, groups, 2]
    return packed, scale_zero.transpose(0, 1).contiguous().to(dtype)


def _int4_gemm(h, qweight, scale, zero, bias, group_size):
    packed, scale_zero = _packed(qweight, h.dtype, lambda: int4_packed(qweight, scale, zero, h.dtype))
    rows = h.reshape(-1, h.shape[-1])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group_size, scale_zero)
    y = y.reshape(*h.shape[:-1], qweight.shape[0])
    return y + bias.to(y.dtype) if bias is not None else y


def _int8_gemm(h, qweight, scale, bias):
    scale_x = _packed(qweight, h.dtype, lambda: scale.to(h.dtype))
    rows = h.reshape(-1, h.shape[-1])
    y = torch.ops.aten._weight_int8pack_mm(rows, qweight, scale_x).reshape(*h.shape[:-1], qweight.shape[0])
    return y + bias.to(y.dtype) if bias is not None else y


def has_kernel(scheme: str, group_size: int, dtype: torch.dtype) -> bool:
    """Whether quant_linear_cpu runs `scheme` on an ATen kernel (else it runs the reference)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    return scheme == "int8_w8a16" or (scheme == "int4_w4a16" and group_size in INT4_GROUPS)


def quant_linear_impl(x, qweight, scale, zero, in_scale, bias, eps, norm, epilogue, scheme, group_size):
    if x.device.type != "cpu" or not has_kernel(scheme, group_size, x.dtype):
        return quant.quant_linear(x, qweight, scale, zero, in_scale, bias, eps, norm, epilogue, scheme, group_size)
    quant.check_scheme(scheme, group_size, qweight.shape[1] * (2 if scheme.startswith("int4") else 1))
    h = _normalize(x, norm, eps)
    if in_scale is not None:
        h = (h.float() * in_scale).to(x.dtype)
    if scheme == "int4_w4a16":
        y = _int4_gemm(h, qweight, scale, zero, bias, group_size)
    else:
        y = _int8_gemm(h, qweight, scale, bias)
    return _epilogue(y, epilogue)


@torch.library.custom_op("llmc::norm_linear_cpu", mutates_args=())
def norm_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, norm: str,
                    epilogue: str) -> torch.Tensor:
    """llmc::norm_linear on ATen's CPU GEMMs (module docstring)."""
    return norm_linear_impl(x, weight, bias, eps, norm, epilogue)


@torch.library.custom_op("llmc::add_norm_linear_cpu", mutates_args=())
def add_norm_linear_cpu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        eps: float, norm: str, epilogue: str) -> tuple[torch.Tensor, torch.Tensor]:
    """llmc::add_norm_linear on ATen's CPU GEMMs (module docstring)."""
    return add_norm_linear_impl(x, residual, weight, bias, eps, norm, epilogue)


@torch.library.custom_op("llmc::quant_linear_cpu", mutates_args=())
def quant_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     in_scale: torch.Tensor | None, bias: torch.Tensor | None, eps: float, norm: str, epilogue: str,
                     scheme: str, group_size: int) -> torch.Tensor:
    """llmc::quant_linear on ATen's packed weight-only CPU kernels (module docstring)."""
    return quant_linear_impl(x, qweight, scale, zero, in_scale, bias, eps, norm, epilogue, scheme, group_size)


norm_linear_cpu.register_fake(ops._norm_linear_fake)
add_norm_linear_cpu.register_fake(ops._add_norm_linear_fake)
quant_linear_cpu.register_fake(quant._quant_linear_fake)

llmc = torch.ops.llmc
# The lowering of each reference op (passes/lower_cpu.py).
LOWERINGS = {llmc.norm_linear.default: llmc.norm_linear_cpu.default,
             llmc.add_norm_linear.default: llmc.add_norm_linear_cpu.default,
             llmc.quant_linear.default: llmc.quant_linear_cpu.default}
