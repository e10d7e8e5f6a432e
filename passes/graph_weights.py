"""Helpers the weight-rewriting passes share: reading get_attr tensors, naming and registering the tensors a
pass derives from them, recognising linears, and dropping the attributes a rewrite left unread.

Naming rule: a derived tensor's name is a function of the names it was computed from (never a counter), so the
prefill and decode graphs, rewritten separately, give the same tensor the same name and compiler/api.py's
`collect_weights` stores it once; two different tensors never share a name.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)

from .pattern import _check_same_type, _fake_mode, _fill_meta

aten, llmc = torch.ops.aten, torch.ops.llmc
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries lack it


def is_weight(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def read(gm: GraphModule, node: Node) -> torch.Tensor:
    tensor = gm
    for part in node.target.split("."):
        tensor = getattr(tensor, part)
    return tensor


def val(node) -> torch.Tensor | None:
    """The node's fake tensor, or None when it has none (a literal, a tuple-valued node)."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def same_size(a, b) -> bool:
    return statically_known_true(a == b)


def same_shape(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is not None and b is not None and a.dim() == b.dim()
            and all(same_size(x, y) for x, y in zip(a.shape, b.shape)))


def joined_name(names: list[str]) -> str:
    """["l0_q_proj_weight", "l0_k_proj_weight"] -> "l0_q_k_proj_weight": shared prefix and suffix kept once."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("_") + 1]
    rests = [n[len(prefix):] for n in names]
    suffix = os.path.commonprefix([r[::-1] for r in rests])[::-1]
    suffix = suffix[suffix.find("_"):] if "_" in suffix else ""
    middles = [r[: len(r) - len(suffix)] for r in rests]
    if not all(middles):
        return "__".join(names)
    return prefix + "_".join(middles) + suffix


def add_weight(gm: GraphModule, name: str, tensor: torch.Tensor) -> Node:
    """A get_attr node (at the graph's insertion point) reading `tensor`, registered as `name` unless the graph
    already holds it: by the naming rule, a name already there was derived from the same sources."""
    existing = getattr(gm, name, None)
    if existing is None:
        gm.register_buffer(name, tensor.detach())
    elif existing.shape != tensor.shape or existing.dtype != tensor.dtype:
        raise RuntimeError(f"derived weight {name} already exists with another shape or dtype: a pass names "
                           "tensors inconsistently")
    node = gm.graph.get_attr(name)
    # Static sizes: pattern.py's fill would give a new weight symbolic ones, and `2N // 2 == N` is then unprovable.
    # The graph's own device: a graph traced on meta keeps meta values even once real weights are bound.
    with _fake_mode(gm.graph):
        device = _graph_device(gm.graph) or tensor.device
        node.meta["val"] = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    return node


def _graph_device(graph) -> torch.device | None:
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr") and val(node) is not None:
            return val(node).device
    return None


def reread(gm: GraphModule, node: Node | None) -> Node | None:
    """A new get_attr node at the insertion point reading what `node` reads (None stays None)."""
    if node is None:
        return None
    fresh = gm.graph.get_attr(node.target)
    fresh.meta.update(node.meta)
    return fresh


def finish_node(gm: GraphModule, new: Node, old: Node | None = None, what: str = "rewrite") -> Node:
    """Gives `new` its meta["val"] (and `old`'s source information) and checks it has `old`'s type."""
    _fill_meta(gm, new, _fake_mode(gm.graph))
    if old is not None:
        _check_same_type(what, old, new)
        for key in ("stack_trace", "nn_module_stack"):
            if key in old.meta:
                new.meta.setdefault(key, old.meta[key])
    return new


def drop_unread(gm: GraphModule, names) -> None:
    """Removes dead nodes, then deletes the attributes among `names` that no get_attr node reads any more."""
    gm.graph.eliminate_dead_code()
    read_now = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in set(names) - read_now:
        if hasattr(gm, name):
            delattr(gm, name)


@contextmanager
def releasing_weights(gm: GraphModule) -> Iterator[None]:
    """Within the block, a weight is freed the moment the last node reading it is erased.

    The rewrite passes drop the weights they replaced at their end (drop_unread), so a pass that rewrites every
    layer held the old and the new weights of the whole model at once: twice the model for merge_projections.
    Freed here means the attribute becomes a meta tensor of the same shape and dtype (what the erased nodes'
    metadata still describes) until the block ends and drops it. Only the graph's own reference goes: the caller
    makes sure it is the last one (compile unbinds the decode graph's). A pass that read a freed weight again
    would compute from nothing: on leaving the block, a live node reading a weight without data raises.
    """
    freed: set[str] = set()

    def on_erase(node: Node) -> None:
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" or set(arg.users) != {node} or _read_elsewhere(gm, arg):
                continue
            owner_name, _, name = arg.target.rpartition(".")
            owner = gm.get_submodule(owner_name)
            tensor = getattr(owner, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                twin = torch.empty_like(tensor, device="meta")
                setattr(owner, name, torch.nn.Parameter(twin, False) if name in owner._parameters else twin)
                freed.add(arg.target)
                del tensor
                return_free_memory()

    gm._register_erase_node_hook(on_erase)
    try:
        yield
    finally:
        gm._unregister_erase_node_hook(on_erase)
    if not freed:
        return
    empty = [n.target for n in gm.graph.nodes
             if n.op == "get_attr" and n.users and getattr(read(gm, n), "device", None) == torch.device("meta")]
    if empty:
        raise RuntimeError(f"weight {empty[0]} has no data: a pass read a weight after erasing its last reader "
                           "(build a node's replacement before erasing the node)")
    drop_unread(gm, freed)


def return_free_memory() -> None:
    """Hands the free pages of the C heap back to the OS.

    glibc serves allocations under its mmap threshold (which grows to 32 MiB) from the heap and keeps them when
    freed; a freed weight leaves a hole that a tensor of another size does not fit (q, k and v's three holes do
    not hold the merged qkv), and the resident set grows by the holes. malloc_trim releases them.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _read_elsewhere(gm: GraphModule, node: Node) -> bool:
    """Whether another get_attr node with users reads node's tensor (a rewrite may read a weight twice)."""
    return any(other is not node and other.users
               for other in gm.graph.find_nodes(op="get_attr", target=node.target))


class Linear:
    """A GEMM a norm can be folded into: `aten.linear(x, W[, b])` or `llmc.norm_linear(x, W, b, _, "none", epi)`,
    with W (and b) get_attr tensors and x nowhere else in the arguments."""

    def __init__(self, node: Node, x: Node, weight: Node, bias: Node | None, epilogue: str):
        self.node, self.x, self.weight, self.bias, self.epilogue = node, x, weight, bias, epilogue

    @staticmethod
    def of(node: Node) -> Linear | None:
        if node.op != "call_function" or node.kwargs:
            return None
        if node.target == aten.linear.default:
            x, weight, bias, epilogue = *node.args, *[None] * (3 - len(node.args)), "none"
        elif node.target == llmc.norm_linear.default and node.args[4] == "none":
            x, weight, bias, _, _, epilogue = node.args
        else:
            return None
        if not is_weight(weight) or not (bias is None or is_weight(bias)) or x in (weight, bias):
            return None
        w = val(weight)
        if w is None or w.dim() != 2:
            return None
        return Linear(node, x, weight, bias, epilogue)
