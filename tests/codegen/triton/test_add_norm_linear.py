import pytest
import torch

from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.launch import launch_add_norm_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# N = 50 / 40 spans two N tiles of 32 under the interpreter (only the first writes the sum); M = 37 spans two
# row tiles; M = 1 is a decode step.
CASES = [
    (1, 80, 50, "rms", "none", False),
    (37, 80, 50, "rms", "none", True),
    (37, 1000, 40, "rms", "swiglu", False),
    (37, 80, 40, "layer", "swiglu", True),
    (37, 80, 50, "none", "none", False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,norm,epilogue,bias", CASES)
def test_matches_reference(device, check_norm_linear, dtype, m, k, n, norm, epilogue, bias):
    rows = 2 * n if epilogue == "swiglu" else n
    x = torch.randn(m, k).to(dtype).to(device)
    residual = (torch.randn(m, k) * 2 + 0.3).to(dtype).to(device)
    weight = (torch.randn(rows, k) * k ** -0.5).to(dtype).to(device)
    bias_tensor = (0.1 * torch.randn(rows)).to(dtype).to(device) if bias else None
    total, out = launch_add_norm_linear(x, residual, weight, bias_tensor, 1e-6, norm, epilogue, poison=True)
    # The sum is rounded once to the input dtype, exactly as torch's add: equal bit for bit, NaN poison included.
    assert torch.equal(total, x + residual)
    check_norm_linear(out, x + residual, weight, bias_tensor, 1e-6, norm, epilogue)


def test_every_row_tile_writes_its_sum(device, check_norm_linear):
    # Tiles of 16 rows and 16 features: three row tiles x three N tiles; the sum must come from all row tiles.
    x, residual = torch.randn(2, 20, 48, device=device), torch.randn(2, 20, 48, device=device)
    weight = torch.randn(40, 48, device=device) * 0.2
    total, out = launch_add_norm_linear(x, residual, weight, None, 1e-6, "rms", "none",
                                        config=Config(16, 16, 16, 1, 1), poison=True)
    assert total.shape == (2, 20, 48) and out.shape == (2, 20, 40)
    assert torch.equal(total, x + residual)
    check_norm_linear(out.reshape(40, 40), (x + residual).reshape(40, 48), weight, None, 1e-6, "rms", "none")


def test_mismatched_residual_is_refused():
    with pytest.raises(ValueError, match="residual"):
        launch_add_norm_linear(torch.randn(3, 80), torch.randn(3, 81), torch.randn(50, 80), None, 1e-6, "rms", "none")
