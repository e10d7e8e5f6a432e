import pytest
import torch

import llmc.codegen.ops as ops
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.launch import launch_add_rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 80), (1, 1000), (2, 3, 80)])
def test_matches_reference(device, dtype, shape):
    x = torch.randn(shape).to(dtype).to(device)
    residual = (torch.randn(shape) * 3 + 0.5).to(dtype).to(device)
    weight = (1 + 0.3 * torch.randn(shape[-1])).to(dtype).to(device)
    total, out = launch_add_rms_norm(x, residual, weight, 1e-6, poison=True)
    expected_total, expected = ops.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, expected_total)  # one rounding of the fp32 sum, as torch's add
    torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


def test_chunked_rows_with_strided_inputs(device):
    # Rows of 1000 in chunks of 256; x and residual are column slices of wider buffers with different strides.
    x = torch.randn(6, 1010, device=device)[:, 5:1005]
    residual = torch.randn(6, 1200, device=device)[:, 100:1100]
    weight = torch.randn(1000, device=device)
    total, out = launch_add_rms_norm(x, residual, weight, 1e-5, config=Config(block_n=256, num_warps=4), poison=True)
    expected_total, expected = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(out, expected, rtol=1.3e-6, atol=1e-5)


def test_mismatched_residual_is_refused():
    with pytest.raises(ValueError, match="residual"):
        launch_add_rms_norm(torch.randn(3, 80), torch.randn(3, 80, dtype=torch.float16), torch.randn(80), 1e-6)
