"""Freezing for the torch.compile backend (llmc/backend.py): dynamo hands a graph its module's parameters and
buffers as inputs; the backend makes them constants (get_attr nodes of buffers) that llmc's passes read, fold and
replace, as inductor's freezing does, and applies the backend's dtype policy on the way."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from llmc.common.errors import UsageError


@dataclass
class Frozen:
    """Dynamo's graph with its weights as buffers. aot_autograd lifts those buffers back into inputs, first and
    in `names` order, so the lowered graph's first len(names) placeholders are these weights."""

    gm: GraphModule
    names: list[str]
    tensors: list[torch.Tensor]
    cast: list[bool]  # the tensor is a dtype-policy copy, not the model's own (writes to it would be lost)
    runtime_positions: list[int]  # dynamo's inputs that stay inputs
    runtime_examples: list
    runtime_names: list[str]


def _is_weight(value) -> bool:
    """A parameter or buffer of an nn.Module dynamo inlined (it marks those static inputs "unguarded")."""
    from torch._dynamo.utils import get_static_address_type

    return isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter)
                                                or get_static_address_type(value) == "unguarded")


def _weight_name(placeholder: str) -> str:
    """l_self_modules_model_modules_norm_parameters_weight_ -> model_norm_weight."""
    name = re.sub(r"^l_(self_)?", "", placeholder)
    name = re.sub(r"(^|_)(modules|parameters|buffers)_", r"\1", name).strip("_")
    return name if name.isidentifier() else f"weight_{name}"


def freeze(dynamo_gm: GraphModule, example_inputs: Sequence, dtype: torch.dtype | None) -> Frozen:
    """A copy of dynamo's graph whose parameters and buffers are its own buffers, read by get_attr (a tied weight
    once); with a dtype, parameters are frozen in it, floating inputs cast to it on entry and floating outputs back."""
    graph = torch.fx.Graph()
    graph._codegen = dynamo_gm.graph._codegen
    graph.output(graph.graph_copy(dynamo_gm.graph, {}))  # dynamo keeps its own graph: never edit it
    gm = GraphModule(torch.nn.Module(), graph)
    placeholders = graph.find_nodes(op="placeholder")
    if len(placeholders) != len(example_inputs):
        raise RuntimeError(f"dynamo gave {len(example_inputs)} inputs for {len(placeholders)} placeholders")
    by_identity: dict[int, str] = {}  # a tied weight is one tensor behind two inputs: one buffer
    frozen = Frozen(gm, [], [], [], [], [], [])
    for position, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not _is_weight(value):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                raise UsageError(f"input {node.name} requires grad; the llmc backend compiles inference only: "
                                 "run the model under torch.no_grad() or detach the input")
            frozen.runtime_positions.append(position)
            frozen.runtime_examples.append(value)
            frozen.runtime_names.append(re.sub(r"^l_", "", node.name).strip("_"))
            _cast_on_entry(graph, node, value, dtype)
            continue
        name = by_identity.get(id(value))
        if name is None:
            name = _weight_name(node.name)
            while hasattr(gm, name):
                name += "_"
            tensor = value.detach()
            # Parameters only: buffers such as RoPE's inverse frequencies keep their (float32) precision.
            cast = dtype is not None and isinstance(value, torch.nn.Parameter) and tensor.is_floating_point() \
                and tensor.dtype != dtype
            gm.register_buffer(name, tensor.to(dtype) if cast else tensor)
            by_identity[id(value)] = name
            frozen.names.append(name)
            frozen.tensors.append(getattr(gm, name))
            frozen.cast.append(cast)
        read_attribute_instead(gm, node, name)
    if dtype is not None:
        _cast_outputs_back(graph)
    gm.recompile()
    return frozen


def read_attribute_instead(gm: GraphModule, placeholder, name: str) -> None:
    """Replaces an input by a get_attr of gm's attribute `name`, keeping the input's meta (its fake value)."""
    with gm.graph.inserting_before(placeholder):
        attr = gm.graph.get_attr(name)
    attr.meta.update(placeholder.meta)
    placeholder.replace_all_uses_with(attr)
    gm.graph.erase_node(placeholder)


def _cast_on_entry(graph: torch.fx.Graph, node, value, dtype: torch.dtype | None) -> None:
    if dtype is None or not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
        return
    with graph.inserting_after(node):
        cast = graph.call_method("to", (node, dtype))
    node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)


def _cast_outputs_back(graph: torch.fx.Graph) -> None:
    """Floating outputs return in the dtype eager computes them in (dynamo recorded it as example_value)."""
    output = graph.output_node()

    def back(arg):
        eager = arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else None
        if not isinstance(eager, torch.Tensor) or not eager.is_floating_point():
            return arg
        with graph.inserting_before(output):
            return graph.call_method("to", (arg, eager.dtype))

    output.args = torch.fx.node.map_aggregate(output.args, back)
