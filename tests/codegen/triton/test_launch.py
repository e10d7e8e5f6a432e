import pytest
import torch

import llmc.codegen.ops as ops
from llmc.codegen.triton.launch import LAUNCHERS, current_arch, example_inputs, register_cuda_impls

SHAPES = {"rms_norm": {"m": 3, "n": 80}, "add_rms_norm": {"m": 3, "n": 80},
          "norm_linear": {"m": 3, "n": 40, "k": 80}, "add_norm_linear": {"m": 3, "n": 40, "k": 80},
          "rope": {"m": 3, "n": 2, "k": 8}, "rope_write_kv": {"m": 3, "n": 2, "k": 8},
          "causal_attention": {"b": 2, "s": 5, "h": 4, "kv": 2, "d": 16, "window": 3},
          "paged_attention": {"b": 2, "s": 3, "h": 4, "kv": 2, "d": 16, "past": 6, "bs": 4},
          "sparse_paged_attention": {"b": 2, "s": 3, "h": 4, "kv": 2, "d": 16, "past": 6, "bs": 4, "keep": 0.5,
                                     "block": 4},
          "quant_linear": {"m": 3, "n": 40, "k": 128}}


def test_interpreter_arch_under_triton_interpret():
    assert current_arch(torch.device("cpu")) == "interpret"


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        current_arch(torch.device("cpu"))


@pytest.mark.parametrize("op", list(LAUNCHERS))
def test_launchers_take_the_ops_arguments(op):
    # example_inputs is in schema order: the same arguments run the reference and the kernel.
    inputs = example_inputs(op, SHAPES[op], torch.float32, "cpu", epilogue="swiglu" if "linear" in op else "none")
    expected = getattr(torch.ops.llmc, op).default(*inputs)
    actual = LAUNCHERS[op](*inputs, poison=True)
    for got, want in zip(actual if isinstance(actual, tuple) else (actual,),
                         expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_register_cuda_impls_is_idempotent_and_keeps_cpu_on_the_reference():
    register_cuda_impls()
    register_cuda_impls()
    for op in LAUNCHERS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"llmc::{op}", "CUDA")
    x, weight = torch.randn(4, 80), torch.randn(80)
    assert torch.equal(torch.ops.llmc.rms_norm(x, weight, 1e-6), ops.rms_norm(x, weight, 1e-6))


@pytest.mark.gpu
def test_graph_ops_run_triton_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("the CUDA dispatch needs a GPU")
    register_cuda_impls()
    inputs = example_inputs("norm_linear", {"m": 5, "n": 64, "k": 128}, torch.bfloat16, "cuda", norm="rms")
    out = torch.ops.llmc.norm_linear(*inputs)
    cpu_inputs = [t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs]
    torch.testing.assert_close(out.cpu(), torch.ops.llmc.norm_linear(*cpu_inputs), rtol=1.6e-2, atol=1.6e-2)
