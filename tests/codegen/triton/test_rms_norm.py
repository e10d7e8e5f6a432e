import pytest
import torch

import llmc.codegen.ops as ops
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.launch import launch_rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel and reference share every rounding step; only the square sum's order and the sqrt differ.
TOLERANCE = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 80), (1, 1000), (2, 3, 80)])
def test_matches_reference(device, dtype, shape):
    x = (torch.randn(shape) * 3 + 0.5).to(dtype).to(device)
    weight = (1 + 0.3 * torch.randn(shape[-1])).to(dtype).to(device)
    out = launch_rms_norm(x, weight, 1e-6, poison=True)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, ops.rms_norm(x, weight, 1e-6), rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_streamed_in_chunks(device, dtype):
    # 1000 in chunks of 256: three full chunks and a masked tail, both passes.
    x = torch.randn(5, 1000).to(dtype).to(device)
    weight = torch.randn(1000).to(dtype).to(device)
    out = launch_rms_norm(x, weight, 1e-5, config=Config(block_n=256, num_warps=4), poison=True)
    torch.testing.assert_close(out, ops.rms_norm(x, weight, 1e-5), rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


def test_weight_dtype_promotes_and_strided_rows(device):
    # bf16 rows sliced out of a wider tensor (row stride 100) with an fp32 weight: fp32 result, as the models do.
    wide = torch.randn(7, 100).to(torch.bfloat16).to(device)
    x = wide[:, 10:90]
    weight = torch.randn(80, device=device)
    out = launch_rms_norm(x, weight, 1e-6, poison=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ops.rms_norm(x, weight, 1e-6), rtol=1.3e-6, atol=1e-5)


def test_eps_reaches_the_kernel(device):
    x = (torch.randn(4, 80) * 1e-3).to(device)  # small enough that eps dominates the mean square
    weight = torch.randn(80, device=device)
    out = launch_rms_norm(x, weight, 1e-2)
    torch.testing.assert_close(out, ops.rms_norm(x, weight, 1e-2), rtol=1.3e-6, atol=1e-5)
    assert not torch.allclose(out, ops.rms_norm(x, weight, 1e-6))


def test_wrong_weight_shape_is_refused():
    with pytest.raises(ValueError, match="expected \\(80,\\)"):
        launch_rms_norm(torch.randn(3, 80), torch.randn(40), 1e-6)
