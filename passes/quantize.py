"""Quantizes the GEMMs a config or policy selects: each becomes one `llmc.quant_linear` (codegen/quant.py).

Matches: `llmc.norm_linear`, `llmc.add_norm_linear` (-> `aten.add` for the sum, quant_linear(sum, ..., norm) for
the GEMM) and `aten.linear`, with get_attr weight and bias (calibrate.Gemm). The prologue norm and SwiGLU
epilogue stay fused; the norm's gain is already in the weight, so it is quantized with it.
Selection: `ctx.quant` is a config (every GEMM but lm_head) or a QuantPolicy (by quant_config.layer_kind of the
weight name). A handler per config type turns it into a Plan for the target (registry `HANDLERS`): FP8 W8A8
needs FP8 tensor cores (sm_89+; cpu runs the reference) and falls back to W8A16 elsewhere, with a note. int4
GEMMs whose input channels are not a multiple of the group size are skipped, with a note.
Weights (float32 arithmetic, from the weight the graph holds):
- round-to-nearest: codegen.quant.quantize_weight; works on meta tensors (a compile without weights);
- SmoothQuant (int8, alpha > 0): s_k = amax|h_k|^a / amax|W_:,k|^(1-a), W * s quantized, in_scale = 1 / s;
- AWQ (int4 weight-only): s = mean|h|^a normalised so that max(s) * min(s) = 1, a searched on the grid
  0, 0.1, ..., 1 for the least ||Q(W * s)(h / s) - W h||^2 over the sampled calibration rows (the AWQ paper's
  grid search; its weight-clipping search is left out: the scale search is what protects salient channels).
  a = 0 is plain round-to-nearest, so AWQ never does worse than RTN on the calibration sample.
Calibration statistics come from passes/calibrate.py on ctx.calibration and are kept in ctx.calibration_stats by
weight name: the decode graph, quantized after the prefill graph, reuses them and gets identical tensors.
New tensors are named `<weight>__<scheme>_q / _scale / _zero / _in_scale` (graph_weights' naming rule);
weights nothing reads any more are dropped. Runs: phase "quantize", after fuse_norm_linear and sparsify.
One rewrite per quantized GEMM.
Not a Pattern (passes/pattern.py): a match is one GEMM node (calibrate.Gemm), chosen by its weight's name and
shape; a traced one-node pattern would add tracing and matching for what Gemm.of reads off the node.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from llmc.codegen.quant import QuantizedWeight, dequantize_weight, quantize_weight
from llmc.common.targets import describe as describe_target

from .calibrate import SAMPLE_ROWS, CalibrationError, Gemm, Stats, StatsBuilder, collect_stats, gemms
from .graph_weights import add_weight, drop_unread, finish_node, read
from .options import CompileOptions
from .pattern import PassContext
from .quant_config import (Float8Config, Int4W4A8Config, Int4WeightOnlyConfig, Int8Config, Int8WeightOnlyConfig,
                           QuantPolicy, as_policy, layer_kind)

aten, llmc = torch.ops.aten, torch.ops.llmc
AWQ_GRID = tuple(i / 10 for i in range(11))
SCALE_RANGE = (1e-4, 1e4)  # smoothing scales stay within this, so an unseen channel cannot explode


@dataclass(frozen=True)
class Plan:
    """What one config means on one target: the weight format, int4's group, and how scales are found."""

    scheme: str
    group_size: int = 0  # int4 schemes only
    method: str = "rtn"  # rtn | smooth | awq
    alpha: float = 0.0  # SmoothQuant strength
    fallback: str | None = None  # what the target forced, for the report

    def describe(self) -> str:
        how = {"rtn": "RTN", "smooth": f"SmoothQuant alpha {self.alpha:g}", "awq": "AWQ"}[self.method]
        group = f", group {self.group_size}" if self.group_size else ""
        return f"{self.scheme} ({how}{group})"


HANDLERS: dict[type, Callable] = {}


def register_handler(config_type: type):
    """Registers `fn(config, target) -> Plan` for a config type (torchao's handler registry)."""
    def register(fn):
        HANDLERS[config_type] = fn
        return fn
    return register


@register_handler(Float8Config)
def _float8(config: Float8Config, target) -> Plan:
    if not config.activations:
        return Plan("fp8_w8a16")
    if target is None or not target.is_gpu or target.supports("float8_e4m3fn"):
        return Plan("fp8_w8a8")
    fallback = (f"fp8 activations need sm_89+; {describe_target(target)} gets fp8 weights with 16-bit "
                "activations (W8A16)")
    return Plan("fp8_w8a16", fallback=fallback)


@register_handler(Int8Config)
def _int8(config: Int8Config, target) -> Plan:
    return Plan("int8_w8a8", method="smooth" if config.smooth_alpha > 0 else "rtn", alpha=config.smooth_alpha)


@register_handler(Int8WeightOnlyConfig)
def _int8_weight_only(config: Int8WeightOnlyConfig, target) -> Plan:
    return Plan("int8_w8a16")


@register_handler(Int4WeightOnlyConfig)
def _int4(config: Int4WeightOnlyConfig, target) -> Plan:
    return Plan("int4_w4a16", config.group_size, "awq" if config.awq else "rtn")


@register_handler(Int4W4A8Config)
def _w4a8(config: Int4W4A8Config, target) -> Plan:
    return Plan("int4_w4a8", config.group_size)


def plan_for(config, target) -> Plan:
    return HANDLERS[type(config)](config, target)


def fits(plan: Plan, k: int) -> bool:
    return not plan.group_size or k % plan.group_size == 0


def smooth_scales(w32: torch.Tensor, amax: torch.Tensor, alpha: float) -> torch.Tensor:
    w_amax = w32.abs().amax(dim=0)
    s = amax.pow(alpha) / w_amax.pow(1 - alpha)
    dead = (amax == 0) | (w_amax == 0)  # a channel nothing flows through keeps its scale
    return torch.where(dead, 1.0, s).clamp(*SCALE_RANGE)


def awq_scales(w32: torch.Tensor, stats: Stats, plan: Plan) -> torch.Tensor | None:
    """The searched AWQ scales, or None when no exponent beats round-to-nearest (a = 0)."""
    h = stats.sample
    want = h @ w32.T
    best_error, best = None, None
    for a in AWQ_GRID:
        s = stats.mean_abs.pow(a).clamp(min=SCALE_RANGE[0])
        s = (s / (s.max() * s.min()).sqrt()).clamp(*SCALE_RANGE)
        w_hat = _dequantized(quantize_weight(w32 * s, plan.scheme, plan.group_size), plan)
        error = float(((h / s) @ w_hat.T - want).pow(2).sum())
        if best_error is None or error < best_error:
            best_error, best = error, (None if a == 0 else s)
    return best


def _dequantized(qw: QuantizedWeight, plan: Plan) -> torch.Tensor:
    return dequantize_weight(*qw, plan.scheme, plan.group_size)


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, plan: Plan, stats: Stats | None) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """(quantized weight, in_scale or None) of a [N, K] weight."""
    w32 = w.float()
    s = None
    if plan.method == "smooth":
        s = smooth_scales(w32, stats.amax, plan.alpha)
    elif plan.method == "awq":
        key = ("awq", plan.scheme, plan.group_size)
        if key not in stats.derived:
            stats.derived[key] = awq_scales(w32, stats, plan)
        s = stats.derived[key]
    if s is None:
        return quantize_weight(w32, plan.scheme, plan.group_size), None
    return quantize_weight(w32 * s, plan.scheme, plan.group_size), (1.0 / s).float()


def run(gm: GraphModule, ctx: PassContext) -> int:
    if ctx.quant is None:
        return 0
    policy = as_policy(ctx.quant)
    work, skipped, kept_head = _select(gm, policy, ctx.target)
    _calibrate(gm, ctx, work)
    for gemm, plan in work:
        # read again: an earlier rewrite may have replaced this GEMM's input (the previous GEMM's output)
        _rewrite(gm, Gemm.of(gemm.node), plan, ctx.calibration_stats.get(gemm.weight.target))
    drop_unread(gm, {g.weight.target for g, _ in work})
    _report(ctx, work, skipped, kept_head)
    return len(work)


def _select(gm: GraphModule, policy: QuantPolicy, target):
    work, skipped, kept_head = [], [], 0
    for gemm in gemms(gm):
        kind = layer_kind(gemm.weight.target)
        config = policy.config_for(kind)
        if config is None:
            kept_head += kind == "lm_head"
            continue
        if gemm.adds_residual and any(u.target is not operator.getitem for u in gemm.node.users):
            continue  # the fusion passes only leave getitem users; anything else is not ours to rewrite
        plan = plan_for(config, target)
        k = read(gm, gemm.weight).shape[1]
        (work if fits(plan, k) else skipped).append((gemm, plan))
    return work, skipped, kept_head


def _calibrate(gm: GraphModule, ctx: PassContext, work) -> None:
    needed = {g.weight.target: plan for g, plan in work if plan.method != "rtn"}
    # stats another pass collected without a row sample (sparsify's Wanda norms) do not serve AWQ's search
    missing = sorted(name for name, plan in needed.items() if name not in ctx.calibration_stats
                     or (plan.method == "awq" and not len(ctx.calibration_stats[name].sample)))
    if not missing:
        return
    what = needed[missing[0]].describe()
    if any(read(gm, g.weight).device.type == "meta" for g, _ in work if g.weight.target in needed):
        raise CalibrationError(f"{what} needs calibration, which runs the model and needs its weights: compile "
                               "with weights, or use a round-to-nearest scheme (int8-rtn, int4, w4a8)")
    if not ctx.calibration:
        raise CalibrationError(f"{what} needs a calibration set: give --calibration FILE, or use a "
                               "round-to-nearest scheme (int8-rtn, int4, w4a8)")
    rows = SAMPLE_ROWS if any(needed[name].method == "awq" for name in missing) else 0  # SmoothQuant: amax only
    ctx.calibration_stats.update(collect_stats(gm, ctx.calibration, missing, sample_rows=rows))


def _rewrite(gm: GraphModule, gemm: Gemm, plan: Plan, stats: Stats | None) -> None:
    graph, name = gm.graph, gemm.weight.target
    qw, in_scale = quantize_tensor(read(gm, gemm.weight), plan, stats)
    prefix = f"{name}__{plan.scheme}"
    with graph.inserting_before(gemm.node):
        qweight = add_weight(gm, f"{prefix}_q", qw.qweight)
        scale = add_weight(gm, f"{prefix}_scale", qw.scale)
        zero = add_weight(gm, f"{prefix}_zero", qw.zero) if qw.zero is not None else None
        inv = add_weight(gm, f"{prefix}_in_scale", in_scale) if in_scale is not None else None
        x = graph.call_function(aten.add.Tensor, tuple(gemm.inputs)) if gemm.adds_residual else gemm.inputs[0]
        y = graph.call_function(llmc.quant_linear.default, (x, qweight, scale, zero, inv, gemm.bias, gemm.eps,
                                                             gemm.norm, gemm.epilogue, plan.scheme, plan.group_size))
    if not gemm.adds_residual:
        finish_node(gm, y, gemm.node, "quantize")
        gemm.node.replace_all_uses_with(y)
    else:
        for out in list(gemm.node.users):  # getitem 0: the sum, 1: the GEMM
            new = x if out.args[1] == 0 else y
            finish_node(gm, new, out, "quantize")
            out.replace_all_uses_with(new)
            graph.erase_node(out)
        finish_node(gm, x)
        finish_node(gm, y)
    graph.erase_node(gemm.node)


def _report(ctx: PassContext, work, skipped, kept_head: int) -> None:
    plans = {plan: None for _, plan in [*work, *skipped]}
    for plan in plans:
        if plan.fallback:
            ctx.note(plan.fallback)
        done = sum(p == plan for _, p in work)
        ctx.note(f"{plan.describe()}: {done} GEMM{'s' * (done != 1)} quantized")
        missed = [g for g, p in skipped if p == plan]
        if missed:
            names = ", ".join(f"{g.weight.target} (K={g.weight.meta['val'].shape[1]})" for g in missed)
            ctx.note(f"{plan.describe()}: skipped {len(missed)}, input channels not a multiple of "
                     f"{plan.group_size}: {names}")
    if kept_head:
        ctx.note("lm_head kept in 16 bits (name lm_head in a quantization policy to quantize it)")


class QuantizedLinear(nn.Module):
    """An nn.Linear quantized by `quantize_`: calls llmc.quant_linear on its stored tensors."""

    def __init__(self, qw: QuantizedWeight, in_scale, bias, in_features: int, plan: Plan):
        super().__init__()
        self.in_features, self.out_features = in_features, qw.qweight.shape[0]
        self.scheme, self.group_size = plan.scheme, plan.group_size
        for name, tensor in (("qweight", qw.qweight), ("scale", qw.scale), ("zero", qw.zero),
                             ("in_scale", in_scale), ("bias", bias)):
            self.register_buffer(name, None if tensor is None else tensor.detach())

    def forward(self, x):
        return llmc.quant_linear(x, self.qweight, self.scale, self.zero, self.in_scale, self.bias, 0.0, "none",
                                 "none", self.scheme, self.group_size)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}"


def quantize_(model: nn.Module, config, *, target=None, calibration_inputs=None) -> list[str]:
    """torchao's Python form: quantizes `model` in place with a config or QuantPolicy and returns the notes.

    A GraphModule gets this pass. Any other module has each nn.Linear the config selects (by layer_kind of its
    qualified name) replaced by a QuantizedLinear; calibration_inputs (argument tuples for model(*args)) feed
    SmoothQuant and AWQ, observed by hooks on the linears."""
    ctx = PassContext(target=target, calibration=calibration_inputs, options=CompileOptions(quant=config))
    if isinstance(model, GraphModule):
        run(model, ctx)
        model.graph.lint()
        model.recompile()
        return ctx.notes
    policy = as_policy(config)
    chosen = {}
    for name, module in model.named_modules():
        config = policy.config_for(layer_kind(name))
        if isinstance(module, nn.Linear) and config is not None:
            plan = plan_for(config, target)
            if fits(plan, module.in_features):
                chosen[name] = (module, plan)
            else:
                ctx.note(f"{plan.describe()}: skipped {name} (K={module.in_features}, not a multiple of the group)")
    stats = _module_stats(model, {n: m for n, (m, p) in chosen.items() if p.method != "rtn"}, calibration_inputs)
    for name, (module, plan) in chosen.items():
        qw, in_scale = quantize_tensor(module.weight.detach(), plan, stats.get(name))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QuantizedLinear(qw, in_scale, module.bias, module.in_features,
                                                                   plan))
    for plan in dict.fromkeys(p for _, p in chosen.values()):
        if plan.fallback:
            ctx.note(plan.fallback)
        ctx.note(f"{plan.describe()}: {sum(p == plan for _, p in chosen.values())} linear layers quantized")
    return ctx.notes


def _module_stats(model: nn.Module, linears: dict, calibration_inputs) -> dict[str, Stats]:
    if not linears:
        return {}
    if not calibration_inputs:
        raise CalibrationError("SmoothQuant / AWQ need calibration_inputs (argument tuples for the model), or use a "
                               "round-to-nearest config")
    if any(m.weight.device.type == "meta" for m in linears.values()):
        raise CalibrationError("calibration runs the model and needs its weights; this model has none (meta)")
    builders = {name: StatsBuilder(m.in_features, SAMPLE_ROWS, i) for i, (name, m) in enumerate(linears.items())}
    hooks = [m.register_forward_pre_hook(lambda _, args, name=name: builders[name].add(args[0]))
             for name, m in linears.items()]
    try:
        with torch.no_grad():
            for inputs in calibration_inputs:
                model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: b.finish() for name, b in builders.items()}
