"""Fuses a residual add with the RMSNorm that reads it: `llmc.rms_norm(a + b, w, eps)` -> `llmc.add_rms_norm`.

Matches: `s = aten.add(a, b); n = llmc.rms_norm(s, w, eps)` with a, b and w of one dtype, any eps. The op's first
output replaces s for its other users (the residual stream the next layer adds to); when the norm is s's only
user (the final norm of a decoder reads the last add) the add is fused all the same: one pass over the row
instead of two, and fuse_norm_linear can then take the add into the GEMM.
Assumes: every norm is already an `llmc.rms_norm` node (fuse_rms_norm ran); a and b have the same shape (the
residual stream); the op's reference computes the sum in the inputs' dtype as the unfused add did, so the
rewrite is exact.
Runs: after fuse_rms_norm and merge_projections, before fuse_norm_linear (which turns an add_rms_norm feeding
linears into add_norm_linear). One rewrite per fused add.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)

from .graph_weights import same_shape
from .pattern import Match, PassContext, Pattern, replace_all

EPS = 3.14159e-3  # sentinel: traced in eps's place


def add_then_rms_norm(x, residual, weight, eps=EPS):
    s = x + residual
    return s, torch.ops.llmc.rms_norm(s, weight, eps)


def _same_shapes(match: Match) -> bool:
    return same_shape(match.val("x"), match.val("residual"))


PATTERN = Pattern(
    "add_rms_norm",
    variants=[add_then_rms_norm],
    example_inputs=lambda dtype: (torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype),
                                  torch.randn(8, dtype=dtype)),
    scalars={"eps": EPS},
    extra_check=_same_shapes,
)


def _fused(match: Match) -> tuple[Node, Node]:
    graph = match.graph
    fused = graph.call_function(torch.ops.llmc.add_rms_norm.default, (
        match.inputs["x"], match.inputs["residual"], match.inputs["weight"], match.scalars["eps"]))
    return graph.call_function(operator.getitem, (fused, 0)), graph.call_function(operator.getitem, (fused, 1))


def run(gm: GraphModule, ctx: PassContext) -> int:
    return replace_all(gm, PATTERN, _fused)
