"""Folds the RoPE cos/sin computation into [max_len, D] float32 tables and every rotation into one `llmc::rope`.

Matches: the rotation `h * cos + rotate_half(h) * sin`, rotate_half(h) = cat(-h[..., D/2:], h[..., :D/2]), as
models/transformer.py and transformers' apply_rotary_pos_emb write it, where cos and sin are `unsqueeze(c, dim)` of
values c (cast from float32 to h's dtype, or float32 already) computed from one integer positions tensor [B, S] and
weights alone:
  - our paged step: h [B, S, H, D], cos unsqueezed on dim 2, positions = the graph's positions input;
  - transformers: h [B, H, S, D], cos unsqueezed on dim 1, positions = position_ids (an arange over S).
Tables: the float32 cos/sin subgraph is evaluated once on positions = arange(max_len): the very nodes the model
runs, so default, linear, llama3 and YaRN scaling and the attention scaling come out as the model computes them.
Only ops that treat each position on its own may appear in it (TABLE_OPS; cat only on the last dim), which makes
table row p the model's value at position p. The tables are what `llmc::rope` expects: float32, before the cast.
Norm: a per-head `llmc.rms_norm` producing h (Qwen3's q_norm / k_norm) that nothing else reads joins the op.
Layout: `llmc::rope` takes x as [B, S, H, D]. In transformers' layout h is `y.transpose(1, 2)`: the op reads y (or
the norm's input) directly and its result is transposed back; a transpose is inserted when h is no such view.
Assumes: PassContext.max_seq_len is the bundle's longest sequence (positions stay below it; the runtime ensures
it); without it the pass changes nothing and says so in the report.
Runs: after fuse_rms_norm (it matches llmc.rms_norm nodes), before fold_constants and the fusion passes.
Counts: one per rotation replaced plus one per cos/sin table pair folded: 2L + 1 for L layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)

from .graph_weights import add_weight, drop_unread, finish_node, joined_name, read, val
from .pattern import Match, PassContext, Pattern, replace_matches

aten, llmc = torch.ops.aten, torch.ops.llmc

# Ops that compute each position's value from that position alone (and weights).
TABLE_OPS = frozenset({
    aten.unsqueeze.default, aten._to_copy.default, aten.clone.default, aten.alias.default, aten.cat.default,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.add.Scalar,
    aten.sub.Tensor, aten.sub.Scalar, aten.neg.default, aten.reciprocal.default, aten.pow.Tensor_Scalar,
    aten.cos.default, aten.sin.default,
})


def rotate(h, cos, sin):
    half = h.shape[-1] // 2
    return h * cos + torch.cat((-h[..., half:], h[..., :half]), dim=-1) * sin


def _halves_of_last_dim(match: Match) -> bool:
    """The slices' bounds are free literals of the pattern (D varies): they must split h's last dim in half."""
    h = match.inputs["h"]
    size = match.val("h").shape[-1]
    if not isinstance(size, int) or size % 2:
        return False
    cat = next(n for n in match.nodes if n.target == aten.cat.default)
    neg, low = cat.args[0]
    high = neg.args[0]
    rank, half = match.val("h").dim(), size // 2
    return (_slice_of(high, h, rank) == (half, size)) and (_slice_of(low, h, rank) == (0, half))


def _slice_of(node: Node, source: Node, rank: int) -> tuple[int, int] | None:
    """(start, end) of `node` = source[..., start:end] on the last dim, ends clamped to the size, else None."""
    if node.target != aten.slice.Tensor or node.args[0] is not source or node.kwargs:
        return None
    given, defaults = node.args[1:], (0, None, None, 1)
    dim, start, end, step = (*given, *defaults[len(given):])
    size = val(source).shape[-1]
    if not all(isinstance(v, int) for v in (dim, start or 0, end or 0, step)) or dim % rank != rank - 1 or step != 1:
        return None
    return (start or 0), size if end is None else min(end, size)


PATTERN = Pattern(
    "rope",
    variants=[rotate],
    example_inputs=lambda dtype: (torch.randn(2, 3, 4, 8, dtype=dtype), torch.randn(2, 3, 1, 8, dtype=dtype),
                                  torch.randn(2, 3, 1, 8, dtype=dtype)),
    extra_check=_halves_of_last_dim,
    free_literal_ops=[aten.slice.Tensor],
)


@dataclass
class _Rotation:
    x: Node  # what llmc::rope reads: [B, S, H, D], or [B, H, S, D] when transpose_x
    transpose_x: bool
    transpose_out: bool  # transformers' layout: the op's [B, S, H, D] result goes back to [B, H, S, D]
    norm_weight: Node | None
    eps: float
    cos: Node  # the float32 values the tables replace
    sin: Node


@dataclass
class _Table:
    positions: Node
    nodes: list[Node]  # the subgraph from positions to the value, in graph order
    weights: list[Node]  # the get_attr nodes it reads


class _NotFoldable(Exception):
    pass


def run(gm: GraphModule, ctx: PassContext) -> int:
    if ctx.max_seq_len is None:
        ctx.note("skipped: no max_seq_len in the pass context, which sizes the cos/sin tables")
        return 0
    planned = [(m, r) for m in PATTERN.find(gm.graph) if (r := _plan(m)) is not None]
    # float32 value -> (get_attr of its table, the positions it is read at), or None when it cannot fold
    tables: dict[Node, tuple[Node, Node] | None] = {}
    sources: set[str] = set()
    for _, rotation in planned:
        for role, value in (("cos", rotation.cos), ("sin", rotation.sin)):
            if value not in tables:
                tables[value] = _add_table(gm, ctx, value, role, ctx.max_seq_len, sources)
    matches, by_match, pairs = [], {}, set()
    for match, rotation in planned:
        cos, sin = tables[rotation.cos], tables[rotation.sin]
        if cos is None or sin is None or cos[1] is not sin[1]:
            continue
        matches.append(match)
        by_match[id(match)] = (rotation, cos[0], sin[0], cos[1])
        pairs.add((rotation.cos, rotation.sin))

    def fused(match: Match) -> Node:
        rotation, cos_table, sin_table, positions = by_match[id(match)]
        g = match.graph
        x = g.call_function(aten.transpose.int, (rotation.x, 1, 2)) if rotation.transpose_x else rotation.x
        out = g.call_function(llmc.rope.default, (x, positions, cos_table, sin_table, rotation.norm_weight,
                                                  rotation.eps))
        return g.call_function(aten.transpose.int, (out, 1, 2)) if rotation.transpose_out else out

    rotations = replace_matches(gm, PATTERN.name, matches, fused)
    drop_unread(gm, sources | {t[0].target for t in tables.values() if t is not None})
    return rotations + len(pairs)


def _plan(match: Match) -> _Rotation | None:
    h = match.inputs["h"]
    h_val = match.val("h")
    cos, sin = _unsqueezed(match.inputs["cos"]), _unsqueezed(match.inputs["sin"])
    if h_val.dim() != 4 or cos is None or sin is None or cos[1] != sin[1] or cos[1] not in (1, 2):
        return None
    cos_value, sin_value = _float32_value(cos[0], h_val.dtype), _float32_value(sin[0], h_val.dtype)
    if cos_value is None or sin_value is None:
        return None
    inside = set(match.nodes)
    transpose_out = cos[1] == 1  # [B, 1, S, D]: transformers' [B, H, S, D] layout
    x, transpose_x, readers = h, transpose_out, inside
    if transpose_out and _is_seq_head_transpose(h) and set(h.users) <= inside:
        x, transpose_x, readers = h.args[0], False, {h}
    norm_weight, eps = None, 0.0
    if not transpose_x and x.target == llmc.rms_norm.default and set(x.users) <= readers:
        x, norm_weight, eps = x.args
    return _Rotation(x, transpose_x, transpose_out, norm_weight, eps, cos_value, sin_value)


def _unsqueezed(node: Node) -> tuple[Node, int] | None:
    if node.target != aten.unsqueeze.default:
        return None
    source, dim = node.args
    return source, dim % node.meta["val"].dim()


def _is_seq_head_transpose(node: Node) -> bool:
    return (node.target == aten.transpose.int and len(node.args) == 3
            and {d % val(node).dim() for d in node.args[1:]} == {1, 2})


def _float32_value(node: Node, dtype: torch.dtype) -> Node | None:
    """The float32 value behind a cos/sin cast to the rotated tensor's dtype (the op's arithmetic), else None."""
    value = val(node)
    if value is None or value.dtype != dtype:
        return None
    if dtype == torch.float32:
        return node
    if node.target == aten._to_copy.default and set(node.kwargs) == {"dtype"} and val(node.args[0]) is not None \
            and val(node.args[0]).dtype == torch.float32:
        return node.args[0]
    return None


def _subgraph(value: Node) -> _Table:
    """The nodes computing `value` from one integer positions tensor [B, S] and weights, or _NotFoldable."""
    nodes, weights, integers, stack = {}, {}, {}, [value]
    while stack:
        node = stack.pop()
        if node in nodes or node in weights or node in integers:
            continue
        node_val = val(node)
        if node.op == "get_attr":
            weights[node] = None
        elif node_val is not None and not node_val.is_floating_point():
            integers[node] = None
        elif node_val is None and isinstance(node.meta.get("val"), (int, torch.SymInt)):
            continue  # a size read by some op: its value is known from positions' sizes (see _sizes)
        elif node.op == "call_function" and node.target in TABLE_OPS and _per_position(node):
            nodes[node] = None
            stack.extend(node.all_input_nodes)
        else:
            raise _NotFoldable(f"{node.format_node()} is not an op fold_rope knows to act per position")
    if len(integers) != 1:
        raise _NotFoldable(f"the cos/sin values depend on {len(integers)} integer tensors, not one positions tensor")
    positions = next(iter(integers))
    # Our graphs cast positions[..., None]: the op takes the positions [B, S] themselves.
    while positions.target == aten.unsqueeze.default and val(positions).dim() > 2:
        nodes[positions] = None
        positions = positions.args[0]
    if val(positions).dim() != 2:
        raise _NotFoldable(f"positions {positions.name} is not [B, S]")
    order = {n: i for i, n in enumerate(value.graph.nodes)}
    return _Table(positions, sorted(nodes, key=order.__getitem__), list(weights))


def _per_position(node: Node) -> bool:
    if node.target != aten.cat.default:
        return True
    dim = node.args[1] if len(node.args) > 1 else 0
    return dim % val(node).dim() == val(node).dim() - 1


def _add_table(gm: GraphModule, ctx: PassContext, value: Node, role: str, max_len: int,
               sources: set[str]) -> tuple[Node, Node] | None:
    try:
        table = _subgraph(value)
        tensor = _evaluate(gm, table, value, max_len)
    except _NotFoldable as error:
        ctx.note(f"{value.name} left unfolded: {error}")
        return None
    sources.update(w.target for w in table.weights)
    base = joined_name([w.target for w in table.weights]) if table.weights else "rope"
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        attr = add_weight(gm, f"{base}_{role}_table", tensor)
    return finish_node(gm, attr), table.positions


def _evaluate(gm: GraphModule, table: _Table, value: Node, max_len: int) -> torch.Tensor:
    """`value` at positions 0 .. max_len - 1 as a [max_len, D] float32 table (meta when the weights are)."""
    weights = [read(gm, w) for w in table.weights]
    device = next((w.device for w in weights if w.device.type == "meta"), weights[0].device if weights else "cpu")
    positions_val = val(table.positions)
    env = {table.positions: torch.arange(max_len, device=device, dtype=positions_val.dtype).view(1, max_len)}
    env.update(zip(table.weights, weights))
    sizes = _sizes(positions_val, max_len)

    def lookup(arg: Node):
        if arg in env:
            return env[arg]
        return _size_value(arg, sizes)

    with torch.no_grad():
        for node in table.nodes:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lookup)
            try:
                env[node] = node.target(*args, **kwargs)
            except RuntimeError as error:
                raise _NotFoldable(f"evaluating {node.name} over {max_len} positions failed: {error}") from error
    result = env[value]
    size = val(value).shape[-1]
    if result.dtype != torch.float32 or tuple(result.shape) != (1, max_len, size):
        raise _NotFoldable(f"{value.name} over {max_len} positions gave {result.dtype} {list(result.shape)}, "
                           f"not float32 [1, {max_len}, {size}]")
    return result.reshape(max_len, size).contiguous()


def _sizes(positions: torch.Tensor, max_len: int) -> dict:
    """Symbol -> size when positions [B, S] becomes [1, max_len]."""
    sizes = {}
    for size, new in zip(positions.shape, (1, max_len)):
        if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
            sizes[size.node.expr] = new
    return sizes


def _size_value(node: Node, sizes: dict) -> int:
    size = node.meta.get("val")
    if isinstance(size, int):
        return size
    expr = size.node.expr.xreplace(sizes)
    if expr.free_symbols:
        raise _NotFoldable(f"size {node.name} does not follow from the positions' sizes")
    return int(expr)
