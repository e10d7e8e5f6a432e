"""Removes the assertion nodes torch.export leaves in a graph.

Matches: `aten._assert_tensor_metadata` (one per `.to()` / `.float()`, even a no-op one), `aten._assert_scalar`
and `aten._assert_async` (runtime checks of symbolic sizes), `aten.sym_constrain_range[_for_size]`, and the
`torch._assert` / `torch._assert_async` calls of symbolically traced graphs.
Assumes: the graph's inputs are validated elsewhere (the runtime checks shapes and dtypes once per step), so
the checks only cost kernel launches and host syncs. The nodes that fed only an assertion become dead; the
pipeline's dead-code elimination removes them.
Runs: first, before any pattern pass: an assertion that reads an intermediate value is an extra user of it,
and a subgraph with an outside user cannot be fused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pattern.py imports this module to clean its traced patterns
    from .pattern import PassContext

ASSERTION_TARGETS = frozenset({
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten.sym_constrain_range.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch._assert,
    torch._assert_async,
})


def remove_assertions(graph: torch.fx.Graph) -> int:
    """Erases every assertion node of `graph` (they have no users: they return None) and returns how many."""
    assertions = [n for n in graph.nodes if n.op == "call_function" and n.target in ASSERTION_TARGETS]
    for node in assertions:
        graph.erase_node(node)
    return len(assertions)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    return remove_assertions(gm.graph)
