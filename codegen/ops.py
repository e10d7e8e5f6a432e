"""The llmc:: custom ops: each declared once with torch.library, with a reference implementation in plain torch
(the definition of correct, and what runs on CPU) and a fake implementation for tracing and export.

Importing this module registers the ops; afterwards they are callable as `torch.ops.llmc.<name>.default`, stay
single nodes through torch.export and run_decompositions, and every lowering (Triton, ONNX, TensorRT) is tested
against the reference here.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("llmc::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, exactly as models/transformer.py's RMSNorm and transformers' Qwen3RMSNorm /
    LlamaRMSNorm compute it: statistics and scaling in float32, cast back to x's dtype, then `weight * h`.

    The result dtype is torch's promotion of weight's and x's dtypes (bf16 weight and bf16 x give bf16; an
    fp32 weight with a bf16 x gives fp32), as in the models.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@rms_norm.register_fake
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = torch.broadcast_shapes(weight.shape, x.shape)
    return x.new_empty(shape, dtype=torch.promote_types(weight.dtype, x.dtype))
