"""Lowers the paged attention of a cpu bundle to its CPU kernel: every `llmc.paged_attention` call becomes
`llmc.paged_attention_cpu` with the same arguments (codegen/cpu/attention.py: the same schema and meaning, batched
decode and chunked prefill without the reference's dense mask, concatenation and CPU SDPA).

Matches: every `llmc.paged_attention.default` node, whatever feeds it (block_attention's paged step, with or
without fuse_kv_write before it).
Assumes: the compile's target is a CPU (`not ctx.target.is_gpu`); on a GPU target, or with no target (the
target-independent pass tests), it rewrites nothing: GPU bundles run the reference's Triton lowering, which
codegen/triton registers for llmc.paged_attention. The new op runs wherever the graph runs (it is plain torch),
so a bundle stays exportable and --check-passes compares it with the reference it replaced.
Skips: the ONNX / TensorRT backends (compiler/api.py drops this pass there: onnx_ops translates the reference op
only) and llmc.sparse_paged_attention (its selection has no CPU kernel yet).
Runs: last, in the lower phase, after every fusion and quantization pass (nothing after it matches attention).
Counts: one per lowered attention: L for an L-layer model, per graph.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc, llmc.paged_attention_cpu among them)

from .graph_weights import finish_node
from .pattern import PassContext

llmc = torch.ops.llmc
LOWERINGS = {llmc.paged_attention.default: llmc.paged_attention_cpu.default}


def run(gm: GraphModule, ctx: PassContext) -> int:
    if ctx.target is None or ctx.target.is_gpu:
        return 0
    graph, count = gm.graph, 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in LOWERINGS]:
        with graph.inserting_before(node):
            lowered = graph.call_function(LOWERINGS[node.target], node.args, node.kwargs)
        finish_node(gm, lowered, node, "lower_cpu")
        node.replace_all_uses_with(lowered)
        graph.erase_node(node)
        count += 1
    return count
