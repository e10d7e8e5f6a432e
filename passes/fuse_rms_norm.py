"""Rewrites every RMSNorm subgraph into one `llmc::rms_norm(x, weight, eps)` call.

Matches: the aten form of models/transformer.py's RMSNorm and of transformers' Qwen3RMSNorm / LlamaRMSNorm,
`weight * (x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)`, with the weight on
either side of the last multiply; in float32 the two casts are absent from the graph. Any eps is captured.
Assumes: weight is one-dimensional with x's last size (a per-channel scale, which the kernels rely on), and
weight and x share a dtype (float32, float16 or bfloat16), as in every model we load.
Runs: after strip_asserts (export's `_assert_tensor_metadata` on the normalized value is an extra user that
blocks the match) and before the passes that fuse the norm with its neighbours (norm + linear, add + norm),
which match `llmc::rms_norm` nodes.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)

from .pattern import Match, PassContext, Pattern, replace_all

EPS = 3.14159e-3  # sentinel: traced in eps's place, never a literal of the pattern itself


def rms_norm_weight_first(x, weight, eps=EPS):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_weight_last(x, weight, eps=EPS):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype) * weight


def _per_channel_weight(match: Match) -> bool:
    x, weight = match.val("x"), match.val("weight")
    return weight.dim() == 1 and x.dim() >= 1 and statically_known_true(x.shape[-1] == weight.shape[0])


PATTERN = Pattern(
    "rms_norm",
    variants=[rms_norm_weight_first, rms_norm_weight_last],
    example_inputs=lambda dtype: (torch.randn(3, 8, dtype=dtype), torch.randn(8, dtype=dtype)),
    scalars={"eps": EPS},
    extra_check=_per_channel_weight,
)


def _fused(match: Match) -> torch.fx.Node:
    return match.graph.call_function(
        torch.ops.llmc.rms_norm.default, (match.inputs["x"], match.inputs["weight"], match.scalars["eps"]))


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    return replace_all(gm, PATTERN, _fused)
