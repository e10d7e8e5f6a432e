"""The quantize pass on a tiny Qwen3 paged step after the fusion passes, on one-GEMM graphs, and quantize_.

Error bounds. A random model amplifies a weight error: kappa = (relative logits error) / (relative weight error)
is measured per graph by adding Gaussian noise of 1% of each quantized weight's RMS (about 3-4 here). A scheme's
own error is eps = sqrt(mean_gemms(eps_w^2) + mean_gemms(eps_a^2)): eps_w the relative error of the effective
weight dequantize(q) * in_scale against the float weight, eps_a that of the per-token activation rounding on the
GEMM's inputs (a8 schemes). The quantized graph's logits must stay within 2.5 * kappa * eps of the float graph's:
measured ratios were 0.7-1.4 over every scheme, both graphs and three random models (rounding errors share a
row's scale, so they are not quite the isotropic noise kappa is measured with), while a wrong scale, zero point
or in_scale errs by O(1). Each row's cosine must be >= 1 - bound^2 (a row may err somewhat more than the whole).
The a16 schemes are also checked exactly: the graph must equal the float graph run with the effective weights.
"""
import math

import pytest
import torch
from torch import nn
from torch.export import Dim

from llmc.codegen.quant import dequantize_weight, quantize_activations
from llmc.common.targets import get_target
from llmc.compiler import pipeline
from llmc.compiler.api import check_inputs, collect_weights
from llmc.compiler.trace import PagedStep, Traced, trace, unlift
from llmc.models import ModelConfig, Transformer
from llmc.passes import quantize
from llmc.passes.calibrate import CalibrationError, collect_stats, gemms
from llmc.passes.graph_weights import read
from llmc.passes.pattern import PassContext
from llmc.passes.options import CompileOptions
from llmc.passes.quant_config import (Float8Config, Int4W4A8Config, Int4WeightOnlyConfig, Int8Config, QuantPolicy,
                                      config_for_scheme)

aten, llmc = torch.ops.aten, torch.ops.llmc
NAMES = [name for _, name, _ in pipeline.PASSES]
FUSION = NAMES[NAMES.index("fuse_rms_norm") + 1: NAMES.index("fuse_norm_linear") + 1]
G = 16  # the tiny model's K are 48 and 80
SCHEMES = {"fp8": Float8Config(), "fp8-w8a16": Float8Config(activations=False), "int8": Int8Config(0.5),
           "int8-rtn": Int8Config(0.0), "int4": Int4WeightOnlyConfig(G), "int4-awq": Int4WeightOnlyConfig(G, awq=True),
           "w4a8": Int4W4A8Config(G)}
EXPECTED = {"fp8": "fp8_w8a8", "fp8-w8a16": "fp8_w8a16", "int8": "int8_w8a8", "int8-rtn": "int8_w8a8",
            "int4": "int4_w4a16", "int4-awq": "int4_w4a16", "w4a8": "int4_w4a8"}


def fused(fusion):
    graphs = fusion.graphs("llmc", "qwen3", torch.float32)
    for _, gm, _ in graphs:
        pipeline.run_pipeline(gm, PassContext(), FUSION)
    return graphs


def prefill_inputs(fusion, count: int) -> list:
    return [fusion.graphs("llmc", "qwen3", torch.float32)[0][2] for _ in range(count)]


def quantized(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    count = quantize.run(gm, ctx)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return count


def logits(gm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return gm(*[t.clone() for t in inputs])[0]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def quant_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.target == llmc.quant_linear.default]


def effective_weights(gm) -> dict[str, torch.Tensor]:
    """Source weight name -> dequantize(q) * in_scale, the float weight each quant_linear stands for."""
    out = {}
    for node in quant_nodes(gm):
        _, q, scale, zero, in_scale, _, _, _, _, scheme, group = node.args
        w = dequantize_weight(read(gm, q), read(gm, scale), None if zero is None else read(gm, zero), scheme, group)
        out[q.target.removesuffix(f"__{scheme}_q")] = w * read(gm, in_scale) if in_scale is not None else w
    return out


def sensitivity(gm, inputs, names, noise: float = 0.01) -> float:
    """kappa: relative logits error per relative (RMS) weight error, Gaussian noise on every named weight."""
    want, ratios = logits(gm, inputs), []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        saved = {n: getattr(gm, n).clone() for n in names}
        with torch.no_grad():
            for n in names:
                w = getattr(gm, n)
                w.add_(noise * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g))
        ratios.append(relative(logits(gm, inputs), want) / noise)
        with torch.no_grad():
            for n, w in saved.items():
                getattr(gm, n).copy_(w)
    return sum(ratios) / len(ratios)


def scheme_error(plain, quant, inputs) -> float:
    """eps: RMS over GEMMs of the effective weights' and (a8) the rounded activations' relative errors."""
    weights = effective_weights(quant)
    eps_w = [relative(w, getattr(plain, name).float()) for name, w in weights.items()]
    stats = collect_stats(plain, [inputs], list(weights))
    eps_a = []
    for node in quant_nodes(quant):
        scheme, in_scale = node.args[9], node.args[4]
        if scheme.endswith("a16"):
            continue
        h = stats[node.args[1].target.removesuffix(f"__{scheme}_q")].sample
        h = h * read(quant, in_scale) if in_scale is not None else h
        values, a_scale = quantize_activations(h, scheme)
        eps_a.append(relative(values * a_scale, h))
    mean_square = sum(e * e for e in eps_w) / len(eps_w) + (sum(e * e for e in eps_a) / len(eps_a) if eps_a else 0)
    return math.sqrt(mean_square)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_quantizes_each_decoder_gemm_within_its_error_bound(fusion, scheme):
    L = fusion.LAYERS
    graphs, plains = fused(fusion), {name: gm for name, gm, _ in fused(fusion)}  # same weights, kept float
    ctx = PassContext(calibration=prefill_inputs(fusion, 2), options=CompileOptions(quant=SCHEMES[scheme]))
    calibrated = scheme in ("int8", "int4-awq")
    done = []
    for name, gm, inputs in graphs:  # prefill first, as the compiler passes them
        plain = plains[name]
        want = logits(gm, inputs)
        assert quantized(gm, ctx) == 4 * L, name  # q/k/v, o, gate/up, down per layer; lm_head kept
        census = fusion.census(gm)
        assert census[llmc.quant_linear.default] == 4 * L and aten.linear.default not in census
        assert census[llmc.add_norm_linear.default] == 1 and llmc.norm_linear.default not in census
        assert {n.args[9] for n in quant_nodes(gm)} == {EXPECTED[scheme]}
        assert any(n.args[4] is not None for n in quant_nodes(gm)) == calibrated  # in_scale only if calibrated
        got = logits(gm, inputs)
        kappa = sensitivity(plain, inputs, list(effective_weights(gm)))
        bound = 2.5 * kappa * scheme_error(plain, gm, inputs)
        assert relative(got, want) <= bound, (name, relative(got, want), bound)
        row_cosine = nn.functional.cosine_similarity(got, want, dim=-1).min()
        assert row_cosine >= 1 - bound ** 2, (name, float(row_cosine))
        if EXPECTED[scheme].endswith("a16"):  # exactly the float graph with the effective weights
            with torch.no_grad():
                for source, w in effective_weights(gm).items():
                    getattr(plain, source).copy_(w)
            torch.testing.assert_close(got, logits(plain, inputs), rtol=1e-4, atol=1e-4)
        done.append(Traced(name, gm))
        if calibrated:
            assert set(ctx.calibration_stats) == set(effective_weights(gm))
            ctx.calibration = None  # the decode graph must reuse the prefill graph's statistics
    collect_weights(done)  # raises if one name holds different tensors in the two graphs
    quantized_names = [{n.target for n in g.gm.graph.nodes if n.op == "get_attr" and n.target.endswith("_q")}
                       for g in done]
    assert quantized_names[0] == quantized_names[1] and len(quantized_names[0]) == 4 * L
    assert f"{EXPECTED[scheme]} " in ctx.notes[0] and f"{4 * L} GEMMs quantized" in ctx.notes[0]


def test_bf16_graphs_compute_what_their_effective_weights_do(fusion):
    """In bf16 the a16 schemes dequantize to bf16 and multiply as norm_linear does: the same bits."""
    for scheme in ("int4", "fp8-w8a16"):
        graphs = fusion.graphs("llmc", "qwen3", torch.bfloat16)
        _, gm, inputs = graphs[1]
        pipeline.run_pipeline(gm, PassContext(), FUSION)
        plain = fusion.graphs("llmc", "qwen3", torch.bfloat16)[1][1]
        pipeline.run_pipeline(plain, PassContext(), FUSION)
        assert quantized(gm, PassContext(options=CompileOptions(quant=SCHEMES[scheme]))) == 4 * fusion.LAYERS
        with torch.no_grad():
            for source, w in effective_weights(gm).items():
                getattr(plain, source).copy_(w.to(torch.bfloat16))
        got = logits(gm, inputs)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, logits(plain, inputs), rtol=0, atol=0)


class OneGemm(nn.Module):
    def __init__(self, weight: torch.Tensor, norm: str):
        super().__init__()
        self.weight, self.norm = nn.Parameter(weight, requires_grad=False), norm

    def forward(self, x):
        return llmc.norm_linear(x, self.weight, None, 1e-6, self.norm, "none")


def one_gemm(weight: torch.Tensor, norm: str) -> torch.fx.GraphModule:
    example = torch.randn(2, 3, weight.shape[1])
    ep = torch.export.export(OneGemm(weight, norm), (example,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    return unlift(ep.run_decompositions({}))


def one_gemm_error(weight, norm, config, channel_scale) -> tuple[float, PassContext]:
    """Relative output error of the quantized GEMM on held-out rows drawn like the calibration rows."""
    rows = lambda: torch.randn(8, 16, weight.shape[1]) * channel_scale  # noqa: E731
    ctx = PassContext(calibration=[(rows(),), (rows(),)], options=CompileOptions(quant=config))
    plain, gm = one_gemm(weight, norm), one_gemm(weight, norm)
    assert quantized(gm, ctx) == 1
    held_out = rows()
    return relative(logits(gm, (held_out,)), logits(plain, (held_out,))), ctx


def test_smoothquant_beats_round_to_nearest_int8_with_outlier_channels():
    k = 256
    weight = 0.05 * torch.randn(96, k)
    outliers = torch.ones(k)
    outliers[torch.randperm(k)[:4]] = 40.0  # a few channels 40x the rest, as LLM activations have
    smooth, _ = one_gemm_error(weight, "rms", Int8Config(0.5), outliers)
    plain, _ = one_gemm_error(weight, "rms", Int8Config(0.0), outliers)
    # per-token int8 spends its range on the outliers; migrating them into the weight cuts the error ~3x
    assert smooth < 0.5 * plain, (smooth, plain)


def test_awq_beats_round_to_nearest_int4_on_salient_channels():
    k = 256
    weight = 0.05 * torch.randn(96, k)
    salient = torch.ones(k)
    salient[torch.randperm(k)[:8]] = 8.0  # channels whose activations are 8x larger: their weights matter most
    awq, ctx = one_gemm_error(weight, "none", Int4WeightOnlyConfig(64, awq=True), salient)
    rtn, _ = one_gemm_error(weight, "none", Int4WeightOnlyConfig(64), salient)
    assert awq < 0.9 * rtn, (awq, rtn)  # measured ~0.78x
    assert "int4_w4a16 (AWQ, group 64): 1 GEMM quantized" in ctx.notes


@pytest.mark.parametrize("target,scheme,fallback", [("h100", "fp8_w8a8", False), ("l4", "fp8_w8a8", False),
                                                    ("cpu", "fp8_w8a8", False), ("a100", "fp8_w8a16", True),
                                                    ("t4", "fp8_w8a16", True)])
def test_fp8_activations_only_where_the_target_has_fp8(fusion, target, scheme, fallback):
    _, gm, _ = fused(fusion)[1]
    ctx = PassContext(target=get_target(target), options=CompileOptions(quant=Float8Config()))
    assert quantized(gm, ctx) == 4 * fusion.LAYERS
    assert {n.args[9] for n in quant_nodes(gm)} == {scheme}
    notes = [n for n in ctx.notes if "fp8 activations need sm_89+" in n]
    assert bool(notes) == fallback
    if fallback:
        tgt = get_target(target)
        assert f"{target} ({tgt.arch}) gets fp8 weights with 16-bit activations (W8A16)" in notes[0]


def test_policy_routes_layer_kinds(fusion):
    L = fusion.LAYERS
    _, gm, inputs = fused(fusion)[0]
    want = logits(gm, inputs)
    head = next(g.weight.target for g in gemms(gm) if "lm_head" in g.weight.target)
    policy = QuantPolicy({"mlp": Int4W4A8Config(G), "attention": Float8Config()})
    ctx = PassContext(target=get_target("a100"), options=CompileOptions(quant=policy))
    assert quantized(gm, ctx) == 4 * L
    by_weight = {n.args[1].target: n.args[9] for n in quant_nodes(gm)}
    assert sorted(by_weight.values()) == ["fp8_w8a16"] * 2 * L + ["int4_w4a8"] * 2 * L
    for name, scheme in by_weight.items():
        assert ("self_attn" in name) == scheme.startswith("fp8") and ("mlp" in name) == scheme.startswith("int4")
    assert [g.weight.target for g in gemms(gm)] == [head]  # lm_head untouched, still fused with its norm
    assert any("lm_head kept in 16 bits" in n for n in ctx.notes)
    assert any("a100 (sm_80) gets fp8 weights" in n for n in ctx.notes)
    assert relative(logits(gm, inputs), want) < 0.5  # finite and near: the error bounds are tested per scheme


def test_lm_head_is_quantized_when_a_policy_names_it(fusion):
    L = fusion.LAYERS
    _, gm, inputs = fused(fusion)[0]
    policy = QuantPolicy({"lm_head": Int8Config(0.0)})
    ctx = PassContext(options=CompileOptions(quant=policy))
    assert quantized(gm, ctx) == 1
    census = fusion.census(gm)
    # 2L add_norm_linear before (every norm after the first reads a residual add; lm_head's is one of them)
    assert census[llmc.add_norm_linear.default] == 2 * L - 1
    assert census[llmc.quant_linear.default] == 1 and census[llmc.norm_linear.default] == 1
    assert census[aten.linear.default] == 2 * L and not any("lm_head kept" in n for n in ctx.notes)
    node = quant_nodes(gm)[0]
    assert node.args[0].target == aten.add.Tensor and node.args[7:9] == ("rms", "none")
    assert torch.isfinite(logits(gm, inputs)).all()


def test_mixed_policy_skips_gemms_the_group_does_not_divide(fusion):
    L = fusion.LAYERS
    _, gm, _ = fused(fusion)[0]
    ctx = PassContext(target=get_target("h100"), options=CompileOptions(quant=config_for_scheme("mixed")))  # w4a8 group 128 > K
    assert quantized(gm, ctx) == 2 * L
    assert {n.args[9] for n in quant_nodes(gm)} == {"fp8_w8a8"}
    skipped = next(n for n in ctx.notes if "skipped" in n)
    assert skipped.startswith(f"int4_w4a8 (RTN, group 128): skipped {2 * L}, input channels not a multiple of 128")
    assert "layers_0_mlp_down_proj_weight (K=80)" in skipped


def test_calibrated_schemes_need_calibration_and_weights(fusion):
    _, gm, _ = fused(fusion)[0]
    with pytest.raises(CalibrationError, match="SmoothQuant alpha 0.5.*needs a calibration set.*--calibration"):
        quantize.run(gm, PassContext(options=CompileOptions(quant=Int8Config(0.5))))


def test_a_model_without_weights_quantizes_to_meta_tensors_of_the_right_shapes(fusion):
    L = 1
    cfg = ModelConfig(family="qwen3", num_layers=L, qk_norm=True, tie_word_embeddings=True, **fusion.SHAPE)
    with torch.device("meta"):
        model = Transformer(cfg)
    gm = trace(model.eval(), block_size=16)[0].gm
    pipeline.run_pipeline(gm, PassContext(), NAMES[:NAMES.index("fuse_norm_linear") + 1])
    with pytest.raises(CalibrationError, match="needs its weights"):
        quantize.run(gm, PassContext(calibration=[()], options=CompileOptions(quant=Int4WeightOnlyConfig(G, awq=True))))
    assert quantized(gm, PassContext(options=CompileOptions(quant=Int4WeightOnlyConfig(G)))) == 4 * L
    for node in quant_nodes(gm):
        q, scale, zero = (read(gm, a) for a in node.args[1:4])
        n, k = node.args[1].meta["val"].shape[0], node.args[1].meta["val"].shape[1] * 2
        assert q.device.type == "meta" and (q.dtype, scale.dtype, zero.dtype) == (torch.uint8, torch.float32,
                                                                                    torch.uint8)
        assert q.shape == (n, k // 2) and scale.shape == zero.shape == (n, k // G) and node.args[10] == G


def test_quantize_on_modules_matches_the_effective_weights(fusion):
    cfg = ModelConfig(family="qwen3", num_layers=1, qk_norm=True, tie_word_embeddings=False, **fusion.SHAPE)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    step = PagedStep(model)
    calibration = [check_inputs(model, "prefill", 64, seed=s) for s in (1, 2)]
    inputs = check_inputs(model, "prefill", 64, seed=3)
    with pytest.raises(CalibrationError, match="calibration_inputs"):
        quantize.quantize_(step, Int4WeightOnlyConfig(G, awq=True))
    float_linears = {name: m for name, m in step.named_modules() if isinstance(m, nn.Linear)}
    notes = quantize.quantize_(step, Int4WeightOnlyConfig(G, awq=True), calibration_inputs=calibration)
    assert notes == ["int4_w4a16 (AWQ, group 16): 7 linear layers quantized"]
    swapped = {name: m for name, m in step.named_modules() if isinstance(m, quantize.QuantizedLinear)}
    assert set(swapped) == set(float_linears) - {"model.lm_head"}
    assert isinstance(step.model.lm_head, nn.Linear)
    assert any(m.in_scale is not None for m in swapped.values())  # AWQ found scales worth using
    with torch.no_grad():
        got = step(*inputs)[0]
        for name, m in swapped.items():  # the float model with the effective weights gives the same logits
            w = dequantize_weight(m.qweight, m.scale, m.zero, m.scheme, m.group_size)
            float_linears[name].weight.copy_(w * m.in_scale if m.in_scale is not None else w)
            parent, _, attr = name.rpartition(".")
            setattr(step.get_submodule(parent), attr, float_linears[name])
        torch.testing.assert_close(got, step(*inputs)[0], rtol=1e-4, atol=1e-4)


def test_quantize_on_a_graph_module_runs_the_pass(fusion):
    _, gm, inputs = fused(fusion)[1]
    notes = quantize.quantize_(gm, Int8Config(0.0))
    assert len(quant_nodes(gm)) == 4 * fusion.LAYERS and notes[0] == f"int8_w8a8 (RTN): {4 * fusion.LAYERS} GEMMs quantized"
    assert torch.isfinite(logits(gm, inputs)).all()
