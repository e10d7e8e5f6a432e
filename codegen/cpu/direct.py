"""Calls llmc ops on CPU without the dispatcher: a loaded graph's `llmc.<op>` nodes are pointed at the op's own CPU
implementation (the Python function torch.library runs for it on CPU), so each call skips the 10-15 us the
dispatcher spends on a custom op (torch 2.13, this repo's ops: boxing, schema checks, the Python round trip).
A decode step of a small model makes hundreds of such calls: SmolLM2-135M makes 8 per layer, 240 per token.

Meaning is unchanged: on CPU torch.library would run the very same function. The graph.json still names the op
(graph_io refuses arbitrary call targets); this only rewires the in-memory GraphModule, and only on CPU, where no
other kernel is registered for these ops. Ops with a kernel registered for "cpu" use that kernel.
"""
from __future__ import annotations

import torch
from torch._library.custom_ops import OPDEFS
from torch.fx import GraphModule


def cpu_function(target):
    """The Python function that runs llmc op `target` on CPU, or None where it is not a custom op of ours."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "llmc":
        return None
    opdef = OPDEFS.get(target._schema.name)
    if opdef is None:
        return None
    return opdef._backend_fns.get("cpu") or opdef._init_fn


def call_directly(gm: GraphModule) -> int:
    """Points gm's llmc op calls at their CPU functions (gm must run on CPU); returns how many."""
    count = 0
    for node in gm.graph.nodes:
        fn = cpu_function(node.target) if node.op == "call_function" else None
        if fn is not None:
            node.target = fn
            count += 1
    if count:
        gm.recompile()
    return count
