"""Launcher of llmc::quant_linear (codegen/quant.py defines the op, its schemes and weight formats) and its inputs.

Three kernels, rendered per spec like the other GEMMs (templates/quant_linear_*.py.j2):
- quant_linear_a16 (fp8_w8a16, int8_w8a16, int4_w4a16): one GEMM; the norm statistic in a prologue loop, the weight tile
  dequantized to x's dtype in the main loop, in_scale on the K axis, fp32 accumulation, bias and SwiGLU after.
- quant_linear_rows (the a8 schemes' first launch): one program per token row normalises, applies in_scale and
  writes the row quantized per token (int8, or e4m3 as bytes) with its a_scale.
- quant_linear_a8 (fp8_w8a8, int8_w8a8, int4_w4a8): the GEMM of those activations with the 8- or 4-bit weight on
  integer (int32, exact) or FP8 (sm_89+) tensor cores, scaled by a_scale[m] * scale[n] (per group for int4).

FP8 tensors reach the kernels as their bytes (uint8 views) and are bitcast inside: Triton's signature has no
float8 pointer type that the AOT planner (record.py) would need to name, and fp8_w8a16 decodes e4m3 with
integer ops so that it runs on GPUs without FP8 (sm_80). fp8_w8a8 needs e4m3 tensor-core dots: the launcher
refuses it on an arch before sm_89, and so does the planner, which runs this launcher.
Int4 kernels need the group to hold whole K tiles of at least 16 (w4a16) or 32 (w4a8, the int8 dot's K)
channels: group sizes that are multiples of 32 serve both.
"""
from __future__ import annotations

import torch
import triton

from llmc.codegen import ops
from llmc.codegen.quant import FP8, act_bits, check_scheme, quantize_weight
from llmc.codegen.triton import configs
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.hooks import current_arch, dtype_name, empty_output, load
from llmc.common.targets import FP8_MIN_CAPABILITY

# The weight format each scheme's kernels are rendered for (spec key "scheme").
WEIGHT_FORMAT = {"fp8_w8a16": "fp8", "fp8_w8a8": "fp8", "int8_w8a8": "int8", "int8_w8a16": "int8",
                 "int4_w4a16": "int4", "int4_w4a8": "int4"}
MIN_BLOCK_K = {16: 16, 8: 32}  # activation bits -> the smallest K a tensor-core dot takes (8-bit operands: 32)
_UNWRITTEN = {torch.int8: -128, torch.uint8: 0x7F}  # never a quantized value: -128 is clamped away, 0x7F is NaN


def _weight_layout(scheme: str, n_total: int, k: int, group_size: int) -> dict:
    """name -> (shape, dtype) each weight tensor of `scheme` must have."""
    if scheme.startswith("int4"):
        groups = k // group_size
        return {"qweight": ((n_total, k // 2), torch.uint8), "scale": ((n_total, groups), torch.float32),
                "zero": ((n_total, groups), torch.uint8)}
    qdtype = FP8 if scheme.startswith("fp8") else torch.int8
    return {"qweight": ((n_total, k), qdtype), "scale": ((n_total,), torch.float32), "zero": None}


def _check(x, qweight, scale, zero, in_scale, bias, norm, epilogue, scheme, group_size) -> int:
    """The weight's row count N (2N with swiglu), after checking every argument against the scheme."""
    if norm not in ops.NORMS or epilogue not in ops.EPILOGUES:
        raise ValueError(f"quant_linear: norm {norm!r} / epilogue {epilogue!r}; norm one of {ops.NORMS}, "
                         f"epilogue one of {ops.EPILOGUES}")
    k = x.shape[-1]
    check_scheme(scheme, group_size, k)
    dtype_name(x, "quant_linear x")
    n_total = qweight.shape[0] if qweight.dim() == 2 else -1
    for name, tensor in (("qweight", qweight), ("scale", scale), ("zero", zero)):
        expected = _weight_layout(scheme, max(n_total, 0), k, group_size)[name]
        if expected is None:
            if tensor is not None:
                raise ValueError(f"quant_linear: {scheme} has no zero point; pass zero=None")
            continue
        shape, dtype = expected
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != dtype or n_total < 0:
            got = "None" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise ValueError(f"quant_linear: {name} is {got}; {scheme} with K={k} needs {shape} {dtype} "
                             "(llmc.codegen.quant.quantize_weight's layout)")
    if epilogue == "swiglu" and n_total % 2:
        raise ValueError(f"quant_linear: swiglu needs an even number of weight rows ([gate; up]), got {n_total}")
    if in_scale is not None and (tuple(in_scale.shape) != (k,) or not in_scale.dtype.is_floating_point):
        raise ValueError(f"quant_linear: in_scale {tuple(in_scale.shape)} {in_scale.dtype} must be ({k},) float")
    if bias is not None and (tuple(bias.shape) != (n_total,) or bias.dtype != x.dtype):
        raise ValueError(f"quant_linear: bias {tuple(bias.shape)} {bias.dtype} must be ({n_total},) in {x.dtype}")
    if scheme.startswith("int4") and group_size % MIN_BLOCK_K[act_bits(scheme)]:
        raise ValueError(f"quant_linear: the {scheme} kernel needs a group size that is a multiple of "
                         f"{MIN_BLOCK_K[act_bits(scheme)]} (got {group_size}); quantize with group 32, 64 or 128")
    return n_total


def check_arch(scheme: str, arch: str) -> None:
    """Refuses a scheme the arch's tensor cores cannot run ("interpret", the CPU interpreter, runs them all)."""
    minimum = FP8_MIN_CAPABILITY[0] * 10 + FP8_MIN_CAPABILITY[1]
    if scheme == "fp8_w8a8" and arch.startswith("sm_") and int(arch[3:]) < minimum:
        raise ValueError(f"fp8_w8a8 needs FP8 tensor cores (sm_{minimum} and newer), which {arch} lacks; "
                         "quantize with fp8_w8a16 (FP8 weights, 16-bit GEMM) for this GPU")


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    rows = x.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _block_k(config_block_k: int, k: int, group_size: int, minimum: int) -> int:
    """The K step: the config's, no wider than K needs, and for int4 a power of two dividing the group."""
    block_k = max(minimum, min(config_block_k, triton.next_power_of_2(k)))
    if group_size:
        while group_size % block_k:
            block_k //= 2
    return block_k


def _scratch(shape, dtype, device, poison: bool) -> torch.Tensor:
    if poison:
        return torch.full(shape, _UNWRITTEN[dtype], dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _quantize_rows(rows, in_scale, eps, norm, fmt, arch, config, poison):
    m, k = rows.shape
    quantized = _scratch((m, k), torch.uint8 if fmt == "fp8" else torch.int8, rows.device, poison)
    a_scale = empty_output((m,), torch.float32, rows.device, poison)
    if m == 0:
        return quantized, a_scale
    config = config or configs.pick("quant_linear_rows", arch, m, k)
    chunk = min(triton.next_power_of_2(k), config.block_k)
    num_warps = max(1, min(config.num_warps, chunk // 256))
    kernel = load("quant_linear_rows", dtype=dtype_name(rows, "x"), scheme=fmt, k=k, norm=norm,
                  has_in_scale=in_scale is not None, block_k=chunk, num_warps=num_warps)
    args = [rows] + ([in_scale.contiguous()] if in_scale is not None else []) + [quantized, a_scale]
    kernel[(m,)](*args, rows.stride(0), eps, num_warps=num_warps)
    return quantized, a_scale


def launch_quantize_rows(x: torch.Tensor, in_scale: torch.Tensor | None, eps: float, norm: str, scheme: str, *,
                         config: Config | None = None, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The a8 schemes' first kernel alone: (activations quantized per token, x's shape, int8 or float8_e4m3fn;
    a_scale float32, x's shape less the last dim), as llmc.codegen.quant.quantize_activations gives them for
    normalize(x) * in_scale. For tests and benchmarks; launch_quant_linear runs it itself."""
    if act_bits(scheme) != 8:
        raise ValueError(f"{scheme} does not quantize activations; one of fp8_w8a8, int8_w8a8, int4_w4a8")
    if norm not in ops.NORMS:
        raise ValueError(f"quantize_rows: norm {norm!r}; one of {ops.NORMS}")
    k = x.shape[-1]
    if in_scale is not None and tuple(in_scale.shape) != (k,):
        raise ValueError(f"quantize_rows: in_scale {tuple(in_scale.shape)} must be ({k},)")
    arch = current_arch(x.device)
    check_arch(scheme, arch)
    fmt = WEIGHT_FORMAT[scheme] if scheme != "int4_w4a8" else "int8"
    quantized, a_scale = _quantize_rows(_rows(x, k), in_scale, eps, norm, fmt, arch, config, poison)
    if fmt == "fp8":
        quantized = quantized.view(FP8)
    return quantized.view(x.shape), a_scale.view(x.shape[:-1])


def launch_quant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        in_scale: torch.Tensor | None, bias: torch.Tensor | None, eps: float, norm: str,
                        epilogue: str, scheme: str, group_size: int, *, config: Config | None = None,
                        poison: bool = False) -> torch.Tensor:
    """llmc::quant_linear on the GPU (or the interpreter): one GEMM for the a16 schemes, the row quantizer then
    the GEMM for the a8 ones. `config` overrides the GEMM's block configuration (the K step is still fitted to
    the int4 group)."""
    n_total = _check(x, qweight, scale, zero, in_scale, bias, norm, epilogue, scheme, group_size)
    k = x.shape[-1]
    n = n_total // 2 if epilogue == "swiglu" else n_total
    rows = _rows(x, k)
    m = rows.shape[0]
    out = empty_output((*x.shape[:-1], n), x.dtype, x.device, poison)
    arch = current_arch(x.device)
    check_arch(scheme, arch)
    if m == 0 or n == 0:
        return out
    fmt, bits = WEIGHT_FORMAT[scheme], act_bits(scheme)
    group = group_size if fmt == "int4" else 0  # other formats ignore it: keep their specs (and cubins) one
    kernel_op = "quant_linear_a16" if bits == 16 else "quant_linear_a8"
    if config is None:
        element_bytes = x.element_size() if bits == 16 else 1
        config = configs.fit_shared_memory(configs.pick(kernel_op, arch, m, n, k, epilogue), arch, element_bytes,
                                           weight_tiles=2 if epilogue == "swiglu" else 1)
    block_k = _block_k(config.block_k, k, group, MIN_BLOCK_K[bits])
    spec = dict(dtype=dtype_name(x, "x"), scheme=fmt, n=n, k=k, group_size=group, epilogue=epilogue,
                has_bias=bias is not None, block_m=config.block_m, block_n=config.block_n, block_k=block_k,
                num_warps=config.num_warps, num_stages=config.num_stages)
    weight = qweight.contiguous()
    weight = weight.view(torch.uint8) if fmt == "fp8" else weight
    tensors = [weight, scale.contiguous()] + ([zero.contiguous()] if fmt == "int4" else [])
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    launch_options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if bits == 16:
        kernel = load(kernel_op, **spec, norm=norm, has_in_scale=in_scale is not None)
        tensors += [in_scale.contiguous()] if in_scale is not None else []
        tensors += [bias.contiguous()] if bias is not None else []
        kernel[grid](rows, *tensors, out, m, rows.stride(0), eps, **launch_options)
        return out
    quantized, a_scale = _quantize_rows(rows, in_scale, eps, norm, "fp8" if fmt == "fp8" else "int8", arch, None,
                                        poison)
    tensors += [bias.contiguous()] if bias is not None else []
    load(kernel_op, **spec)[grid](quantized, a_scale, *tensors, out, m, **launch_options)
    return out


def example_inputs(shapes: dict, dtype: torch.dtype, device: str, *, norm: str = "rms", epilogue: str = "none",
                   bias: bool = False, scheme: str = "int4_w4a16", group_size: int = 128) -> tuple:
    """Random quant_linear inputs in the op's argument order for shapes {"m", "n", "k"} (n: output features, per
    half with swiglu): a random weight quantized by quantize_weight (RTN), in_scale None."""
    m, n, k = shapes["m"], shapes["n"], shapes["k"]
    rows = 2 * n if epilogue == "swiglu" else n
    weight = torch.randn(rows, k, device=device) * k ** -0.5
    quantized = quantize_weight(weight, scheme, group_size)
    bias_tensor = torch.randn(rows, device=device).mul_(0.1).to(dtype) if bias else None
    x = torch.randn(m, k, device=device).to(dtype)
    return (x, quantized.qweight, quantized.scale, quantized.zero, None, bias_tensor, 1e-6, norm, epilogue, scheme,
            group_size)
