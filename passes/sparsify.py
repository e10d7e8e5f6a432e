"""Prunes the weights of the selected GEMMs to 2:4 semi-structured sparsity and stores them compressed.

Matches, when ctx.sparsity holds a SparsityConfig, the GEMMs of passes/calibrate.py (`Gemm.of`):
`llmc.norm_linear(x, W, b, eps, norm, epilogue)`, `llmc.add_norm_linear(x, r, W, b, ...)` and `aten.linear(x, W[,
b])` with get_attr W (and b), whose layer kind (quant_config.layer_kind of W's name, the quantization policy's
kinds) is among config.kinds; the lm_head (and a tied embedding read as one) never is. Each becomes
`llmc.sparse_linear(x, W__24_values, W__24_meta, b, eps, norm, epilogue)` (an add_norm_linear becomes
`aten.add(x, r)` feeding it), with W pruned by prune_24 and compressed by compress_24 (codegen/sparse_linear.py):
- method "magnitude": keep the 2 largest |W| of every 4 along the input dim;
- method "wanda" (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): keep the
  2 largest |W[n, k]| * ||h_k||_2, h the GEMM's input after its norm prologue (the gain is already in W) over the
  calibration tokens: calibrate.collect_stats' l2_norm, measured once per weight name on the first graph that
  needs it (the prefill graph) and kept in ctx.calibration_stats, so the decode graph derives the same tensors
  under the same names (passes/graph_weights.py's naming rule).
Weights whose K is not a multiple of 8 stay dense (noted). Meta weights (a compile without weights) are pruned by
shape alone, whatever the method: the graph is the same, its values are not there to rank.
Assumes: the fusion passes ran (GEMM input dtype == weight dtype). Runs: phase "quantize", after
fuse_norm_linear and before quantize, which leaves sparse_linear alone. One rewrite per sparsified GEMM.
Not a Pattern (passes/pattern.py): as for quantize, a match is one GEMM node chosen by its weight (calibrate.Gemm).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from llmc.codegen.sparse_linear import compress_24, prune_24
from llmc.common.errors import UsageError

from .calibrate import CalibrationError, Gemm, collect_stats, gemms
from .graph_weights import add_weight, drop_unread, finish_node, read, val
from .pattern import PassContext
from .quant_config import layer_kind

aten, llmc = torch.ops.aten, torch.ops.llmc
PATTERNS = ("2:4",)
METHODS = ("magnitude", "wanda")
KINDS = ("mlp", "attention", "other")  # quant_config's kinds but lm_head, which stays dense


@dataclass(frozen=True)
class SparsityConfig:
    """Which GEMMs to prune and how (torchao style: a dataclass serialised with a version into the bundle)."""

    pattern: str = "2:4"
    method: str = "magnitude"  # magnitude | wanda (needs calibration inputs)
    kinds: tuple[str, ...] = ("mlp", "attention")  # layer kinds to sparsify; "other": weights of no known kind
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        if self.pattern not in PATTERNS:
            raise UsageError(f"sparsity pattern {self.pattern!r} is not supported; use one of {', '.join(PATTERNS)}")
        if self.method not in METHODS:
            raise UsageError(f"sparsity method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise UsageError(f"sparsity layer kinds {list(kinds)}: name one or more of {', '.join(KINDS)} (the "
                             "lm_head stays dense)")

    def to_dict(self) -> dict:
        return {"version": self.VERSION, "pattern": self.pattern, "method": self.method, "kinds": list(self.kinds)}

    @classmethod
    def from_dict(cls, data: dict) -> SparsityConfig:
        if data.get("version") != cls.VERSION:
            raise UsageError(f"sparsity config version {data.get('version')} is not {cls.VERSION}: rebuild the "
                             "bundle with this llmc")
        return cls(pattern=data["pattern"], method=data["method"], kinds=tuple(data["kinds"]))

    @classmethod
    def from_policy(cls, policy, method: str = "magnitude") -> SparsityConfig | None:
        """The config a QuantPolicy's sparsity table asks for (None: no kind is sparse)."""
        if policy.sparsity_for("lm_head") is not None:
            raise UsageError("the policy asks for a sparse lm_head; llmc keeps the lm_head dense: drop its sparsity")
        patterns = {kind: policy.sparsity_for(kind) for kind in KINDS}
        chosen = {p for p in patterns.values() if p is not None}
        if len(chosen) > 1:
            raise UsageError(f"the policy mixes sparsity patterns {sorted(chosen)}; use one pattern")
        kinds = tuple(kind for kind, p in patterns.items() if p is not None)
        return cls(pattern=chosen.pop(), method=method, kinds=kinds) if kinds else None


def _select(gm: GraphModule, config: SparsityConfig, ctx: PassContext) -> list[Gemm]:
    chosen, dense = [], {}
    for gemm in gemms(gm):
        w, x = val(gemm.weight), val(gemm.inputs[0])
        kind = layer_kind(gemm.weight.target)
        if kind not in config.kinds:
            dense[kind] = dense.get(kind, 0) + 1
        elif not w.dtype.is_floating_point or x is None or x.dtype != w.dtype:
            ctx.note(f"{gemm.weight.target} stays dense: {w.dtype} weight read by a {getattr(x, 'dtype', '?')} input")
        elif gemm.adds_residual and any(u.target is not operator.getitem for u in gemm.node.users):
            continue  # the fusion passes leave only getitem users; anything else is not ours to rewrite
        elif w.shape[1] % 8:
            ctx.note(f"{gemm.weight.target} stays dense: its {w.shape[1]} input channels are not a multiple of 8")
        else:
            chosen.append(gemm)
    if dense:
        ctx.note("dense GEMMs by kind: " + ", ".join(f"{count} {kind}" for kind, count in sorted(dense.items())))
    return chosen


def _input_norms(gm: GraphModule, ctx: PassContext, chosen: list[Gemm]) -> dict[str, torch.Tensor]:
    names = sorted({g.weight.target for g in chosen})
    missing = [name for name in names if name not in ctx.calibration_stats]
    if missing:
        if not ctx.calibration:
            raise CalibrationError("2:4 sparsity by wanda needs a calibration set: give --calibration FILE, or use "
                                   "the magnitude method")
        ctx.calibration_stats.update(collect_stats(gm, ctx.calibration, missing))
    return {name: ctx.calibration_stats[name].l2_norm for name in names}


def _sparsify(gm: GraphModule, gemm: Gemm, importance: torch.Tensor | None) -> None:
    graph, name = gm.graph, gemm.weight.target
    values, meta = compress_24(prune_24(read(gm, gemm.weight), importance))
    with graph.inserting_before(gemm.node):
        values_node = add_weight(gm, f"{name}__24_values", values)
        meta_node = add_weight(gm, f"{name}__24_meta", meta)
        x = graph.call_function(aten.add.Tensor, tuple(gemm.inputs)) if gemm.adds_residual else gemm.inputs[0]
        out = graph.call_function(llmc.sparse_linear.default, (x, values_node, meta_node, gemm.bias, gemm.eps,
                                                               gemm.norm, gemm.epilogue))
    if not gemm.adds_residual:
        finish_node(gm, out, gemm.node, "sparsify")
        gemm.node.replace_all_uses_with(out)
    else:
        for user in list(gemm.node.users):  # the getitems of add_norm_linear's (sum, output)
            fresh = x if user.args[1] == 0 else out
            finish_node(gm, fresh, user, "sparsify")
            user.replace_all_uses_with(fresh)
            graph.erase_node(user)
    graph.erase_node(gemm.node)


def run(gm: GraphModule, ctx: PassContext) -> int:
    config = ctx.sparsity
    if config is None:
        return 0
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"ctx.sparsity must be a SparsityConfig, got {type(config).__name__}")
    chosen = _select(gm, config, ctx)
    on_meta = any(read(gm, g.weight).device.type == "meta" for g in chosen)
    norms = _input_norms(gm, ctx, chosen) if config.method == "wanda" and chosen and not on_meta else {}
    for gemm in chosen:
        name = gemm.weight.target
        w = read(gm, gemm.weight)
        importance = w.abs().float() * norms[name].to(w.device) if name in norms else None
        _sparsify(gm, Gemm.of(gemm.node), importance)  # read again: its input may be a GEMM rewritten since
    drop_unread(gm, {g.weight.target for g in chosen})
    if chosen:
        ctx.note(f"{config.pattern} sparsity ({config.method}): {len(chosen)} GEMMs of kinds "
                 f"{', '.join(config.kinds)} pruned and stored compressed")
    return len(chosen)
