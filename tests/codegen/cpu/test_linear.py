"""The CPU GEMM lowerings (codegen/cpu/linear.py) against their references on fresh random inputs, odd shapes, fp32
and bf16, DESIGN.md's tolerances; the packed int4 weight holds exactly the levels the quantizer chose; the engine's
direct calls (codegen/cpu/direct.py) run the very functions torch.library would."""
import pytest
import torch

from llmc.codegen import ops, quant
from llmc.codegen.cpu import direct, linear

llmc = torch.ops.llmc
# Same weights, another summation order (oneDNN / ATen's packed kernels against F.linear / the dequantized GEMM).
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
SHAPES = [(1, 1, 64, 96), (3, 5, 160, 200), (2, 7, 96, 64)]  # batch, seq, K, N (odd M = batch * seq)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().mean() / want.float().abs().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq,k,n", SHAPES)
@pytest.mark.parametrize("norm,epilogue,bias", [("none", "none", False), ("rms", "swiglu", False),
                                                ("layer", "none", True)])
def test_norm_linear_cpu_matches_the_reference(dtype, batch, seq, k, n, norm, epilogue, bias):
    x = torch.randn(batch, seq, k).to(dtype)
    residual = torch.randn(batch, seq, k).to(dtype)
    weight = (torch.randn(2 * n, k) / k ** 0.5).to(dtype)
    b = torch.randn(2 * n).to(dtype) if bias else None
    want = llmc.norm_linear(x, weight, b, 1e-6, norm, epilogue)
    got = llmc.norm_linear_cpu(x, weight, b, 1e-6, norm, epilogue)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    s_want, y_want = llmc.add_norm_linear(x, residual, weight, b, 1e-6, norm, epilogue)
    s_got, y_got = llmc.add_norm_linear_cpu(x, residual, weight, b, 1e-6, norm, epilogue)
    assert torch.equal(s_got, s_want)
    torch.testing.assert_close(y_got, y_want, **TOLERANCE[dtype])
    # A second call reuses the packed weight; a new weight of the same shape is packed anew, not confused with it.
    other = (torch.randn(2 * n, k) / k ** 0.5).to(dtype)
    torch.testing.assert_close(llmc.norm_linear_cpu(x, other, b, 1e-6, norm, epilogue),
                               llmc.norm_linear(x, other, b, 1e-6, norm, epilogue), **TOLERANCE[dtype])


def quantized(n: int, k: int, scheme: str, group_size: int):
    return quant.quantize_weight(torch.randn(n, k) / k ** 0.5, scheme, group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,group_size", [("int4_w4a16", 32), ("int4_w4a16", 64), ("int4_w4a16", 256),
                                               ("int8_w8a16", 0)])
@pytest.mark.parametrize("norm,epilogue,bias,in_scale", [("none", "none", False, False),
                                                         ("rms", "swiglu", True, True)])
def test_quant_linear_cpu_matches_the_reference(dtype, scheme, group_size, norm, epilogue, bias, in_scale):
    batch, seq, k, n = 2, 3, 512, 72
    x = torch.randn(batch, seq, k).to(dtype)
    qw = quantized(2 * n, k, scheme, group_size)
    b = torch.randn(2 * n).to(dtype) if bias else None
    s = torch.rand(k) + 0.5 if in_scale else None
    args = (x, qw.qweight, qw.scale, qw.zero, s, b, 1e-6, norm, epilogue, scheme, group_size)
    assert linear.has_kernel(scheme, group_size, dtype)
    want, got = llmc.quant_linear(*args), llmc.quant_linear_cpu(*args)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    else:  # the kernel's scales round to bf16 once, the reference's weights once: both within bf16's rounding
        assert relative_error(got, want) < 1.6e-2


def test_packed_int4_holds_exactly_the_quantizers_levels():
    """Through the kernel with float32 activations (exact products): the identity times the packed weight, with
    scale 1 and the zero term 8 - zero, is the quantizer's q - zero, level for level, and so with its scales
    is exactly dequantize_weight."""
    n, k, group_size = 96, 256, 32
    qw = quantized(n, k, "int4_w4a16", group_size)
    packed, scale_zero = linear.int4_packed(qw.qweight, torch.ones_like(qw.scale), qw.zero, torch.float32)
    levels = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, group_size, scale_zero).T
    want = quant.unpack_int4(qw.qweight).float() - qw.zero.float().repeat_interleave(group_size, dim=1)
    assert torch.equal(levels, want)
    packed, scale_zero = linear.int4_packed(qw.qweight, qw.scale, qw.zero, torch.float32)
    weight = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, group_size, scale_zero).T
    torch.testing.assert_close(weight, quant.dequantize_weight(qw.qweight, qw.scale, qw.zero, "int4_w4a16",
                                                               group_size), rtol=1.3e-6, atol=1e-7)


def test_schemes_without_a_cpu_kernel_run_the_reference():
    x = torch.randn(2, 128)
    for scheme, group_size in (("int8_w8a8", 0), ("int4_w4a16", 16), ("fp8_w8a16", 0)):
        assert not linear.has_kernel(scheme, group_size, torch.float32)
        qw = quantized(8, 128, scheme, group_size or 128)
        args = (x, qw.qweight, qw.scale, qw.zero, None, None, 1e-6, "none", "none", scheme, group_size or 128)
        assert torch.equal(llmc.quant_linear_cpu(*args), llmc.quant_linear(*args))
    assert not linear.has_kernel("int4_w4a16", 32, torch.float16)


def test_direct_calls_run_the_functions_torch_library_runs():
    assert direct.cpu_function(llmc.norm_linear_cpu.default) is linear.norm_linear_cpu._init_fn
    assert direct.cpu_function(llmc.rms_norm.default) is ops.rms_norm._init_fn
    assert direct.cpu_function(torch.ops.aten.mm.default) is None
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    y = graph.call_function(llmc.norm_linear_cpu.default, (x, w, None, 1e-6, "rms", "none"))
    graph.output(graph.call_function(torch.ops.aten.relu.default, (y,)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    inputs = (torch.randn(3, 32), torch.randn(16, 32))
    want = gm(*inputs)
    assert direct.call_directly(gm) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [linear.norm_linear_cpu._init_fn,
                                                                              torch.ops.aten.relu.default]
    assert torch.equal(gm(*inputs), want)
