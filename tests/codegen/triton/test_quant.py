"""llmc::quant_linear's Triton kernels (codegen/triton/quant.py) against the reference (codegen/quant.py), under
the interpreter on CPU (or compiled on a GPU), and their planning and cross-compilation to cubins.

What is compared:
- Every scheme, end to end on random inputs, at DESIGN.md's tolerances: fp8 (both schemes) rtol 1e-2 atol 5e-2;
  int4 (both) mean |out - ref| / mean |ref| < 0.04. Besides, the kernels compute the reference's arithmetic
  (normalised x rounded to x's dtype, weights dequantized in float32 and rounded, the same scale order), so
  the weight-only schemes are also held to the 16-bit GEMM tolerance of DESIGN.md for x's dtype.
- The a8 schemes in two steps, since the row statistic (rms / layer) is summed in another order than torch's:
  a normalised value may then round to the neighbouring x-dtype value, and its quantized activation by one
  step. (1) The activations of the row kernel against the reference's: a_scale within one ulp of x's dtype,
  every quantized value within one step. (2) The GEMM against the reference evaluated on the kernel's own
  activations: int8_w8a8 and int4_w4a8 accumulate integers exactly and scale them in the reference's order, so
  without swiglu their output is bitwise equal; fp8_w8a8 accumulates e4m3 products in float32 (the reference
  in float64), so it is held to the x-dtype GEMM tolerance.
- On inputs whose row statistics are exact in float32 whatever the order (random multiples of 1/8, K a power of
  two), the activations must equal the reference's bit for bit, and int8 / int4 outputs too: no tie rounds
  differently. Observed on generic inputs: no activation differs at all in these tests (the statistic's
  order rarely moves a value across a rounding boundary).

The interpreter converts float32 to e4m3 wrongly (rounds half up, and 126.5 becomes 64); a GPU converts with
cvt.rn.satfinite (round to nearest even), as torch does. The conversion is patched below for this process,
the way conftest.py patches bfloat16's: the interpreted kernel is judged with the arithmetic a GPU does.
"""
import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter

from llmc.codegen import quant
from llmc.codegen.ops import _normalize
from llmc.codegen.triton import launch, plan
from llmc.codegen.triton.aot import compile_all
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.quant import launch_quant_linear, launch_quantize_rows
from llmc.runtime.kernels import cubin_arch

_previous_convert = interpreter._convert_float
_TO_TORCH = {tl.float32: (np.float32, torch.float32), tl.float16: (np.float16, torch.float16)}


def _convert_float_e4m3_to_nearest_even(data, input_dtype, output_dtype, rounding_mode):
    if output_dtype == tl.float8e4nv and input_dtype in _TO_TORCH:
        np_type, torch_type = _TO_TORCH[input_dtype]
        values = torch.from_numpy(np.ascontiguousarray(data).view(np_type))
        return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return _previous_convert(data, input_dtype, output_dtype, rounding_mode)


interpreter._convert_float = _convert_float_e4m3_to_nearest_even

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
A8 = ["fp8_w8a8", "int8_w8a8", "int4_w4a8"]
GEMM_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # relative, at most
FLOAT32_ROUNDINGS = 4 * 2.0 ** -24  # a few float32 roundings, relative
# (tokens M, in features K, int4 group, out features N, norm, epilogue, bias, in_scale). The interpreter's tiles
# are 16 or 32 wide: N = 40 / 24 leave a partial N tile, M = 33 spans two row tiles, K = 128 with group 64 gives
# int4_w4a8 two K tiles per group.
CASES = [
    (1, 128, 64, 40, "none", "none", False, False),
    (5, 128, 64, 40, "rms", "none", True, True),
    (33, 256, 128, 40, "rms", "swiglu", False, True),
    (5, 96, 32, 24, "none", "swiglu", True, False),
    (33, 128, 64, 24, "layer", "none", True, True),
    (1, 256, 128, 40, "rms", "swiglu", True, False),
]


def problem(scheme, m, k, group, n, epilogue, bias, in_scale, dtype, device, grid=False):
    rows = 2 * n if epilogue == "swiglu" else n
    weight = quant.quantize_weight(torch.randn(rows, k) * k ** -0.5, scheme, group)
    if grid:  # multiples of 1/8 in [-3, 3]: squares and their sums over K <= 256 are exact in float32
        x = (torch.randint(-24, 25, (m, k)) / 8).to(dtype)
    else:
        x = (torch.randn(m, k) * 2 + 0.3).to(dtype)
    args = dict(x=x, qweight=weight.qweight, scale=weight.scale, zero=weight.zero,
                in_scale=torch.rand(k) + 0.5 if in_scale else None,
                bias=(0.1 * torch.randn(rows)).to(dtype) if bias else None)
    return {name: value.to(device) if value is not None else None for name, value in args.items()}


def run_kernel(args, norm, epilogue, scheme, group, **options):
    return launch_quant_linear(**args, eps=1e-6, norm=norm, epilogue=epilogue, scheme=scheme, group_size=group,
                               poison=True, **options)


def run_reference(args, norm, epilogue, scheme, group):
    cpu = {name: value.cpu() if value is not None else None for name, value in args.items()}
    return quant.quant_linear(**cpu, eps=1e-6, norm=norm, epilogue=epilogue, scheme=scheme, group_size=group)


def reference_h(args, norm):
    """What the reference quantizes: normalize(x) in x's dtype, in float32, times in_scale."""
    h = _normalize(args["x"].cpu(), norm, 1e-6).float()
    return h * args["in_scale"].cpu() if args["in_scale"] is not None else h


def reference_activations(args, norm, scheme):
    values, a_scale = quant.quantize_activations(reference_h(args, norm), scheme)
    return values, a_scale.squeeze(-1)


def mean_relative_error(out, reference) -> float:
    return ((out.float() - reference.float()).abs().mean() / reference.float().abs().mean()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("m,k,group,n,norm,epilogue,bias,in_scale", CASES)
def test_matches_reference(device, monkeypatch, scheme, dtype, m, k, group, n, norm, epilogue, bias, in_scale):
    args = problem(scheme, m, k, group, n, epilogue, bias, in_scale, dtype, device)
    out = run_kernel(args, norm, epilogue, scheme, group).cpu()
    reference = run_reference(args, norm, epilogue, scheme, group)
    assert out.shape == reference.shape and out.dtype == dtype and not out.isnan().any()
    if scheme.startswith("fp8"):
        torch.testing.assert_close(out, reference, rtol=1e-2, atol=5e-2)
    if scheme.startswith("int4"):
        assert mean_relative_error(out, reference) < 0.04
    rtol, atol = GEMM_TOLERANCE[dtype]
    if quant.act_bits(scheme) == 16:
        torch.testing.assert_close(out, reference, rtol=rtol, atol=atol)
        return
    activations, a_scale = launch_quantize_rows(args["x"], args["in_scale"], 1e-6, norm, scheme)
    activations, a_scale = activations.cpu(), a_scale.cpu()
    h = reference_h(args, norm)
    # One rounding of x's dtype (the amax element's) apart, plus float32 roundings (in_scale's product, the division).
    torch.testing.assert_close(a_scale, h.abs().amax(-1) / (448.0 if scheme == "fp8_w8a8" else 127.0),
                               rtol=ULP[dtype] + FLOAT32_ROUNDINGS, atol=0)
    # The kernel's activations quantize h (up to those roundings): within half a step of it, the step being
    # a_scale for int8 and a_scale times the e4m3 spacing (1/8 relative, 2^-9 below 2^-6) for fp8.
    error = (activations.float() * a_scale[:, None] - h).abs()
    if scheme == "fp8_w8a8":
        bound = h.abs() * 2.0 ** -4 + a_scale[:, None] * 2.0 ** -10
    else:
        bound = a_scale[:, None] / 2
    assert (error <= bound + h.abs() * (ULP[dtype] + FLOAT32_ROUNDINGS)).all()
    # The reference's GEMM, bias, cast and epilogue on the kernel's activations.
    monkeypatch.setattr(quant, "quantize_activations",
                        lambda h, s: (activations.cpu().float().reshape(h.shape), a_scale.cpu().reshape(-1, 1)))
    on_kernel_activations = run_reference(args, norm, epilogue, scheme, group)
    if scheme != "fp8_w8a8" and epilogue == "none":
        assert torch.equal(out, on_kernel_activations)
    else:
        torch.testing.assert_close(out, on_kernel_activations, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["none", "rms"])
@pytest.mark.parametrize("scheme", A8)
def test_activations_and_integer_gemm_are_exact_when_the_statistic_is(device, scheme, norm, dtype):
    # K = 256 in chunks of 64 (rms) or one chunk (none): the row kernel's loop runs both ways.
    args = problem(scheme, 33, 256, 64, 40, "none", True, True, dtype, device, grid=True)
    chunk = Config(block_k=64) if norm == "rms" else None
    activations, a_scale = launch_quantize_rows(args["x"], args["in_scale"], 1e-6, norm, scheme, config=chunk,
                                                poison=True)
    expected_activations, expected_scale = reference_activations(args, norm, scheme)
    assert torch.equal(a_scale.cpu(), expected_scale)
    assert torch.equal(activations.cpu().float(), expected_activations)
    assert activations.dtype == (quant.FP8 if scheme == "fp8_w8a8" else torch.int8)
    out = run_kernel(args, norm, "none", scheme, 64).cpu()
    reference = run_reference(args, norm, "none", scheme, 64)
    if scheme == "fp8_w8a8":
        torch.testing.assert_close(out, reference, rtol=GEMM_TOLERANCE[dtype][0], atol=GEMM_TOLERANCE[dtype][1])
    else:
        assert torch.equal(out, reference)


def test_rounding_is_half_to_even_and_clamped(device):
    # Row amax 127 * 0.5 gives a_scale 0.5, so x / a_scale lands on exact ties: 0.25 -> 0.5 -> 0, 0.75 -> 1.5 -> 2
    # (half to even), -1.25 -> -2.5 -> -2; the max maps to 127 and its negative to -127 (int8 never holds -128).
    x = torch.tensor([[63.5, 0.25, 0.75, -1.25, 1.75, -63.5, 0.0, 2.25] * 4], device=device)
    activations, a_scale = launch_quantize_rows(x, None, 1e-6, "none", "int8_w8a8", poison=True)
    assert a_scale.item() == 0.5
    assert activations[0, :8].tolist() == [127, 0, 2, -2, 4, -127, 0, 4]
    zeros, zero_scale = launch_quantize_rows(torch.zeros(2, 32, device=device), None, 1e-6, "none", "fp8_w8a8")
    assert (zeros.float() == 0).all() and (zero_scale == quant.TINY).all()


@pytest.mark.parametrize("scheme", ["fp8_w8a16", "fp8_w8a8", "int8_w8a8"])
def test_k_tail_and_block_config(device, scheme):
    # K = 80 leaves a partial K tile of 32 (and 16 x 16 x 32 tiles three N tiles for N = 40).
    args = problem(scheme, 33, 80, 0, 40, "swiglu", True, True, torch.float16, device)
    out = run_kernel(args, "rms", "swiglu", scheme, 0, config=Config(16, 16, 32, 1, 1)).cpu()
    torch.testing.assert_close(out, run_reference(args, "rms", "swiglu", scheme, 0), rtol=1e-2, atol=5e-2)


def test_batched_strided_input(device):
    wide = torch.randn(2, 3, 160, device=device, dtype=torch.bfloat16)
    x = wide[..., 16:144]  # rows of stride 160 reach the kernels without a copy
    weight = quant.quantize_weight(torch.randn(24, 128) * 0.1, "int4_w4a8", 64)
    args = dict(x=x, qweight=weight.qweight.to(device), scale=weight.scale.to(device), zero=weight.zero.to(device),
                in_scale=None, bias=None)
    out = run_kernel(args, "rms", "none", "int4_w4a8", 64).cpu()
    assert out.shape == (2, 3, 24)
    assert mean_relative_error(out, run_reference(args, "rms", "none", "int4_w4a8", 64)) < 0.04


def _arguments(scheme="int4_w4a8", group=64, **changes):
    weight = quant.quantize_weight(torch.randn(40, 128), scheme, group)
    return dict(x=torch.randn(3, 128), qweight=weight.qweight, scale=weight.scale, zero=weight.zero, in_scale=None,
                bias=None, eps=1e-6, norm="rms", epilogue="none", scheme=scheme, group_size=group) | changes


@pytest.mark.parametrize("changes,message", [
    (dict(scheme="int4_w4a32"), "unknown quantization scheme"),
    (dict(norm="batch"), "norm 'batch'"),
    (dict(qweight=torch.zeros(40, 128, dtype=torch.uint8)), "qweight is \\(40, 128\\) torch.uint8"),
    (dict(scale=torch.ones(40)), "scale is \\(40,\\)"),
    (dict(zero=None), "zero is None"),
    (dict(bias=torch.randn(40, dtype=torch.float16)), "bias \\(40,\\) torch.float16"),
    (dict(in_scale=torch.ones(64)), "in_scale \\(64,\\)"),
    (dict(epilogue="swiglu", qweight=torch.zeros(39, 64, dtype=torch.uint8), scale=torch.ones(39, 2),
          zero=torch.zeros(39, 2, dtype=torch.uint8)), "even number of weight rows"),
])
def test_bad_arguments_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        launch_quant_linear(**_arguments(**changes))


def test_small_groups_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="multiple of 32 .* group 32, 64 or 128"):
        launch_quant_linear(**_arguments(group=16))
    with pytest.raises(ValueError, match="has no zero point"):
        weight = quant.quantize_weight(torch.randn(40, 128), "int8_w8a8")
        launch_quant_linear(**_arguments("int8_w8a8", 0, qweight=weight.qweight, scale=weight.scale,
                                         zero=torch.zeros(40, 1, dtype=torch.uint8)))


class QuantizedMLP(torch.nn.Module):
    """gate_up (rms, swiglu) then down (bias), both quant_linear calls, weights in buffers."""

    def __init__(self, scheme, group, hidden=64, ffn=96):
        super().__init__()
        self.scheme, self.group = scheme, group
        for name, shape in (("gate_up", (2 * ffn, hidden)), ("down", (hidden, ffn))):
            weight = quant.quantize_weight(torch.randn(*shape) * 0.1, scheme, group)
            self.register_buffer(f"{name}_q", weight.qweight)
            self.register_buffer(f"{name}_scale", weight.scale)
            if weight.zero is None:  # export takes no None buffers
                setattr(self, f"{name}_zero", None)
            else:
                self.register_buffer(f"{name}_zero", weight.zero)
        self.register_buffer("bias", torch.randn(hidden).half())

    def forward(self, x):
        linear = torch.ops.llmc.quant_linear
        h = linear(x, self.gate_up_q, self.gate_up_scale, self.gate_up_zero, None, None, 1e-6, "rms", "swiglu",
                   self.scheme, self.group)
        return linear(h, self.down_q, self.down_scale, self.down_zero, None, self.bias, 1e-6, "none", "none",
                      self.scheme, self.group)


def exported(scheme, group=32):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    x = torch.randn(2, 5, 64).half()
    program = torch.export.export(QuantizedMLP(scheme, group), (x,), dynamic_shapes=({0: batch, 1: seq},))
    return program.run_decompositions({}).module()


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_a_quantized_graph_is_planned(scheme):
    gm = exported(scheme)
    arch = "sm_90" if scheme == "fp8_w8a8" else "sm_80"
    specs = plan.kernel_specs(gm, arch)
    kernels = {"quant_linear_a16"} if quant.act_bits(scheme) == 16 else {"quant_linear_rows", "quant_linear_a8"}
    assert {spec.op for spec in specs} == kernels and set(launch.KERNELS["quant_linear"]) >= kernels
    gemms = [spec for spec in specs if spec.op != "quant_linear_rows"]
    assert len(gemms) == 4, "two calls (swiglu and not) x two shape classes"
    pointers = {kind for spec in specs for kind in spec.signature.values() if kind.startswith("*")}
    assert pointers <= {"*fp16", "*fp32", "*u8", "*i8"}, "fp8 tensors travel as bytes"


@pytest.mark.parametrize("arch", ["sm_80", "sm_86"])
def test_fp8_activations_are_refused_before_sm_89(arch):
    with pytest.raises(plan.PlanError, match=f"fp8_w8a8 needs FP8 tensor cores .* {arch} lacks; quantize with "
                                             "fp8_w8a16"):
        plan.kernel_specs(exported("fp8_w8a8"), arch)
    assert plan.kernel_specs(exported("fp8_w8a16"), arch)
    assert plan.kernel_specs(exported("fp8_w8a8"), "sm_89")


def recorded_specs(arch, calls):
    """The specs the launcher records for `calls` [(scheme, group, tokens, epilogue, config)] on meta tensors."""
    with launch.recording(arch) as recorder:
        for scheme, group, tokens, epilogue, config in calls:
            weight = quant.quantize_weight(torch.empty(192, 256, device="meta"), scheme, group)
            x = torch.empty(tokens, 256, dtype=torch.bfloat16, device="meta")
            launch_quant_linear(x, *weight, torch.empty(256, device="meta"), None, 1e-6, "rms", epilogue, scheme,
                                group, config=config)
    return recorder.specs


def assert_cubins(result, arch):
    for entry in result.kernels.values():
        cubin = entry.artifacts[arch].cubin
        assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == 190  # EM_CUDA
        # The SM read as LLVM does for either ELF ABI (CUDA 13's ptxas, in triton 3.9, moved it to bits 8..15).
        assert cubin_arch(cubin).removesuffix("a") == arch, "the cubin's SM"


@pytest.mark.slow
@pytest.mark.parametrize("arch,calls", [
    ("sm_80", [("fp8_w8a16", 0, 1, "swiglu", None), ("int4_w4a16", 128, 33, "none", None)]),
    ("sm_80", [("int8_w8a8", 0, 1, "swiglu", None), ("int4_w4a8", 64, 33, "none", Config(64, 64, 32, 4, 2))]),
    ("sm_90", [("fp8_w8a8", 0, 1, "none", None), ("fp8_w8a8", 0, 33, "swiglu", None)]),
], ids=["a16-sm_80", "int-a8-sm_80", "fp8-a8-sm_90"])
def test_kernels_cross_compile_to_cubins(arch, calls, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    specs = recorded_specs(arch, calls)
    result = compile_all(specs, [arch])
    assert len(result.kernels) == len({spec.key() for spec in specs}) >= len(calls)
    assert_cubins(result, arch)
