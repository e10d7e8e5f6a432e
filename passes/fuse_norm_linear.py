"""Fuses a norm into the GEMMs it feeds: the norm runs in the GEMM's prologue, its gain is folded into the weight.

Matches a norm whose every user is a linear (`aten.linear` or a `llmc.norm_linear` with norm="none", as
merge_projections leaves gate/up), directly or through row selections (slices, selects and index ops on
leading dims, views keeping the last dim: the last-token gather of the paged step, transformers' `[:, -k:]`),
which commute with a per-row norm and are moved onto the norm's input:
- `llmc.rms_norm(x, g, eps)` -> `llmc.norm_linear(x, W * g, b, eps, "rms", epilogue)` per linear;
- `llmc.add_rms_norm(a, r, g, eps)` -> `llmc.add_norm_linear(a, r, W * g, b, eps, "rms", epilogue)`, whose sum
  replaces the add_rms_norm's sum; further linears of the same norm read that sum through norm_linear;
- `aten.layer_norm` / `aten.native_layer_norm` (x, [D], gamma, beta, eps) -> norm_linear(..., "layer") with
  W' = W * gamma and b' = W @ beta + b.
A norm with any other user (attention's q/k norm feeds the rotation, a norm that is a graph output) stays as it
is, and so does an add_rms_norm whose sum is used when its GEMM reads selected rows only.
Folded weights are computed in float32 and cast to W's dtype, into new tensors named after their sources (a tied
lm_head never writes into the shared embedding); the weights nothing reads any more are deleted. The gain is
then applied to the weight in W's dtype instead of to the activation: results move within a rounding step.
Assumes: norm gain (and beta) get_attr tensors of x's dtype and shape [D]; linear weights [N, D] of x's dtype.
Runs: last of the fusion phase, after merge_projections and fuse_add_norm. One rewrite per fused norm.
Not a Pattern (passes/pattern.py): the match is a norm together with every one of its readers, reached through any
chain of row selections, and the rewrite depends on how many GEMMs share the norm; SubgraphMatcher matches
subgraphs of a fixed shape and cannot require "all readers".
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .graph_weights import (Linear, add_weight, drop_unread, finish_node, is_weight, read, reread, same_shape,
                            same_size, val)
from .pattern import PassContext

aten, llmc = torch.ops.aten, torch.ops.llmc
ROW_SELECTIONS = (aten.slice.Tensor, aten.select.int, aten.index.Tensor, aten.view.default,
                  aten._unsafe_view.default)


class Norm:
    """One norm the pass may fuse: its input(s), gain, bias (layer), eps, kind, and the node its users read."""

    def __init__(self, node, inputs, gain, beta, eps, kind, out, sum_out=None, extra_outs=()):
        self.node, self.inputs, self.gain, self.beta, self.eps, self.kind = node, inputs, gain, beta, eps, kind
        self.out, self.sum_out, self.extra_outs = out, sum_out, extra_outs

    @staticmethod
    def of(node: Node) -> Norm | None:
        if node.op != "call_function" or node.kwargs:
            return None
        if node.target == llmc.rms_norm.default:
            x, gain, eps = node.args
            return Norm(node, [x], gain, None, eps, "rms", node)
        if node.target == llmc.add_rms_norm.default:
            outs = _getitems(node)
            if outs is None or 1 not in outs:
                return None
            x, residual, gain, eps = node.args
            return Norm(node, [x, residual], gain, None, eps, "rms", outs[1], outs.get(0))
        if node.target == aten.layer_norm.default:
            x, shape, gain, beta, eps = (*node.args, *(None, None, 1e-5)[len(node.args) - 2:])[:5]
            return Norm(node, [x], gain, beta, eps, "layer", node) if len(shape) == 1 else None
        if node.target == aten.native_layer_norm.default:
            outs = _getitems(node)
            x, shape, gain, beta, eps = node.args
            if outs is None or 0 not in outs or len(shape) != 1:
                return None
            return Norm(node, [x], gain, beta, eps, "layer", outs[0], extra_outs=[outs.get(1), outs.get(2)])
        return None

    def fusable(self) -> bool:
        x = val(self.inputs[0])
        if x is None or any(not same_shape(val(i), x) for i in self.inputs):
            return False
        if any(out is not None and out.users for out in self.extra_outs):
            return False  # native_layer_norm's mean / rstd are used: the norm has to stay
        for param in (self.gain, self.beta):
            if param is None:
                continue
            p = val(param)
            if not is_weight(param) or p.dim() != 1 or not same_size(p.shape[0], x.shape[-1]) or p.dtype != x.dtype:
                return False
        return True


def _getitems(node: Node) -> dict[int, Node] | None:
    outs = {}
    for user in node.users:
        if user.target is not operator.getitem or user.args[1] in outs:
            return None
        outs[user.args[1]] = user
    return outs


def _is_row_selection(node: Node, source: Node) -> bool:
    if node.target not in ROW_SELECTIONS or node.kwargs or node.args[0] is not source:
        return False
    if any(source is a for a in node.args[1:]) or val(node) is None:
        return False
    last = val(source).dim() - 1
    if node.target in (aten.slice.Tensor, aten.select.int):
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim % (last + 1) != last
    if node.target == aten.index.Tensor:
        return len(node.args[1]) <= last and source not in node.args[1]
    return same_size(val(node).shape[-1], val(source).shape[-1])  # a view keeping the row


def _consumers(start: Node, dtype: torch.dtype, width) -> list[tuple[Linear, list[Node]]] | None:
    """Every linear reading `start` with the row selections on the way, or None if anything else reads it."""
    found = []
    for user in start.users:
        linear = Linear.of(user)
        if linear is not None and linear.x is start:
            w = val(linear.weight)
            if w.dtype != dtype or not same_size(w.shape[1], width):
                return None
            found.append((linear, []))
            continue
        if not _is_row_selection(user, start):
            return None
        below = _consumers(user, dtype, width)
        if below is None:
            return None
        found += [(linear, [user, *path]) for linear, path in below]
    return found


def _folded(gm: GraphModule, norm: Norm, linear: Linear, added: set[str]) -> tuple[Node, Node | None]:
    """(W', b') get_attr nodes: W * gain and, for a layer norm, W @ beta + b, computed in float32."""
    weight, bias = linear.weight, linear.bias
    w = read(gm, weight)
    # Unfolded ones are read again here: the old get_attr may sit after the new op (merge_projections puts
    # its merged weights next to the GEMM, which can follow the add_rms_norm the new op replaces).
    new_weight, new_bias = reread(gm, weight), reread(gm, bias)
    if norm.gain is not None:
        name = f"{weight.target}__{norm.gain.target}"
        added.add(name)
        new_weight = add_weight(gm, name, (w.float() * read(gm, norm.gain).float()).to(w.dtype))
    if norm.beta is not None:
        shifted = w.float() @ read(gm, norm.beta).float()
        name = f"{weight.target}__{norm.beta.target}"
        if bias is not None:
            shifted = shifted + read(gm, bias).float()
            name += f"__{bias.target}"
        added.add(name)
        new_bias = add_weight(gm, name, shifted.to(w.dtype))
    return new_weight, new_bias


def _select(graph, source: Node, path: list[Node]) -> Node:
    """Replays the row selections of `path` on `source`."""
    for step in path:
        source = graph.call_function(step.target, (source, *step.args[1:]))
    return source


def _fuse(gm: GraphModule, norm: Norm, consumers: list[tuple[Linear, list[Node]]], added: set[str]) -> None:
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    consumers = sorted(consumers, key=lambda c: (len(c[1]) > 0, order[c[0].node]))  # a full-row one leads
    full_sum = None
    for i, (linear, path) in enumerate(consumers):
        lead_with_add = norm.node.target == llmc.add_rms_norm.default and (i == 0 or full_sum is None)
        # the lead add_norm_linear sits at the add_rms_norm, so its sum exists before the old sum's users
        place = norm.node.next if lead_with_add and not path else linear.node
        with graph.inserting_before(place):
            weight, bias = _folded(gm, norm, linear, added)
            if lead_with_add:
                inputs = [_select(graph, x, path) for x in norm.inputs]
                fused = graph.call_function(llmc.add_norm_linear.default, (
                    *inputs, weight, bias, norm.eps, norm.kind, linear.epilogue))
                out = graph.call_function(operator.getitem, (fused, 1))
                if not path:
                    full_sum = finish_node(gm, graph.call_function(operator.getitem, (fused, 0)), norm.sum_out,
                                           "fuse_norm_linear")
            else:
                x = full_sum if full_sum is not None else norm.inputs[0]
                out = graph.call_function(llmc.norm_linear.default, (
                    _select(graph, x, path), weight, bias, norm.eps, norm.kind, linear.epilogue))
            finish_node(gm, out, linear.node, "fuse_norm_linear")
        linear.node.replace_all_uses_with(out)
        graph.erase_node(linear.node)
    if norm.sum_out is not None and full_sum is not None:
        norm.sum_out.replace_all_uses_with(full_sum)


def run(gm: GraphModule, ctx: PassContext) -> int:
    """Fuses every norm whose users are all linears; returns the number of norms fused."""
    added: set[str] = set()
    old = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    count = 0
    for node in list(gm.graph.nodes):
        norm = Norm.of(node)
        if norm is None or not norm.fusable():
            continue
        x = val(norm.inputs[0])
        consumers = _consumers(norm.out, x.dtype, x.shape[-1])
        if not consumers:
            continue
        has_sum_users = norm.sum_out is not None and norm.sum_out.users
        if has_sum_users and all(path for _, path in consumers):
            ctx.note(f"{node.name}: the residual sum is used and its GEMMs read selected rows; left unfused")
            continue
        _fuse(gm, norm, consumers, added)
        count += 1
    drop_unread(gm, old | added)
    return count
