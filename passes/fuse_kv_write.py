"""Fuses the KV-cache write into the keys' RoPE: `llmc::rope_write_kv` rotates the step's keys and stores them and
the values at their cache slots, so the runtime no longer copies new_k / new_v into the cache after the step.

Matches: every `llmc.paged_attention(q, k, v, k_layer, v_layer, block_table, past_lens, scale, window)` (or
`llmc.sparse_paged_attention`, the same arguments and keep, block) whose k is
an `llmc.rope(x, positions, cos, sin, norm_weight, eps)` node and whose k_layer / v_layer are
`aten.select(k_cache, 0, l)` / `aten.select(v_cache, 0, l)` of the graph's cache inputs, one literal l for both
(what block_attention leaves in our paged step) -> rope_write_kv(x, v, positions, cos, sin, norm_weight, eps,
k_cache, v_cache, l, slot_mapping), which takes the rope's place for every reader after it (the attention, and the
stacked new_k output, which the graph keeps returning so --check-passes still compares it).
Assumes: the graph's slot_mapping input holds each new token's flat slot (block * BS + offset, -1 for padding) in
blocks no query of the step reads below its past_lens (the runtime's block manager guarantees it: a sequence
writes only its own, unshared blocks, at positions >= past_lens), so writing before the attention is safe; the
rotated keys and v have the caches' dtype.
Skips, with a note: graphs without a slot_mapping input (torch.compile's), attention whose keys are no rope node,
cache arguments that are not one layer's select of the cache inputs, dtypes the caches cannot hold.
Runs: in the fusion phase, right after block_attention (it matches llmc.paged_attention) and before
merge_projections (which only rewires the projections that feed x and v).
Counts: one per attention whose keys now write the cache: L for an L-layer model.
Not a Pattern (passes/pattern.py): the keys' rope node has readers outside the match (the stacked new_k output),
which SubgraphMatcher refuses inside a match, and the match keys on graph inputs by name (the caches and
slot_mapping), which a traced pattern cannot express; a walk over the attention nodes says both directly.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)

from .graph_weights import finish_node, val
from .pattern import PassContext

aten, llmc = torch.ops.aten, torch.ops.llmc
CACHE_INPUTS = ("k_cache", "v_cache", "slot_mapping")
# Both read (q, k, v, k_layer, v_layer, ...) and the cache below past_lens only.
PAGED = (llmc.paged_attention.default, llmc.sparse_paged_attention.default)


def run(gm: GraphModule, ctx: PassContext) -> int:
    graph = gm.graph
    attentions = [n for n in graph.nodes if n.target in PAGED]
    if not attentions:
        return 0
    inputs = {n.target: n for n in graph.nodes if n.op == "placeholder" and n.target in CACHE_INPUTS}
    if len(inputs) != len(CACHE_INPUTS):
        missing = ", ".join(name for name in CACHE_INPUTS if name not in inputs)
        ctx.note(f"skipped: the graph has no {missing} input to write the cache through")
        return 0
    count, rotated = 0, set()
    for attention in attentions:
        plan = _plan(attention, inputs, rotated)
        if isinstance(plan, str):
            ctx.note(f"{attention.name} left as it is: {plan}")
            continue
        rope, v, layer = plan
        order = {node: i for i, node in enumerate(graph.nodes)}
        with graph.inserting_after(max(rope, v, key=order.__getitem__)):
            fused = graph.call_function(llmc.rope_write_kv.default,
                                        (*rope.args[:1], v, *rope.args[1:], inputs["k_cache"], inputs["v_cache"],
                                         layer, inputs["slot_mapping"]))
        finish_node(gm, fused, rope, "fuse_kv_write")
        order = {node: i for i, node in enumerate(graph.nodes)}
        rope.replace_all_uses_with(fused, delete_user_cb=lambda user: order[user] > order[fused])
        if rope.users:  # read before v exists: those readers keep the plain rope (computed twice)
            ctx.note(f"{rope.name} is also read before {v.name} exists and stays for those readers")
        else:
            graph.erase_node(rope)
        rotated.add(fused)
        count += 1
    return count


def _plan(attention: Node, inputs: dict[str, Node], rotated: set[Node]) -> tuple[Node, Node, int] | str:
    """(the keys' rope node, v, the layer index), or why this attention is left alone."""
    _, k, v, k_layer, v_layer = attention.args[:5]
    if k in rotated:
        return "its keys already write the cache for another attention"
    if not isinstance(k, Node) or k.target != llmc.rope.default:
        return "its keys are not an llmc.rope output (fold_rope did not run or left them unfolded)"
    layers = [_layer(k_layer, inputs["k_cache"]), _layer(v_layer, inputs["v_cache"])]
    if None in layers or layers[0] != layers[1]:
        return "its caches are not one layer's select of the k_cache / v_cache inputs"
    rotated_val, v_val, cache_val = val(k), val(v), val(inputs["k_cache"])
    if None in (rotated_val, v_val, cache_val) or not rotated_val.dtype == v_val.dtype == cache_val.dtype:
        return "its rotated keys or values do not have the cache's dtype"
    return k, v, layers[0]


def _layer(node, cache: Node) -> int | None:
    """l for `aten.select(cache, 0, l)` with a literal l >= 0, else None."""
    if not isinstance(node, Node) or node.target != aten.select.int or node.args[:2] != (cache, 0):
        return None
    layer = node.args[2]
    return layer if type(layer) is int and layer >= 0 else None
