import pytest
import torch

from llmc.codegen.sparse_linear import decompress_24, prune_24
from llmc.compiler.trace import unlift
from llmc.passes import fuse_add_norm, fuse_norm_linear, merge_projections, sparsify
from llmc.passes.calibrate import Gemm, gemms
from llmc.passes.pattern import PassContext
from llmc.passes.quant_config import Int8Config, QuantPolicy, layer_kind
from llmc.passes.sparsify import SparsityConfig
from llmc.passes.options import CompileOptions

aten, llmc = torch.ops.aten, torch.ops.llmc
FUSION = (merge_projections, fuse_add_norm, fuse_norm_linear)


def run_sparsify(gm, ctx) -> int:
    count = sparsify.run(gm, ctx)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return count


def fused_graphs(fusion, dtype=torch.float32):
    """Our tiny Qwen3's prefill and decode graphs after the fusion passes, with fresh inputs."""
    out = []
    for name, gm, inputs in fusion.graphs("llmc", "qwen3", dtype):
        fusion.run_passes(gm, *FUSION)
        out.append((name, gm, inputs))
    return out


def run_graph(gm, inputs):
    with torch.no_grad():
        return list(gm(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)))


def compressed(gm) -> dict:
    """source weight name -> (values, meta) of every compressed weight the graph reads."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return {name.removesuffix("__24_values"): (getattr(gm, name), getattr(gm, name.replace("values", "meta")))
            for name in read if name.endswith("__24_values")}


def test_config_checks_its_fields_and_round_trips():
    config = SparsityConfig(method="wanda", kinds=["mlp"])
    assert config.kinds == ("mlp",)
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["version"] == SparsityConfig.VERSION
    for bad in (dict(pattern="4:8"), dict(method="random"), dict(kinds=("lm_head",)), dict(kinds=())):
        with pytest.raises(ValueError):
            SparsityConfig(**bad)
    with pytest.raises(ValueError, match="rebuild"):
        SparsityConfig.from_dict({**config.to_dict(), "version": 0})


def test_config_from_a_quantization_policys_sparsity_table():
    policy = QuantPolicy(rules={"attention": Int8Config()}, sparsity={"mlp": "2:4"})
    assert SparsityConfig.from_policy(policy, method="wanda") == SparsityConfig(method="wanda", kinds=("mlp",))
    assert SparsityConfig.from_policy(QuantPolicy(sparsity={"default": "2:4"})).kinds == ("mlp", "attention", "other")
    assert SparsityConfig.from_policy(QuantPolicy(rules={"default": Int8Config()})) is None
    with pytest.raises(ValueError, match="lm_head"):
        SparsityConfig.from_policy(QuantPolicy(sparsity={"lm_head": "2:4"}))


def test_without_a_config_the_graph_is_left_alone(fusion):
    _, gm, _ = fused_graphs(fusion)[0]
    before = fusion.census(gm)
    assert run_sparsify(gm, PassContext()) == 0
    assert fusion.census(gm) == before


@pytest.mark.parametrize("kinds,attention,mlp", [(("mlp", "attention"), True, True), (("mlp",), False, True),
                                                 (("attention",), True, False)])
def test_selected_kinds_become_sparse_linears_and_lm_head_stays_dense(fusion, kinds, attention, mlp):
    L = fusion.LAYERS
    for name, gm, _ in fused_graphs(fusion):
        ctx = PassContext(options=CompileOptions(sparsity=SparsityConfig(kinds=kinds)))
        want = 2 * L * (attention + mlp)  # q_k_v and o per layer; gate_up and down per layer
        assert run_sparsify(gm, ctx) == want, name
        after = fusion.census(gm)
        assert after.get(llmc.sparse_linear.default, 0) == want
        # dense: every unselected GEMM and the lm_head, an add_norm_linear reading the last layer's sum
        remaining = gemms(gm)
        assert {layer_kind(g.weight.target) for g in remaining} == {"lm_head"} | (set(("attention", "mlp")) -
                                                                                 set(kinds))
        assert len(remaining) == 1 + 4 * L - want
        assert any("sparsity" in note for note in ctx.notes)
        # the merged gate/up keeps its SwiGLU epilogue, the fused norms their prologue
        sparse = [n for n in gm.graph.nodes if n.target == llmc.sparse_linear.default]
        if mlp:
            assert sum(n.args[6] == "swiglu" for n in sparse) == L
        assert all(n.args[5] in ("rms", "none") for n in sparse)


def test_sparse_graph_equals_the_graph_with_pruned_dense_weights(fusion):
    sparse_graphs, dense_graphs = fused_graphs(fusion), fused_graphs(fusion)
    for (name, gm, inputs), (_, reference, _) in zip(sparse_graphs, dense_graphs):
        originals = {g.weight.target: getattr(gm, g.weight.target).clone()
                     for g in map(Gemm.of, gm.graph.nodes) if g is not None}
        assert run_sparsify(gm, PassContext(options=CompileOptions(sparsity=SparsityConfig()))) == 4 * fusion.LAYERS
        stored = compressed(gm)
        assert len(stored) == 4 * fusion.LAYERS
        for source, (values, meta) in stored.items():
            dense = decompress_24(values, meta, originals[source].shape[1])
            per_group = (dense.reshape(dense.shape[0], -1, 4) != 0).sum(-1)
            assert bool((per_group == 2).all()), source  # exactly 2 of every 4 (random weights have no zeros)
            assert torch.equal(dense, prune_24(originals[source]))
            assert values.numel() * values.element_size() + meta.numel() < 0.6 * dense.numel() * dense.element_size()
            setattr(reference, source, prune_24(getattr(reference, source)))
        assert not any(hasattr(gm, source) for source in stored)  # the dense weights are gone
        got, want = run_graph(gm, inputs), run_graph(reference, inputs)
        assert all(bool(torch.isfinite(g).all()) for g in got)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1.3e-6, atol=1e-5)


def test_prefill_and_decode_get_the_same_tensors_under_the_same_names(fusion):
    (prefill_name, prefill, prefill_inputs), (decode_name, decode, _) = fused_graphs(fusion)
    assert (prefill_name, decode_name) == ("prefill", "decode")
    ctx = PassContext(calibration=[prefill_inputs], options=CompileOptions(sparsity=SparsityConfig(method="wanda")))
    assert run_sparsify(prefill, ctx) == 4 * fusion.LAYERS
    assert len(ctx.calibration_stats) == 4 * fusion.LAYERS
    ctx.calibration = None  # decode must reuse the prefill's measurements, not measure again
    assert run_sparsify(decode, ctx) == 4 * fusion.LAYERS
    first, second = compressed(prefill), compressed(decode)
    assert first.keys() == second.keys()
    for source in first:
        assert all(torch.equal(a, b) for a, b in zip(first[source], second[source])), source


class Block(torch.nn.Module):
    def __init__(self, width: int = 64, hidden: int = 96):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(width, hidden, bias=False)
        self.mlp.down_proj = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return self.mlp.down_proj(torch.nn.functional.silu(self.mlp.up_proj(x)))


def traced(block: Block, x: torch.Tensor) -> torch.fx.GraphModule:
    with torch.no_grad():
        return unlift(torch.export.export(block, (x,)).run_decompositions({}))


def salient_inputs(rows: int, channel_scale: torch.Tensor) -> torch.Tensor:
    return torch.randn(rows, channel_scale.numel()) * channel_scale


class Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(64, 96, bias=False)

    def forward(self, x):
        return self.mlp.up_proj(x)


def test_wanda_keeps_the_output_closer_than_magnitude_with_salient_input_channels():
    layer = Projection().eval()
    # A few outlier channels, as LLM activations have; one per group of 4 at most, so keeping them all is
    # possible (with 3 in one group, both methods must drop one and the gap narrows to about 2x).
    salient = torch.randperm(16)[:6] * 4 + torch.randint(0, 4, (6,))
    scale = torch.ones(64)
    scale[salient] = 25.0
    calibration, held_out = salient_inputs(256, scale), salient_inputs(128, scale)
    with torch.no_grad():
        want = layer(held_out)
    errors = {}
    for method in ("magnitude", "wanda"):
        gm = traced(layer, calibration[:4])
        ctx = PassContext(calibration=[(calibration,)], options=CompileOptions(sparsity=SparsityConfig(method=method)))
        assert run_sparsify(gm, ctx) == 1
        with torch.no_grad():
            (got,) = gm(held_out)
        errors[method] = float((got - want).norm() / want.norm())
    assert errors["wanda"] < 0.4 * errors["magnitude"], errors  # measured: about 0.15


def test_wanda_without_calibration_asks_for_it():
    gm = traced(Block().eval(), torch.randn(2, 64))
    with pytest.raises(ValueError, match="calibration"):
        sparsify.run(gm, PassContext(options=CompileOptions(sparsity=SparsityConfig(method="wanda"))))


def test_weights_of_a_width_not_divisible_by_8_stay_dense():
    block = Block(width=60).eval()
    x = torch.randn(5, 60)
    gm = traced(block, x)
    ctx = PassContext(options=CompileOptions(sparsity=SparsityConfig()))
    assert run_sparsify(gm, ctx) == 1  # down_proj (K = 96); up_proj has K = 60
    assert any("mlp_up_proj_weight stays dense" in note for note in ctx.notes)
    with torch.no_grad():
        reference = Block(width=60).eval()
        reference.load_state_dict(block.state_dict())
        reference.mlp.down_proj.weight.copy_(prune_24(block.mlp.down_proj.weight))
        torch.testing.assert_close(gm(x)[0], reference(x), rtol=1.3e-6, atol=1e-5)


def test_meta_weights_are_sparsified_by_shape_even_with_wanda():
    with torch.device("meta"):
        block = Block().to(torch.bfloat16)
        gm = traced(block, torch.empty(3, 64, dtype=torch.bfloat16))
    assert run_sparsify(gm, PassContext(options=CompileOptions(sparsity=SparsityConfig(method="wanda")))) == 2
    stored = compressed(gm)
    values, meta = stored["mlp_up_proj_weight"]
    assert values.device.type == "meta" and values.shape == (96, 32) and values.dtype == torch.bfloat16
    assert meta.shape == (96, 8) and meta.dtype == torch.uint8
