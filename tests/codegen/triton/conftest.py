"""Triton kernel tests run under the CPU interpreter (TRITON_INTERPRET=1) on a host without CUDA; tests take a
`device` fixture whose "cuda" variant is marked gpu.

Triton reads TRITON_INTERPRET when @triton.jit decorates a function, including its own standard library
(tl.sum, tl.cdiv, ...) when triton.language is first imported, so one process is either interpreted or
compiled, never both. The variable is therefore set here, before anything in this process imports
triton.language, to 1 without CUDA and to 0 with it, unless the caller set it: on a GPU host
`pytest tests/codegen/triton` runs the compiled kernels on the GPU and `TRITON_INTERPRET=1 pytest ...` the
interpreter on CPU tensors; the other device's variants skip.

Triton 3.6's interpreter stores bfloat16 as raw uint16 and gets two things wrong that a GPU does right:
fp32 -> bf16 casts truncate instead of rounding to nearest even, and tl.dot multiplies the uint16 bit patterns.
Both are patched below for this test process only (a correct cast through torch; a dot on the exact float32
widening of bf16, which is what bf16 tensor cores compute), so the interpreted kernel is the source a GPU runs,
judged with the arithmetic a GPU does. A third patch lets a loop bound be a runtime scalar (the attention
kernels' `range(start, past, BLOCK)`): the interpreter holds scalars as one-element arrays and converts them
with int(array), which NumPy 2 refuses for arrays of one dimension; .item() is the conversion it meant.
"""
import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

_truncating_convert = interpreter._convert_float
_raw_dot = interpreter.InterpreterBuilder.create_dot


def _convert_float_rounding_to_nearest(data, input_dtype, output_dtype, rounding_mode):
    if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode is None:
        as_bf16 = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.bfloat16)
        return as_bf16.view(torch.int16).numpy().view(np.uint16)
    return _truncating_convert(data, input_dtype, output_dtype, rounding_mode)


def _dot_widening_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
    if a.dtype.scalar == tl.bfloat16:
        a = interpreter.TensorHandle(_truncating_convert(a.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                     tl.float32)
        b = interpreter.TensorHandle(_truncating_convert(b.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                     tl.float32)
    return _raw_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor_with_scalar_index(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


interpreter._convert_float = _convert_float_rounding_to_nearest
interpreter.InterpreterBuilder.create_dot = _dot_widening_bf16
interpreter._patch_lang_tensor = _patch_lang_tensor_with_scalar_index

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="session")
def kernel_cache(tmp_path_factory):
    """Rendered kernels go to a temporary cache, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMC_CACHE", str(tmp_path_factory.mktemp("llmc-cache")))
        yield


INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """cpu: the interpreter; cuda (marked gpu): compiled kernels on the GPU. Each needs its kind of process."""
    if request.param == "cuda" and (INTERPRETED or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and a process without TRITON_INTERPRET=1")
    if request.param == "cpu" and not INTERPRETED:
        pytest.skip("CPU tensors need the interpreter: run with TRITON_INTERPRET=1")
    return torch.device(request.param)


# ---- The GEMM ops' expected results ----------------------------------------------------------------------------
# The reference rounds normalize(x) to the input dtype before its GEMM; the kernel scales the float32 accumulator
# instead (the point of the fusion), so in 16-bit dtypes the two differ by that rounding, about u/sqrt(3) of the
# output's scale per element (u = 2^-11 fp16, 2^-8 bf16) and more after swiglu's product. The tests therefore
# judge a 16-bit kernel twice: against `kernel_arithmetic` (the reference's math in the kernel's order, same
# rounding points) at the DESIGN tolerance, and against the reference through `exact_norm_linear`: its error
# from the float64 result must be no larger than the reference's own.

def kernel_arithmetic(x, weight, bias, eps, norm, epilogue):
    x32, w32 = x.float(), weight.float()
    y = x32 @ w32.T
    if norm == "rms":
        y = y * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        mean = x32.mean(-1, keepdim=True)
        y = (y - mean * w32.sum(-1)) * torch.rsqrt(x32.var(-1, keepdim=True, unbiased=False) + eps)
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if epilogue == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up  # in x's dtype: the reference's roundings
    return y


def exact_norm_linear(x, weight, bias, eps, norm, epilogue):
    h = x.double()
    if norm == "rms":
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + eps)
    y = h @ weight.double().T + (bias.double() if bias is not None else 0)
    if epilogue == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y


GEMM_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.fixture
def check_norm_linear():
    """check(out, x, weight, bias, eps, norm, epilogue): out judged as the block above explains."""

    def check(out, x, weight, bias, eps, norm, epilogue):
        from llmc.codegen import ops

        x, weight = x.cpu(), weight.cpu()
        bias = bias.cpu() if bias is not None else None
        out = out.cpu()
        rtol, atol = GEMM_TOLERANCE[x.dtype]
        reference = ops.norm_linear(x, weight, bias, eps, norm, epilogue)
        assert out.shape == reference.shape and out.dtype == reference.dtype
        if x.dtype == torch.float32 or norm == "none":
            torch.testing.assert_close(out, reference, rtol=rtol, atol=atol)
            return
        torch.testing.assert_close(out, kernel_arithmetic(x, weight, bias, eps, norm, epilogue), rtol=rtol, atol=atol)

    return check


@pytest.fixture
def rms_errors():
    return _rms_errors


def _rms_errors(out, x, weight, bias, eps, norm, epilogue) -> tuple[float, float]:
    """(kernel's, reference's) RMS error against a float64 computation. Only meaningful over many outputs: on a
    few dozen the two differ by sampling noise alone (test_norm_linear's accuracy test uses ~16K)."""
    from llmc.codegen import ops

    x, weight, out = x.cpu(), weight.cpu(), out.cpu()
    bias = bias.cpu() if bias is not None else None
    exact = exact_norm_linear(x, weight, bias, eps, norm, epilogue)
    reference = ops.norm_linear(x, weight, bias, eps, norm, epilogue)
    return ((out.double() - exact).pow(2).mean().sqrt().item(),
            (reference.double() - exact).pow(2).mean().sqrt().item())
