import pytest
import torch

from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.launch import launch_norm_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens M, in features K, out features N, norm, epilogue, bias). Under the interpreter the tiles are 16 or 32
# wide: M = 1 takes the decode tile, M = 37 spans two prefill row tiles, N = 50 / 40 and K = 80 / 1000 are no
# multiple of 32, so every mask is exercised.
CASES = [
    (1, 80, 50, "none", "none", True),
    (37, 80, 50, "rms", "none", False),
    (37, 1000, 50, "rms", "none", True),
    (1, 80, 50, "layer", "none", True),
    (37, 1000, 40, "layer", "none", False),
    (37, 80, 40, "none", "swiglu", False),
    (1, 80, 40, "rms", "swiglu", True),
    (37, 1000, 40, "rms", "swiglu", False),
    (37, 80, 40, "layer", "swiglu", True),
]


def random_problem(m, k, n, epilogue, bias, dtype, device):
    rows = 2 * n if epilogue == "swiglu" else n
    x = (torch.randn(m, k) * 2 + 0.3).to(dtype).to(device)  # an offset, so layer norm's mean matters
    weight = (torch.randn(rows, k) * k ** -0.5).to(dtype).to(device)
    bias_tensor = (0.1 * torch.randn(rows)).to(dtype).to(device) if bias else None
    return x, weight, bias_tensor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,norm,epilogue,bias", CASES)
def test_matches_reference(device, check_norm_linear, dtype, m, k, n, norm, epilogue, bias):
    x, weight, bias_tensor = random_problem(m, k, n, epilogue, bias, dtype, device)
    out = launch_norm_linear(x, weight, bias_tensor, 1e-6, norm, epilogue, poison=True)
    check_norm_linear(out, x, weight, bias_tensor, 1e-6, norm, epilogue)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm,epilogue", [("rms", "none"), ("rms", "swiglu"), ("layer", "swiglu")])
def test_fused_norm_is_at_least_as_accurate_as_the_reference(device, rms_errors, dtype, norm, epilogue):
    """The kernel scales the float32 accumulator by the row statistic instead of rounding the normalised x to 16
    bits first, so against float64 it must do no worse than the unfused reference. Judged over 64 x 256 outputs,
    where sampling noise in the RMS error is under 1%; measured ratios are 0.7-0.95."""
    x, weight, bias = random_problem(64, 1000, 256, epilogue, False, dtype, device)
    out = launch_norm_linear(x, weight, bias, 1e-6, norm, epilogue, poison=True)
    kernel_error, reference_error = rms_errors(out, x, weight, bias, 1e-6, norm, epilogue)
    assert kernel_error <= reference_error, f"kernel rms error {kernel_error:.3g} > reference's {reference_error:.3g}"


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_batched_and_strided_input(device, check_norm_linear, norm):
    # x [2, 5, 80] sliced from a wider buffer: rows of stride 96 reach the kernel without a copy.
    wide = torch.randn(2, 5, 96, device=device)
    x = wide[..., 8:88]
    _, weight, bias = random_problem(1, 80, 50, "none", True, torch.float32, device)
    out = launch_norm_linear(x, weight, bias, 1e-5, norm, "none", poison=True)
    assert out.shape == (2, 5, 50)
    check_norm_linear(out.reshape(10, 50), x.reshape(10, 80), weight, bias, 1e-5, norm, "none")


def test_block_config_is_honoured(device, check_norm_linear):
    # Tiles of 16 x 16 x 16: three row tiles, three N tiles (the last one partial) and five K steps.
    x, weight, bias = random_problem(37, 80, 40, "swiglu", True, torch.float32, device)
    out = launch_norm_linear(x, weight, bias, 1e-6, "rms", "swiglu", config=Config(16, 16, 16, 1, 1), poison=True)
    check_norm_linear(out, x, weight, bias, 1e-6, "rms", "swiglu")


@pytest.mark.parametrize("kwargs,message", [
    (dict(norm="batch"), "norm 'batch'"),
    (dict(epilogue="gelu"), "epilogue 'gelu'"),
    (dict(weight=torch.randn(50, 79)), "must be \\[N, 80\\]"),
    (dict(weight=torch.randn(51, 80), epilogue="swiglu"), "even number of weight rows"),
    (dict(bias=torch.randn(49)), "bias \\(49,\\)"),
])
def test_bad_arguments_are_refused(kwargs, message):
    arguments = dict(x=torch.randn(3, 80), weight=torch.randn(50, 80), bias=None, eps=1e-6, norm="rms",
                     epilogue="none") | kwargs
    with pytest.raises(ValueError, match=message):
        launch_norm_linear(**arguments)
