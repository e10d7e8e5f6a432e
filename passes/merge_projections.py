"""Merges the projections that read one input into one GEMM: gate/up into a SwiGLU GEMM, q/k/v into one linear.

Matches, in this order:
1. SwiGLU: `silu(linear(x, Wg)) * linear(x, Wu)` (either operand order), the MLP of our models and of
   transformers' Qwen3 / Llama, with Wg and Wu get_attr weights of one shape and no biases ->
   `llmc.norm_linear(x, cat[Wg; Wu], None, 0.0, "none", "swiglu")`. It runs first, so gate and up are never
   merged as two plain linears.
2. Linears sharing an input: every `aten.linear(x, W_i[, b_i])` reading the same x, with get_attr weights of one
   dtype and in-size and either no biases or all biases (q/k/v, with GQA's different out sizes) ->
   `aten.linear(x, cat[W_1; ...; W_n], cat[b_i])` and one `aten.slice` on the last dim per old linear.
Assumes: a slice of the merged output is a strided view, so a consumer that is a `view` must only split the
last dim (what attention's head reshape does); a linear with any other view consumer stays on its own.
Runs: after fuse_rms_norm and fold_rope, before fuse_add_norm / fuse_norm_linear, which then fold the norm
into the one merged GEMM instead of into each projection. Each merged group counts one rewrite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .graph_weights import Linear, add_weight, drop_unread, finish_node, joined_name, read, same_size, val
from .pattern import Match, PassContext, Pattern, replace_all

aten, llmc = torch.ops.aten, torch.ops.llmc
VIEWS = (aten.view.default, aten._unsafe_view.default)


def swiglu_gate_first(x, w_gate, w_up):
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def swiglu_up_first(x, w_gate, w_up):
    return F.linear(x, w_up) * F.silu(F.linear(x, w_gate))


def _gate_up_weights(match: Match) -> bool:
    gate, up = match.inputs["w_gate"], match.inputs["w_up"]
    return (gate.op == "get_attr" and up.op == "get_attr" and gate is not up
            and tuple(val(gate).shape) == tuple(val(up).shape))


SWIGLU = Pattern(
    "swiglu",
    variants=[swiglu_gate_first, swiglu_up_first],
    example_inputs=lambda dtype: (torch.randn(3, 8, dtype=dtype), torch.randn(6, 8, dtype=dtype),
                                  torch.randn(6, 8, dtype=dtype)),
    extra_check=_gate_up_weights,
)


def _merge_gate_up(gm: GraphModule, added: set[str]):
    def build(match: Match) -> Node:
        gate, up = match.inputs["w_gate"], match.inputs["w_up"]
        name = joined_name([gate.target, up.target])
        added.add(name)
        weight = add_weight(gm, name, torch.cat([read(gm, gate), read(gm, up)]))
        return match.graph.call_function(llmc.norm_linear.default,
                                         (match.inputs["x"], weight, None, 0.0, "none", "swiglu"))

    return build


def _views_survive_slicing(linear: Node) -> bool:
    """A view of a last-dim slice is valid when it splits the last dim into trailing dims (the leading dims
    have consistent strides, so regrouping them is fine): some suffix of its shape multiplies to that dim."""
    width = val(linear).shape[-1]
    for user in linear.users:
        if user.target not in VIEWS:
            continue
        product = 1
        for size in reversed(val(user).shape):
            if not isinstance(size, int) or same_size(product, width):
                break
            product *= size
        if not same_size(product, width):
            return False
    return True


def _groups(graph: torch.fx.Graph) -> list[list[Linear]]:
    groups = []
    for node in graph.nodes:
        by_kind: dict[tuple, list[Linear]] = {}
        for user in node.users:
            linear = Linear.of(user)
            if (linear is None or linear.node.target != aten.linear.default or linear.x is not node
                    or val(linear.node) is None or not _views_survive_slicing(user)):
                continue
            w = val(linear.weight)
            by_kind.setdefault((w.dtype, w.device, w.shape[1], linear.bias is None), []).append(linear)
        groups += [group for group in by_kind.values() if len(group) > 1]
    return groups


def _merge(gm: GraphModule, group: list[Linear], added: set[str]) -> None:
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    group = sorted(group, key=lambda linear: order[linear.node])
    weights = [read(gm, linear.weight) for linear in group]
    with graph.inserting_before(group[0].node):
        name = joined_name([linear.weight.target for linear in group])
        added.add(name)
        args = [group[0].x, add_weight(gm, name, torch.cat(weights))]
        if group[0].bias is not None:
            bias_name = joined_name([linear.bias.target for linear in group])
            added.add(bias_name)
            args.append(add_weight(gm, bias_name, torch.cat([read(gm, linear.bias) for linear in group])))
        merged = finish_node(gm, graph.call_function(aten.linear.default, tuple(args)))
        last_dim, start, parts = val(merged).dim() - 1, 0, []
        for linear, weight in zip(group, weights):
            end = start + weight.shape[0]
            part = graph.call_function(aten.slice.Tensor, (merged, last_dim, start, end))
            parts.append(finish_node(gm, part, linear.node, "merge_projections"))
            start = end
    for linear, part in zip(group, parts):  # erased only now: the insertion point is the first of them
        linear.node.replace_all_uses_with(part)
        graph.erase_node(linear.node)


def run(gm: GraphModule, ctx: PassContext) -> int:
    """Merges gate/up pairs and then linears sharing an input; returns the number of merged groups."""
    added: set[str] = set()
    old = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    count = replace_all(gm, SWIGLU, _merge_gate_up(gm, added))
    for group in _groups(gm.graph):
        _merge(gm, group, added)
        count += 1
    drop_unread(gm, old)
    return count
