"""Evaluates once, at compile time, every node that reads only weights and literals, and stores the result as a
weight of the graph.

Matches: call_function nodes whose every input node is a get_attr tensor or another folded node (no placeholder,
no symbolic size), whose op is deterministic and pure (no random op, no mutation), and whose value is a tensor (or
a tuple of tensors read only through getitem). `weight.t()`, casts and arithmetic of weights, `arange(16)` fold;
anything downstream of an input does not.
Size rule: a node folds only when its value takes at most GROWTH times the bytes of the tensors it reads, or at most
SMALL_BYTES. An expand of a weight to [S, hidden] or a `ones` of a large literal shape stays in the graph, where it
costs a cheap kernel instead of bundle bytes and device memory. The rule is per node: what a skipped node feeds
does not fold either.
Stores: only the values the rest of the graph reads (one new attribute per value; the folded nodes in between
vanish). A value's name is the weights it comes from, its op and a hash of its whole expression, so the prefill
and decode graphs, folded separately, name the same value alike and two values never share a name. Dead get_attr
nodes and the attributes they read are removed afterwards.
Assumes: every node carries meta["val"] (the fake tensor export gives it); a node without one is left alone.
Weights on the meta device fold to meta values (shapes only), so compiling without weights works.
Runs: after the passes that leave constant arithmetic behind (fold_rope); anywhere is correct.
Counts: the call_function nodes folded away.
"""
from __future__ import annotations

import hashlib
import operator

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from .graph_weights import add_weight, drop_unread, finish_node, joined_name, read
from .pattern import PassContext

GROWTH = 2
SMALL_BYTES = 64 * 1024
UNINITIALIZED_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def run(gm: GraphModule, ctx: PassContext) -> int:
    return fold_constants(gm)


def fold_constants(gm: GraphModule) -> int:
    graph = gm.graph
    folded = _foldable(gm)
    if not folded:
        return 0
    # Values read outside the folded set are stored; the ones in between only feed them.
    stored = [n for n in folded if any(user not in folded for user in n.users)]
    values = _evaluate(gm, folded, set(stored))
    expressions: dict[Node, str] = {}
    read_before = {n.target for n in graph.nodes if n.op == "get_attr"}
    for node in stored:
        with graph.inserting_before(node):
            attr = add_weight(gm, _name(node, expressions), values.pop(node))
        finish_node(gm, attr, node, "fold_constants")
        node.replace_all_uses_with(attr)
    drop_unread(gm, read_before)
    return len(folded)


def _foldable(gm: GraphModule) -> dict[Node, None]:
    """The nodes to fold, in graph order (a dict as an ordered set)."""
    constant: dict[Node, None] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if isinstance(read(gm, node), torch.Tensor):
                constant[node] = None
        elif (node.op == "call_function" and all(arg in constant for arg in node.all_input_nodes)
              and _deterministic(node) and _has_tensor_value(node) and _small_enough(gm, node)):
            constant[node] = None
    return {n: None for n in constant if n.op == "call_function"}


def _deterministic(node: Node) -> bool:
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload) or node.is_impure():
        return False
    if node.target._opname in UNINITIALIZED_OPS:
        return False  # its "value" is whatever memory held: nothing worth storing
    return not node.target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags


def _has_tensor_value(node: Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return True
    # A multi-output op (split, ...) folds through its getitem users, which are stored instead.
    return (isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)
            and all(user.target is operator.getitem for user in node.users))


def _nbytes(value) -> int | None:
    total = 0
    for tensor in pytree.tree_leaves(value):
        if not isinstance(tensor, torch.Tensor):
            continue
        numel = tensor.numel()
        if not isinstance(numel, int):
            return None  # a symbolic size: not a constant
        total += numel * tensor.element_size()
    return total


def _small_enough(gm: GraphModule, node: Node) -> bool:
    out = _nbytes(node.meta["val"])
    reads = [_nbytes(arg.meta.get("val", read(gm, arg) if arg.op == "get_attr" else None))
             for arg in node.all_input_nodes]
    if out is None or None in reads:
        return False
    return out <= max(GROWTH * sum(reads), SMALL_BYTES)


def _evaluate(gm: GraphModule, folded: dict[Node, None], stored: set[Node]) -> dict[Node, torch.Tensor]:
    """The values of the stored nodes; values in between are dropped as soon as their last reader has run."""
    env: dict[Node, object] = {}
    pending = {n: sum(1 for u in n.users if u in folded) for n in folded}

    def value_of(arg: Node):
        return env[arg] if arg in env else read(gm, arg)

    with torch.no_grad():
        for node in folded:
            args, kwargs = pytree.tree_map_only(Node, value_of, (node.args, node.kwargs))
            env[node] = node.target(*args, **kwargs)
            for arg in node.all_input_nodes:
                if arg in pending:
                    pending[arg] -= 1
                    if pending[arg] == 0 and arg not in stored:
                        del env[arg]
    return {node: _own_storage(env[node]) for node in stored}


def _own_storage(value: torch.Tensor) -> torch.Tensor:
    """A view (weight.t(), an alias) would share memory with its weight: safetensors stores neither twice."""
    if value._is_view() or not value.is_contiguous():
        return value.clone(memory_format=torch.contiguous_format)
    return value


def _name(node: Node, expressions: dict[Node, str]) -> str:
    weights = list(dict.fromkeys(n.target for n in _ancestors(node) if n.op == "get_attr"))
    base = joined_name(weights) if weights else "constant"
    op = getattr(node.target, "_opname", getattr(node.target, "__name__", "value")).strip("_")
    digest = hashlib.sha1(_expression(node, expressions).encode()).hexdigest()[:8]
    return f"{base}_{op}_{digest}"


def _ancestors(node: Node) -> list[Node]:
    seen, stack = {}, [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen[n] = None
            stack.extend(n.all_input_nodes)
    return list(seen)


def _expression(node: Node, memo: dict[Node, str]) -> str:
    """The node's value written out from weight names and literals: equal strings, equal values."""
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = node.target
        else:
            args = pytree.tree_map_only(Node, lambda n: _Literal(_expression(n, memo)), (node.args, node.kwargs))
            memo[node] = f"{node.target}{args!r}"
    return memo[node]


class _Literal(str):
    def __repr__(self) -> str:
        return str(self)
