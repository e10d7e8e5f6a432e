"""Lowers a cpu bundle's ops to their CPU kernels: each call becomes its `_cpu` twin with the same arguments
(the same schema and meaning): `llmc.paged_attention` -> `paged_attention_cpu` (codegen/cpu/attention.py: batched
decode and chunked prefill without the reference's dense mask, concatenation and CPU SDPA); `norm_linear`,
`add_norm_linear` in bf16 -> their `_cpu` ops (codegen/cpu/linear.py: oneDNN with prepacked weights), and so
does a bf16 `aten.linear` of a stored weight (the projections no norm precedes), as norm_linear with no norm;
`quant_linear` of a scheme ATen has a packed CPU kernel for (int4_w4a16 with group 32..256, int8_w8a16, in fp32 or
bf16) -> `quant_linear_cpu`; `rope`, `rope_write_kv` -> their `_cpu` ops (codegen/cpu/rope.py: the step's cos / sin
rows and cache coordinates computed once, not once per layer; bit-identical results).

Matches: every call of those ops, whatever feeds it.
Assumes: the compile's target is a CPU (`not ctx.target.is_gpu`); on a GPU target, or with no target (the
target-independent pass tests), it rewrites nothing: GPU bundles run the reference's Triton lowering, which
codegen/triton registers for llmc.paged_attention. The new op runs wherever the graph runs (it is plain torch),
so a bundle stays exportable and --check-passes compares it with the reference it replaced.
Skips: the ONNX / TensorRT backends (compiler/api.py drops this pass there: onnx_ops translates the reference op
only) and llmc.sparse_paged_attention (its selection has no CPU kernel yet).
Runs: last, in the lower phase, after every fusion and quantization pass (nothing after it matches attention).
Counts: one per lowered call (an L-layer model: L attentions, and its GEMMs), per graph.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc, llmc.paged_attention_cpu among them)

from llmc.codegen.cpu import linear, rope

from .graph_weights import finish_node, is_weight, val
from .pattern import PassContext

aten, llmc = torch.ops.aten, torch.ops.llmc
LOWERINGS = {llmc.paged_attention.default: llmc.paged_attention_cpu.default, **linear.LOWERINGS, **rope.LOWERINGS}


def _plain_bf16_linear(node) -> bool:
    """aten.linear(x, stored weight[, stored bias]) in bf16: the GEMMs with nothing fused around them."""
    if node.target is not aten.linear.default or node.kwargs:
        return False
    x, weight = val(node.args[0]), node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    return (x is not None and x.dtype == torch.bfloat16 and is_weight(weight)
            and (bias is None or is_weight(bias)))


def _lowering(node) -> tuple | None:
    """(target, args, kwargs) of node's CPU lowering, or None where it keeps its op."""
    if node.op != "call_function":
        return None
    if _plain_bf16_linear(node):
        x, weight, bias = (*node.args, None)[:3]
        return llmc.norm_linear_cpu.default, (x, weight, bias, 0.0, "none", "none"), {}
    if node.target not in LOWERINGS:
        return None
    x = val(node.args[0])
    if node.target is llmc.quant_linear.default:
        scheme, group_size = node.args[9], node.args[10]
        if x is None or not linear.has_kernel(scheme, group_size, x.dtype):
            return None
    elif node.target in linear.LOWERINGS and (x is None or x.dtype != torch.bfloat16):
        return None  # float32 / float16: the CPU op would run the reference's F.linear, so the graph keeps it
    return LOWERINGS[node.target], node.args, node.kwargs


def run(gm: GraphModule, ctx: PassContext) -> int:
    if ctx.target is None or ctx.target.is_gpu:
        return 0
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        lowering = _lowering(node)  # read now: earlier rewrites may have replaced this node's inputs
        if lowering is None:
            continue
        target, args, kwargs = lowering
        with graph.inserting_before(node):
            lowered = graph.call_function(target, args, kwargs)
        finish_node(gm, lowered, node, "lower_cpu")
        node.replace_all_uses_with(lowered)
        graph.erase_node(node)
        count += 1
    return count
