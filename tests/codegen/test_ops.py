import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)
from llmc.models.transformer import RMSNorm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output vs an exact float64 computation: only the final rounding to the output dtype separates them.
TOLERANCE = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def rms_norm_float64(x, weight, eps):
    h = x.double()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 80), (2, 5, 1000), (7, 4, 3, 80)])
def test_rms_norm_matches_float64(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    weight = torch.randn(shape[-1], dtype=dtype)
    eps = 1e-5
    out = torch.ops.llmc.rms_norm.default(x, weight, eps)
    assert out.shape == x.shape and out.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), rms_norm_float64(x, weight, eps), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_the_models_rmsnorm_bit_for_bit(dtype):
    norm = RMSNorm(80, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(80))
    x = torch.randn(4, 6, 80, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(torch.ops.llmc.rms_norm(x, norm.weight, 1e-6), norm(x))


def test_eps_is_used():
    x = torch.randn(4, 80) * 1e-3  # small enough that eps dominates the mean square
    weight = torch.randn(80)
    a = torch.ops.llmc.rms_norm(x, weight, 1e-6)
    b = torch.ops.llmc.rms_norm(x, weight, 1e-2)
    torch.testing.assert_close(b.double(), rms_norm_float64(x, weight, 1e-2))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.float32),
])
def test_result_dtype_follows_promotion(x_dtype, w_dtype, out_dtype):
    x, weight = torch.randn(3, 80, dtype=x_dtype), torch.randn(80, dtype=w_dtype)
    out = torch.ops.llmc.rms_norm(x, weight, 1e-6)
    assert out.dtype == out_dtype
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x_dtype)
    assert torch.equal(out, expected)
    with FakeTensorMode() as mode:
        fake = torch.ops.llmc.rms_norm(mode.from_tensor(x), mode.from_tensor(weight), 1e-6)
    assert fake.dtype == out_dtype and fake.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_impl_shape_and_dtype(dtype):
    with FakeTensorMode():
        x = torch.empty(2, 9, 1000, dtype=dtype)
        out = torch.ops.llmc.rms_norm.default(x, torch.empty(1000, dtype=dtype), 1e-6)
    assert out.shape == (2, 9, 1000) and out.dtype == dtype
    assert out.device == x.device


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x, weight = torch.randn(3, 5, 80, dtype=dtype), torch.randn(80, dtype=dtype)
    torch.library.opcheck(torch.ops.llmc.rms_norm.default, (x, weight, 1e-6))


class Normed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(80))

    def forward(self, x):
        return torch.ops.llmc.rms_norm(x * 2, self.weight, 1e-5) + 1


def test_export_round_trip_with_dynamic_dims():
    model = Normed()
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(2, 3, 80),), dynamic_shapes=dims).run_decompositions({})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.llmc.rms_norm.default) == 1
    x = torch.randn(4, 7, 80)  # other sizes than the export's: the dims stayed dynamic
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(ep.module()(x), expected)
        # And once more through export, from the exported module itself.
        again = torch.export.export(ep.module(), (torch.randn(2, 3, 80),), dynamic_shapes=dims)
        assert torch.equal(again.module()(x), expected)
