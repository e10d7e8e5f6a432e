"""graph.json: our own JSON schema for lowered FX graphs (no pickle), written by compiler/, read by runtime/.

A graph is {"inputs": [names], "nodes": [node, ...]} where a node is
  {"name": str, "op": "placeholder" | "get_attr" | "call_function" | "output", "target": str,
   "args": [...], "kwargs": {...}, "shape": [...] | absent, "dtype": str | absent}
Arguments encode as: JSON scalars for int/bool/str/None/finite floats; {"node": name} for a node;
{"float": "inf" | "-inf" | "nan"}; {"tuple": [...]} for tuples (lists stay lists); {"dtype": "float32"};
{"device": "host"} (the executing device, chosen on load); {"layout": ...}; {"memory_format": ...}.
Call targets are op overloads ("aten.mm.default", "llmc.rms_norm.default") or a fixed set of Python operators
on sizes ("operator.mul"); anything else is refused on load, so a graph.json can never name arbitrary code.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from llmc.common.errors import LlmcError

FORMAT = "llmc-graph/1"

# Non-op call targets export produces for symbolic sizes. Loading resolves only these and torch.ops overloads.
PY_TARGETS = {f"operator.{n}": getattr(operator, n) for n in
              ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le",
               "gt", "ge", "and_", "or_")}
PY_TARGETS.update({f"torch.{n}": getattr(torch, n) for n in ("sym_max", "sym_min", "sym_not", "sym_float",
                                                              "sym_int", "sym_sqrt", "sym_ite")})
PY_TARGETS["math.ceil"] = math.ceil
PY_TARGETS["math.floor"] = math.floor
NAMES_OF = {v: k for k, v in PY_TARGETS.items()}

OP_NAMESPACES = ("aten", "llmc", "prims")


class GraphFormatError(LlmcError, ValueError):
    pass


def target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"
    if target in NAMES_OF:
        return NAMES_OF[target]
    raise GraphFormatError(f"cannot serialise call target {target!r}: not an op overload or known operator")


def resolve_target(name: str):
    if name in PY_TARGETS:
        return PY_TARGETS[name]
    ns, _, rest = name.partition(".")
    op, _, overload = rest.rpartition(".")
    if ns not in OP_NAMESPACES or not op:
        raise GraphFormatError(f"graph.json names an unknown call target {name!r}")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except AttributeError:
        raise GraphFormatError(f"graph.json names op {name!r}, which this torch/llmc does not provide") from None


def encode(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, bool | int | str) or a is None:
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": str(a)}
    if isinstance(a, tuple):
        return {"tuple": [encode(x) for x in a]}
    if isinstance(a, list):
        return [encode(x) for x in a]
    if isinstance(a, dict):
        return {"dict": {k: encode(v) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": "host"}  # where the graph runs is the runtime's choice; traced on cpu or meta alike
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise GraphFormatError(f"cannot serialise argument {a!r} of type {type(a).__name__}")


def decode(a, nodes: dict, device: torch.device):
    if isinstance(a, list):
        return [decode(x, nodes, device) for x in a]
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    if kind == "node":
        return nodes[v]
    if kind == "tuple":
        return tuple(decode(x, nodes, device) for x in v)
    if kind == "dict":
        return {k: decode(x, nodes, device) for k, x in v.items()}
    if kind == "float":
        return float(v)
    if kind in ("dtype", "layout", "memory_format"):
        value = getattr(torch, v, None)
        if value is None:
            raise GraphFormatError(f"graph.json names unknown {kind} {v!r}")
        return value
    if kind == "device":
        return device
    raise GraphFormatError(f"graph.json has an unknown argument kind {kind!r}")


def _describe(node: fx.Node) -> dict:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return {"shape": [d if isinstance(d, int) else str(d) for d in val.shape], "dtype": str(val.dtype)[6:]}
    return {}


def graph_to_json(gm: fx.GraphModule) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        entry = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            entry["target"] = target_name(n.target)
        elif n.op in ("placeholder", "get_attr"):
            entry["target"] = str(n.target)
        elif n.op != "output":
            raise GraphFormatError(f"node {n.name}: op {n.op} is not supported in graph.json")
        entry["args"] = encode(list(n.args))
        entry["kwargs"] = {k: encode(v) for k, v in n.kwargs.items()}
        entry.update(_describe(n))
        nodes.append(entry)
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return {"format": FORMAT, "inputs": inputs, "nodes": nodes}


def graph_from_json(data: dict, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> fx.GraphModule:
    """Rebuilds the GraphModule; `tensors` supplies every get_attr target (weights and constants)."""
    if data.get("format") != FORMAT:
        raise GraphFormatError(f"graph.json format {data.get('format')!r}, expected {FORMAT!r}")
    device = torch.device(device)
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for e in data["nodes"]:
        op, args = e["op"], tuple(decode(e.get("args", []), nodes, device))
        kwargs = {k: decode(v, nodes, device) for k, v in e.get("kwargs", {}).items()}
        if op == "placeholder":
            node = graph.placeholder(e["target"])
        elif op == "get_attr":
            if e["target"] not in tensors:
                raise GraphFormatError(f"graph.json needs tensor {e['target']!r}, which the weights do not hold")
            node = graph.get_attr(e["target"])
        elif op == "call_function":
            node = graph.call_function(resolve_target(e["target"]), args, kwargs)
        elif op == "output":
            node = graph.output(args[0])
        else:
            raise GraphFormatError(f"graph.json node {e.get('name')!r} has unknown op {op!r}")
        node.name = e["name"]
        nodes[e["name"]] = node
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    return fx.GraphModule({k: v for k, v in tensors.items() if k in used}, graph)
