"""Replaces attention by `llmc::paged_attention` (our paged step) and `llmc::causal_attention` (causal attention).

Matches (typed patterns below, traced as pattern.py does), with repeat_kv(x) = x[:, :, None].expand(...).reshape(...):
- paged: models/transformer.py's step, per layer
    sdpa(q.transpose(1, 2), repeat_kv(cat([k_layer[block_table].flatten(1, 2), k], 1).transpose(1, 2)),
         repeat_kv(<same for v>), attn_mask=M)
  where M is PagedKV.mask: cat([arange(P) < past_lens[:, None], tril(ones(S, S))], -1)[:, None], P the gathered
  length -> paged_attention(q, k, v, k_layer, v_layer, block_table, past_lens, scale, window);
- causal, q / k / v in [B, H, S, D]: sdpa(q, K, V, is_causal=True | attn_mask=C) with K = repeat_kv(k), k with
  enable_gqa=True, or k itself (MHA); eager matmul(softmax(matmul(q, K.transpose(2, 3)) * scale + A, -1, float32)
  [.to(dtype)] [dropout in eval: clone], V) with A = where(C, 0, finfo(dtype).min), where C is the mask
  transformers' create_causal_mask exports (its packed-sequence ids from position_ids, and position_ids[kv] <=
  position_ids[q]; or its sliding-window mask, also position_ids[kv] > position_ids[q] - W)
  -> causal_attention(q, k, v, scale, window) in [B, S, H, D], transposes inserted.
Proof: a mask is accepted only when its whole construction matches and it reads nothing but the inputs that make it
causal: past_lens (paged), or position_ids and index ranges that are `arange`s (transformers). Sizes are compared
symbolically (arange(P) spans exactly the gathered keys, the tril is S x S, repeat_kv views merge dims 1 and 2).
Anything else (padding masks, arbitrary attn_mask, dropout) is left alone and noted in the report.
Scale: sdpa's `scale`, the eager multiplier, or sdpa's default 1/sqrt(D). Window: a transformers sliding mask's W,
else PassContext.sliding_window (0 = full attention; our ModelConfig has no sliding window: from_hf refuses
use_sliding_window).
Sparsity: with 0 < PassContext.attention_keep < 1 the paged steps get llmc.sparse_paged_attention (keep, block =
attention_keep, attention_block: the top key blocks per query block); causal_attention stays dense (noted).
Canonicalizes first: full-range slices (x[:, :] that dynamic-shape export keeps and static pattern traces drop)
are replaced by their input.
Runs: in the fusion phase, after fold_rope (q and k may be llmc.rope outputs; any producer is fine).
Counts: one per attention replaced; dead gathers and masks go with the dead-code elimination at the end.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)

from .attention_masks import (BLOCK, MAX_BLOCKS, SIZE_OPS, B, PagedMask, S, _same, additive_mask_pattern,
                              causal_masks, paged_masks)
from .graph_weights import val
from .pattern import Match, PassContext, Pattern, replace_matches

aten, llmc = torch.ops.aten, torch.ops.llmc
SCALE = 0.0123  # sentinel traced in the softmax scale's place
FULL_END = 2**63 - 1  # the end export records for `x[:, :]`
H, HKV, D, BLOCKS = 4, 2, 8, 7  # with attention_masks' B, S, BLOCK, MAX_BLOCKS: the sizes the patterns are traced at


def repeat_kv(x, rep):
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)


def _expanded(q, k, v, kv: str):
    """(k, v, sdpa kwargs) in the kv-head form `kv`: "repeat" (repeat_kv), "gqa" (enable_gqa), "mha" (as is)."""
    if kv == "repeat":
        rep = q.shape[1] // k.shape[1]
        return repeat_kv(k, rep), repeat_kv(v, rep), {}
    return k, v, ({"enable_gqa": True} if kv == "gqa" else {})


# ---- the forms -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Form:
    kind: str  # "paged" | "sdpa" | "eager"
    kv: str  # "repeat" | "gqa" | "mha"
    masked: bool  # sdpa: attn_mask (True) or is_causal (False)
    scaled: bool  # an explicit scale in the graph (captured), else sdpa's default

    @property
    def name(self) -> str:
        mask = "" if self.kind != "sdpa" else ("_mask" if self.masked else "_is_causal")
        return f"{self.kind}_{self.kv}{mask}{'_scaled' if self.scaled else ''}"


def _variant(form: Form):
    if form.kind == "paged":
        def attend(q, k, v, k_layer, v_layer, block_table, mask, **scale):
            keys = torch.cat([k_layer[block_table].flatten(1, 2), k], 1).transpose(1, 2)
            values = torch.cat([v_layer[block_table].flatten(1, 2), v], 1).transpose(1, 2)
            qh = q.transpose(1, 2)
            keys, values, gqa = _expanded(qh, keys, values, form.kv)
            return F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, **gqa, **scale)
    elif form.kind == "sdpa":
        def attend(q, k, v, *mask, **scale):
            keys, values, gqa = _expanded(q, k, v, form.kv)
            causal = {"attn_mask": mask[0]} if mask else {"is_causal": True}
            return F.scaled_dot_product_attention(q, keys, values, **causal, **gqa, **scale)
    else:
        def attend(q, k, v, mask, scale):
            keys, values, _ = _expanded(q, k, v, form.kv)
            weights = torch.matmul(q, keys.transpose(2, 3)) * scale
            weights = F.softmax(weights + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(F.dropout(weights, p=0.0, training=False), values)
    attend.__name__ = form.name
    return attend


def _examples(form: Form, dtype: torch.dtype) -> tuple:
    heads, kv_heads = (H, HKV) if form.kv != "mha" else (HKV, HKV)
    if form.kind == "paged":
        past = MAX_BLOCKS * BLOCK
        return (torch.randn(B, S, heads, D, dtype=dtype), torch.randn(B, S, kv_heads, D, dtype=dtype),
                torch.randn(B, S, kv_heads, D, dtype=dtype), torch.randn(BLOCKS, BLOCK, kv_heads, D, dtype=dtype),
                torch.randn(BLOCKS, BLOCK, kv_heads, D, dtype=dtype), torch.randint(0, BLOCKS, (B, MAX_BLOCKS)),
                torch.ones(B, 1, S, past + S, dtype=torch.bool))
    qkv = (torch.randn(B, heads, S, D, dtype=dtype), torch.randn(B, kv_heads, S, D, dtype=dtype),
           torch.randn(B, kv_heads, S, D, dtype=dtype))
    if form.kind == "eager":
        return (*qkv, torch.randn(B, 1, S, S, dtype=dtype))
    return (*qkv, torch.ones(B, 1, S, S, dtype=torch.bool)) if form.masked else qkv


FORMS = [Form("paged", kv, True, scaled) for kv in ("repeat", "mha") for scaled in (False, True)]
FORMS += [Form("sdpa", kv, masked, scaled) for kv in ("repeat", "gqa", "mha") for masked in (True, False)
          for scaled in (True, False)]
FORMS += [Form("eager", kv, True, True) for kv in ("repeat", "mha")]


@functools.cache
def attention_pattern(form: Form, dtype: torch.dtype) -> Pattern:
    """Traced on first use, for the dtypes a graph holds only (each trace is an export)."""
    return Pattern(form.name, [_variant(form)], lambda d: _examples(form, d), dtypes=(dtype,),
                   scalars={"scale": SCALE} if form.scaled else None, extra_check=_views_are_repeats_and_flattens,
                   free_literal_ops=SIZE_OPS)


def _views_are_repeats_and_flattens(match: Match) -> bool:
    """The size literals are free: every expand must be repeat_kv's (size 1 -> rep at dim 2, all else kept) and
    every view a flatten(1, 2) (of the gathered blocks, or of repeat_kv)."""
    for node in match.nodes:
        if node.target == aten.expand.default:
            before, after = val(node.args[0]).shape, val(node).shape
            if len(before) != 5 or before[2] != 1 or not _same(before[:2] + before[3:], after[:2] + after[3:]):
                return False
        elif node.target in (aten.view.default, aten._unsafe_view.default):
            before, after = val(node.args[0]).shape, val(node).shape
            if not _same([before[0], before[1] * before[2], *before[3:]], after):
                return False
    return True


# ---- the pass --------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    op: object  # llmc.paged_attention.default | llmc.sparse_paged_attention.default | llmc.causal_attention.default
    inputs: list[Node]  # the op's tensor inputs, q / k / v as the pattern sees them
    scale: float
    window: int
    sparsity: tuple = ()  # sparse_paged_attention's (keep, block)


def run(gm: GraphModule, ctx: PassContext) -> int:
    graph = gm.graph
    anchors = [n for n in graph.nodes if n.target in (aten.scaled_dot_product_attention.default, aten.softmax.int)]
    if not anchors:
        return 0
    _drop_full_slices(graph)
    targets = {n.target for n in graph.nodes}  # mask patterns are traced only where their ops occur
    paged = paged_masks(graph) if aten.tril.default in targets else {}
    causal = causal_masks(graph) if aten.diff.default in targets else {}
    dtypes = sorted({val(n.args[0]).dtype for n in anchors if val(n.args[0]) is not None}, key=str)
    if causal:  # eager attention adds where(mask, 0, finfo.min)
        causal.update({m.outputs[0]: causal[m.inputs["mask"]] for dtype in dtypes
                       for m in additive_mask_pattern(dtype).find(graph) if m.inputs["mask"] in causal})
    rejected: dict[Node, str] = {}  # attention left alone -> why (a later, smaller form may still take it)
    count = 0
    for form in FORMS:
        masks = paged if form.kind == "paged" else causal if form.masked else True
        if not masks or not any(_may_match(form, n) for n in graph.nodes):
            continue
        for dtype in dtypes:
            plans = {}
            for match in attention_pattern(form, dtype).find(graph):
                plan = _plan(form, match, paged, causal, ctx)
                if isinstance(plan, str):
                    rejected[match.outputs[0] if form.kind != "eager" else _softmax(match)] = plan
                else:
                    plans[id(match)] = (match, plan)
            count += replace_matches(gm, form.name, [m for m, _ in plans.values()],
                                     lambda m, plans=plans: _build(m, plans[id(m)][1]))
    if 0 < ctx.attention_keep < 1 and any(n.target == llmc.causal_attention.default for n in graph.nodes):
        dense = (f"attention sparsity (keep {ctx.attention_keep}) applies to paged steps only: causal_attention "
                 "(the torch.compile backend's) stays dense")
        if dense not in ctx.notes:  # once: one context serves the prefill and the decode graph
            ctx.note(dense)
    kept = {w for w in causal.values() if w and ctx.sliding_window and w != ctx.sliding_window}
    if kept:
        ctx.note(f"layers with the model's own sliding window ({', '.join(map(str, sorted(kept)))}) keep it; "
                 f"--sliding-window {ctx.sliding_window} applies to the full-attention layers")
    alive = set(graph.nodes)
    left = [n for n in anchors if n in alive and (n in rejected or n.target != aten.softmax.int)]
    for node in left:
        ctx.note(f"{node.name} left as it is: {rejected.get(node, _unmatched(node))}")
    graph.eliminate_dead_code()
    return count


def _unmatched(anchor: Node) -> str:
    if anchor.target == aten.scaled_dot_product_attention.default and _sdpa_args(anchor).get("attn_mask") is not None:
        return "its attn_mask is not one block_attention proves causal (the paged-step or transformers' causal mask)"
    return "not an attention form block_attention knows"


def _sdpa_args(node: Node) -> dict:
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), node.args))
    return {**args, **node.kwargs}


def _may_match(form: Form, anchor: Node) -> bool:
    """A cheap look at the anchor, so only the forms a graph can hold are traced."""
    if form.kind == "eager":
        return anchor.target == aten.softmax.int
    if anchor.target != aten.scaled_dot_product_attention.default:
        return False
    args = _sdpa_args(anchor)
    return ((args.get("attn_mask") is not None) == form.masked
            and (args.get("scale") is not None) == form.scaled
            and bool(args.get("enable_gqa")) == (form.kv == "gqa"))


def _softmax(match: Match) -> Node:
    return next(n for n in match.nodes if n.target == aten.softmax.int)


def _plan(form: Form, match: Match, paged: dict[Node, PagedMask], causal: dict[Node, int],
          ctx: PassContext) -> _Plan | str:
    """What to call for this match, or why it is left alone."""
    window = ctx.sliding_window
    q, k = match.val("q"), match.val("k")
    if q.dim() != 4 or k.dim() != 4:
        return "its query or keys are not 4-d ([B, H, S, D] or [B, S, H, D])"
    if form.scaled:
        scale = match.scalars["scale"]
    elif isinstance(q.shape[-1], int):
        scale = 1.0 / math.sqrt(q.shape[-1])  # sdpa's default
    else:
        return "its head size is symbolic, so its default scale is unknown"
    if form.kind == "paged":
        mask = paged.get(match.inputs["mask"])
        if mask is None:
            return "its mask is not the paged-step mask (cached tokens < past_lens, then causal)"
        gathered = [val(n).shape[1] for n in match.nodes
                    if n.target == aten.view.default and n.args[0].target == aten.index.Tensor]
        if not (_same([q.shape[0], q.shape[1], k.shape[1]], [val(mask.past_lens).shape[0], mask.seq, mask.seq])
                and len(gathered) == 2 and _same(gathered, [mask.past, mask.past])):
            return "its mask does not span the gathered cache and the new tokens"
        inputs = [*(match.inputs[n] for n in ("q", "k", "v", "k_layer", "v_layer", "block_table")), mask.past_lens]
        if 0 < ctx.attention_keep < 1:
            return _Plan(llmc.sparse_paged_attention.default, inputs, float(scale), window,
                         (float(ctx.attention_keep), int(ctx.attention_block)))
        return _Plan(llmc.paged_attention.default, inputs, float(scale), window)
    if not _same([q.shape[2]], [k.shape[2]]):
        return "queries and keys differ in length (not self-attention over one sequence)"
    if form.masked:
        mask = match.inputs["mask"]
        if mask not in causal:
            return "its attn_mask is not provably causal"
        if not _same(val(mask).shape[-2:], [q.shape[2], q.shape[2]]):
            return "its causal mask does not cover the query length"
        window = causal[mask] or window
    return _Plan(llmc.causal_attention.default, [match.inputs[n] for n in ("q", "k", "v")], float(scale), window)


def _build(match: Match, plan: _Plan) -> Node:
    graph = match.graph
    if plan.op != llmc.causal_attention.default:  # our paged step is [B, S, H, D] already
        out = graph.call_function(plan.op, (*plan.inputs, plan.scale, plan.window, *plan.sparsity))
    else:
        out = graph.call_function(plan.op, (*(_seq_major(graph, x) for x in plan.inputs), plan.scale, plan.window))
    return graph.call_function(aten.transpose.int, (out, 1, 2))  # what attention returned: [B, H, S, D]


def _seq_major(graph: Graph, node: Node) -> Node:
    """[B, H, S, D] -> [B, S, H, D]: the tensor a transpose(1, 2) was taken of, or a new transpose."""
    if node.target == aten.transpose.int and {d % 4 for d in node.args[1:]} == {1, 2} and val(node).dim() == 4:
        return node.args[0]
    return graph.call_function(aten.transpose.int, (node, 1, 2))


def _drop_full_slices(graph: Graph) -> None:
    for node in list(graph.nodes):
        if node.target != aten.slice.Tensor or node.kwargs or val(node) is None or val(node.args[0]) is None:
            continue
        given, defaults = node.args[1:], (0, None, None, 1)
        _, start, end, step = (*given, *defaults[len(given):])
        if start in (None, 0) and end in (None, FULL_END) and step == 1 \
                and _same(val(node).shape, val(node.args[0]).shape):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
