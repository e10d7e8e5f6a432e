"""Layer stitching: the graph of an L-layer model from the export of its first two layers.

torch.export's cost grows with the number of traced operations (symbolic shape reasoning on every size), so
exporting Qwen3-8B's 36 identical decoder layers took most of a compile. Every layer of a dense decoder is the
same graph with other weights and another cache slice, so we export a 2-layer copy of the model and replay
layer 1's nodes L - 2 more times. Layer 0 and layer 1 are compared node by node first: the replay runs only when
they differ exactly where a layer index can (their weights, the literal layer index, layer 0 reading the
embedding where layer 1 reads layer 0's output). Anything else raises StitchError and the caller exports whole.

In the replayed layer i: an argument that is a layer-1 node becomes layer i's copy of it, an argument that is a
layer-0 node (layer 1's input from layer 0) becomes layer i - 1's node in that role, a layer-1 weight becomes
layer i's weight (a new meta attribute, bound later by name), the literal 1 where layer 0 has 0 becomes i, and
nodes shared by all layers (RoPE tables, masks, sizes, inputs) stay as they are. After the layers, lists that
hold one value per layer ([k_0, k_1] for torch.stack) get every layer's value, other uses move to the last layer.
"""
from __future__ import annotations

import re

import torch
from torch import fx

_LAYER_PATH = re.compile(r"(?:^|\.)layers(?:\.|\[)(\d+)")
_LAYER_WEIGHT = re.compile(r"^layers_(\d+)_")


class StitchError(ValueError):
    pass


def layer_of(node: fx.Node) -> int | None:
    """The decoder layer a traced node belongs to (from export's nn_module_stack), or None for shared nodes."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = _LAYER_PATH.search(path)
        if match:
            return int(match.group(1))
    if node.op == "get_attr":
        match = _LAYER_WEIGHT.match(node.target)
        if match:
            return int(match.group(1))
    return None


def stitch(gm: fx.GraphModule, num_layers: int) -> None:
    """Extends gm, the graph of a 2-layer model, in place to `num_layers` layers (see the module docstring)."""
    if num_layers <= 2:
        return
    graph = gm.graph
    layers: dict[int, list[fx.Node]] = {0: [], 1: []}
    for node in graph.nodes:
        index = layer_of(node)
        # Size arithmetic (SymInt values) is memoized by the tracer: layer 1 reuses what layer 0 computed from the
        # inputs' sizes, so it belongs to no layer.
        if index is not None and node.op != "get_attr" and not _is_size(node):
            if index not in layers:
                raise StitchError(f"node {node.name} belongs to layer {index}; a 2-layer graph was expected")
            layers[index].append(node)
    first, second = layers[0], layers[1]
    if not second or len(first) != len(second):
        raise StitchError(f"layers 0 and 1 have {len(first)} and {len(second)} nodes")
    counterpart = dict(zip(first, second))  # layer-0 node -> layer-1 node
    index_slots = [_check_same_layer(a, b, counterpart) for a, b in zip(first, second)]

    anchor = second[-1].next
    previous = {n: n for n in second}  # layer-1 node -> the node playing its role in the layer before
    per_layer: list[dict[fx.Node, fx.Node]] = [dict(zip(second, first)), {n: n for n in second}]
    for i in range(2, num_layers):
        copies: dict[fx.Node, fx.Node] = {}
        weights: dict[fx.Node, fx.Node] = {}

        def remap(arg, i=i, copies=copies, weights=weights, previous=previous):
            if arg in copies:
                return copies[arg]
            if arg in counterpart:  # layer 1 reads layer 0: layer i reads layer i - 1
                return previous[counterpart[arg]]
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and layer_of(arg) == 1:
                if arg not in weights:
                    weights[arg] = _layer_weight(gm, arg, i)
                return weights[arg]
            return arg

        with graph.inserting_before(anchor):
            for node, slots in zip(second, index_slots):
                args = fx.node.map_arg(node.args, remap)
                kwargs = fx.node.map_arg(node.kwargs, remap)
                args = _set_index(args, slots, i)
                copy = graph.create_node(node.op, node.target, args, kwargs)
                copy.meta = dict(node.meta)
                copies[node] = copy
        per_layer.append(copies)
        previous = copies
    stacked = _reroute_layer_outputs(graph, second, per_layer, set(first) | set(second))
    # The per-layer tensors (the cache inputs, the stacked new keys/values) now have num_layers leading entries;
    # other inputs with a static leading 2 cannot exist: the export's example inputs make every such dim dynamic.
    for node in [*stacked, *(n for n in graph.nodes if n.op == "placeholder")]:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() and type(val.shape[0]) is int and val.shape[0] == 2:
            with val.fake_mode:
                node.meta["val"] = val.new_empty((num_layers, *val.shape[1:]))
    graph.lint()
    gm.recompile()


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _check_same_layer(a: fx.Node, b: fx.Node, counterpart: dict) -> list[int]:
    """Positions (in the flattened args) of the literal layer index; raises StitchError if a and b differ
    anywhere a layer index cannot explain."""
    if (a.op, a.target) != (b.op, b.target) or a.kwargs.keys() != b.kwargs.keys():
        raise StitchError(f"layer nodes {a.name} and {b.name} differ: {a.target} vs {b.target}")
    flat_a, flat_b = _flatten(a.args) + _flatten(a.kwargs), _flatten(b.args) + _flatten(b.kwargs)
    if len(flat_a) != len(flat_b):
        raise StitchError(f"layer nodes {a.name} and {b.name} have different arguments")
    slots = []
    for k, (x, y) in enumerate(zip(flat_a, flat_b)):
        if isinstance(x, fx.Node) and isinstance(y, fx.Node):
            # Internal to the layer, shared by all layers, or layer 1 reading layer 0 where layer 0 reads the input.
            same_role = counterpart.get(x) is y or x is y or (layer_of(y) == 0 and layer_of(x) is None)
            weights = x.op == y.op == "get_attr" and x.target.replace("layers_0_", "layers_1_", 1) == y.target
            if not (same_role or weights):
                raise StitchError(f"layer nodes {a.name} and {b.name} read {x.name} and {y.name}")
        elif type(x) is int and type(y) is int and (x, y) == (0, 1) and a.target == torch.ops.aten.select.int:
            slots.append(k)
        elif x != y:
            raise StitchError(f"layer nodes {a.name} and {b.name} differ in a constant: {x!r} vs {y!r}")
    return slots


def _flatten(value) -> list:
    out = []
    fx.node.map_aggregate(value, lambda v: out.append(v) or v)
    return out


def _set_index(args: tuple, slots: list[int], layer: int) -> tuple:
    if not slots:
        return args
    counter = iter(range(10 ** 9))
    return fx.node.map_aggregate(args, lambda v: layer if next(counter) in slots else v)


def _layer_weight(gm: fx.GraphModule, template: fx.Node, layer: int) -> fx.Node:
    name = _LAYER_WEIGHT.sub(f"layers_{layer}_", template.target, count=1)
    if not hasattr(gm, name):
        gm.register_buffer(name, torch.empty_like(getattr(gm, template.target), device="meta"))
    with gm.graph.inserting_before(template):
        node = gm.graph.get_attr(name)
    node.meta = dict(template.meta)
    return node


def _reroute_layer_outputs(graph: fx.Graph, second: list[fx.Node], per_layer: list[dict],
                           layer_nodes: set) -> set[fx.Node]:
    """Uses of layer-1 values outside the layers: a list holding [value of layer 0, value of layer 1] (one entry
    per layer, as torch.stack's) gets every layer's value; any other use moves to the last layer's value."""
    replayed = {copy for copies in per_layer[2:] for copy in copies.values()}
    stacked = set()
    for node in second:
        role0, tail, last = per_layer[0][node], [copies[node] for copies in per_layer[2:]], per_layer[-1][node]

        def reroute(value, node=node, role0=role0, tail=tail, last=last):
            if isinstance(value, (list, tuple)):
                out = []
                for item in value:
                    if item is node and out and out[-1] is role0:
                        out += [node, *tail]
                        stacked.add(user)
                    else:
                        out.append(reroute(item))
                return type(value)(out)
            if isinstance(value, dict):
                return {k: reroute(v) for k, v in value.items()}
            return last if value is node else value

        for user in list(node.users):
            if user not in layer_nodes and user not in replayed:
                user.args, user.kwargs = reroute(user.args), reroute(user.kwargs)
    return stacked
