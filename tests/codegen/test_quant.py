"""llmc::quant_linear's reference and the weight formats: checked against float64 formulas written out here."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmc.codegen.ops  # noqa: F401
from llmc.codegen.ops import _normalize
from llmc.codegen.quant import (FP8, SCHEMES, act_bits, dequantize_weight, pack_int4, quantize_activations,
                                quantize_weight, unpack_int4)

quant_linear = torch.ops.llmc.quant_linear.default


def test_int4_packing_round_trips_and_puts_even_elements_low():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0] & 0xF, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 1])
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_rounding_error_is_at_most_half_a_step(scheme):
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3  # channels of different ranges
    w[3] = 0.0  # an all-zero channel quantizes to zeros, not NaN
    qw = quantize_weight(w, scheme, group_size=64)
    dq = dequantize_weight(*qw, scheme, 64)
    assert dq.shape == w.shape and torch.isfinite(dq).all() and (dq[3] == 0).all()
    err = (dq - w).abs()
    if scheme.startswith("fp8"):
        # e4m3 keeps 3 mantissa bits: nearest rounding errs by at most 2**-4 of the value (normal range), and by
        # half the smallest subnormal step (2**-10 of the scale) near zero.
        bound = torch.maximum(w.abs() * 2**-4, qw.scale[:, None] * 2**-10)
        assert (err <= bound * (1 + 1e-6)).all()
        assert qw.qweight.dtype == FP8 and qw.zero is None
    elif scheme.startswith("int8"):
        assert (err <= qw.scale[:, None] / 2 * (1 + 1e-5)).all()
        assert qw.qweight.dtype == torch.int8 and qw.qweight.abs().max() <= 127
    else:
        step = qw.scale.repeat_interleave(64, dim=1)
        assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
        assert qw.qweight.shape == (48, 128) and qw.scale.shape == qw.zero.shape == (48, 4)


def _reference64(x, qw, scheme, group, bias, norm, eps, in_scale):
    """The scheme's arithmetic in float64 from the dequantized weight (an independent formula for the a8 paths)."""
    h = _normalize(x, norm, eps).float()
    if in_scale is not None:
        h = h * in_scale
    w = dequantize_weight(*qw, scheme, group).double()
    if act_bits(scheme) == 16:
        return torch.nn.functional.linear(h.to(x.dtype), w.to(x.dtype), bias)
    hq, a_scale = quantize_activations(h, scheme)
    y = (hq.double() * a_scale.double()) @ w.T
    return (y + bias.double() if bias is not None else y).to(x.dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("norm", ["none", "rms", "layer"])
def test_op_matches_the_float64_formula(scheme, norm):
    n, k, group = 24, 128, 32
    w, x = torch.randn(n, k), torch.randn(2, 3, k) * 2
    bias = torch.randn(n)
    in_scale = torch.rand(k) + 0.5
    qw = quantize_weight(w, scheme, group)
    got = quant_linear(x, qw.qweight, qw.scale, qw.zero, in_scale, bias, 1e-6, norm, "none", scheme, group)
    want = _reference64(x, qw, scheme, group, bias, norm, 1e-6, in_scale)
    assert got.dtype == x.dtype and got.shape == (2, 3, n)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_op_is_close_to_the_unquantized_gemm(scheme):
    w, x = torch.randn(64, 256) / 16, torch.randn(7, 256)
    qw = quantize_weight(w, scheme, 128)
    got = quant_linear(x, qw.qweight, qw.scale, qw.zero, None, None, 0.0, "none", "none", scheme, 128)
    want = x @ w.T
    rel = (got - want).abs().mean() / want.abs().mean()
    # int4 with 16 levels per group of Gaussian weights errs by ~10% per weight, averaging down in the dot.
    assert rel < (0.12 if scheme.startswith("int4") else 0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["fp8_w8a16", "int4_w4a16", "int8_w8a8", "int8_w8a16"])
def test_half_precision_and_swiglu(scheme, dtype):
    w = torch.randn(2 * 40, 64)
    x = torch.randn(5, 64).to(dtype)
    qw = quantize_weight(w, scheme, 32)
    got = quant_linear(x, qw.qweight, qw.scale, qw.zero, None, None, 1e-5, "rms", "swiglu", scheme, 32)
    y = _reference64(x, qw, scheme, 32, None, "rms", 1e-5, None)
    gate, up = y.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert got.dtype == dtype and got.shape == (5, 40)
    torch.testing.assert_close(got, want, rtol=1e-3 if dtype == torch.float16 else 1.6e-2, atol=1e-3)


def test_in_scale_moves_outlier_channels_into_the_weight():
    """SmoothQuant's premise, through in_scale: activations with outlier channels quantize badly per token; W * s
    with h / s (s = sqrt(amax|h| / amax|W|) per channel) computes the same GEMM with far less int8 error."""
    w, x = torch.randn(32, 128), torch.randn(16, 128)
    x[:, :4] *= 60  # a few outlier channels, as in LLM activations
    want = x @ w.T
    plain = quantize_weight(w, "int8_w8a8")
    err_plain = quant_linear(x, plain.qweight, plain.scale, None, None, None, 0.0, "none", "none", "int8_w8a8", 0) - want
    s = (x.abs().amax(0) / w.abs().amax(0)).sqrt()
    smooth = quantize_weight(w * s, "int8_w8a8")
    err_smooth = quant_linear(x, smooth.qweight, smooth.scale, None, 1 / s, None, 0.0, "none", "none", "int8_w8a8", 0) - want
    assert err_smooth.abs().mean() < err_plain.abs().mean() / 2


def test_fake_shapes_and_meta_quantization():
    with torch.device("meta"):
        qw = quantize_weight(torch.empty(96, 256, dtype=torch.bfloat16), "int4_w4a16", 128)
    assert [tuple(t.shape) for t in qw] == [(96, 128), (96, 2), (96, 2)]
    with FakeTensorMode():
        x = torch.empty(2, 9, 256, dtype=torch.bfloat16)
        out = quant_linear(x, torch.empty(96, 128, dtype=torch.uint8), torch.empty(96, 2), torch.empty(96, 2, dtype=torch.uint8),
                           None, None, 1e-6, "rms", "swiglu", "int4_w4a16", 128)
    assert out.shape == (2, 9, 48) and out.dtype == torch.bfloat16


def test_bad_scheme_and_group_are_refused():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_weight(w, "int3")
    with pytest.raises(ValueError, match="group size 64 must be even and divide the 96"):
        quantize_weight(w, "int4_w4a16", 64)
