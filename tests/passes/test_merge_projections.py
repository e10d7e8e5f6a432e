import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.trace import unlift
from llmc.passes import merge_projections, strip_asserts
from llmc.passes.pattern import PassContext

aten, llmc = torch.ops.aten, torch.ops.llmc
SOURCES = [("llmc", "qwen3", torch.float32), ("llmc", "qwen3", torch.bfloat16), ("llmc", "llama", torch.float32),
           ("llmc", "llama", torch.bfloat16), ("hf", "qwen3", torch.bfloat16), ("hf", "llama", torch.float32)]
IDS = ["qwen3-llmc-fp32", "qwen3-llmc-bf16", "llama-llmc-fp32", "llama-llmc-bf16", "qwen3-hf-bf16", "llama-hf-fp32"]


def buffers(gm) -> dict:
    return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}


@pytest.mark.parametrize("source,family,dtype", SOURCES, ids=IDS)
def test_qkv_and_gate_up_of_every_layer_become_one_gemm_each(fusion, source, family, dtype):
    L = fusion.LAYERS
    prefix = "" if source == "llmc" else "model_"
    for name, gm, inputs in fusion.graphs(source, family, dtype):
        weights, before, expected = buffers(gm), fusion.census(gm), fusion.outputs(gm, inputs)
        assert before[aten.linear.default] == 7 * L + 1 and before[aten.silu.default] == L

        assert fusion.run_passes(gm, merge_projections) == [2 * L], name
        after = fusion.census(gm)
        assert after[aten.linear.default] == 3 * L + 1  # q/k/v merged, o, down per layer; lm_head
        assert after[llmc.norm_linear.default] == L and aten.silu.default not in after
        assert after[aten.slice.Tensor] == before[aten.slice.Tensor] + 3 * L
        swiglu = [n for n in gm.graph.nodes if n.target == llmc.norm_linear.default]
        assert all(n.args[2:] == (None, 0.0, "none", "swiglu") for n in swiglu)

        kept = buffers(gm)
        for layer in range(L):
            p = f"{prefix}layers_{layer}_"
            attn = [weights[f"{p}self_attn_{x}_proj_weight"] for x in "qkv"]
            torch.testing.assert_close(kept[f"{p}self_attn_q_k_v_proj_weight"], torch.cat(attn), rtol=0, atol=0)
            mlp = [weights[f"{p}mlp_{x}_proj_weight"] for x in ("gate", "up")]
            torch.testing.assert_close(kept[f"{p}mlp_gate_up_proj_weight"], torch.cat(mlp), rtol=0, atol=0)
            if family == "llama" and source == "llmc":  # attention biases merge with their weights
                biases = [weights[f"{p}self_attn_{x}_proj_bias"] for x in "qkv"]
                torch.testing.assert_close(kept[f"{p}self_attn_q_k_v_proj_bias"], torch.cat(biases), rtol=0, atol=0)
            for x in ("self_attn_q", "self_attn_k", "self_attn_v", "mlp_gate", "mlp_up"):
                assert f"{p}{x}_proj_weight" not in kept  # the graph no longer reads them

        for got, want in zip(fusion.outputs(gm, inputs), expected, strict=True):
            torch.testing.assert_close(got, want, **fusion.tolerance(dtype))


def export(module, *inputs) -> torch.fx.GraphModule:
    with torch.no_grad():
        gm = unlift(torch.export.export(module, inputs).run_decompositions({}))
    strip_asserts.run(gm, PassContext())
    gm.recompile()
    return gm


class Projections(torch.nn.Module):
    """Four linears on one input: two biased ones that merge, a biased one whose consumer folds its last dim
    into a leading one (a view a strided slice cannot take), and an unbiased one with no partner."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 12)
        self.folded, self.plain = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):  # x [B, S, 16]
        b, s, _ = x.shape
        heads = self.a(x).view(b, s, 2, 4)
        folded = self.folded(x).view(b, s * 8)
        return heads.sum(-1), self.b(x) * 2, folded, self.plain(x)


def test_biased_linears_merge_apart_from_unbiased_ones_and_unsliceable_views():
    gm = export(Projections(), torch.randn(2, 3, 16))
    x = torch.randn(2, 3, 16)
    expected = gm(x)
    assert merge_projections.run(gm, PassContext()) == 1
    gm.graph.lint()
    gm.recompile()
    linears = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    assert sorted(n.args[1].target for n in linears) == ["a_b_weight", "folded_weight", "plain_weight"]
    merged = next(n for n in linears if n.args[1].target == "a_b_weight")
    assert merged.args[2].target == "a_b_bias" and tuple(gm.a_b_bias.shape) == (20,)
    assert not hasattr(gm, "a_weight") and not hasattr(gm, "b_bias")
    for got, want in zip(gm(x), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)


class GateUp(torch.nn.Module):
    """SwiGLU in the up-first spelling, and a look-alike whose up projection reads another input."""

    def __init__(self, dtype):
        super().__init__()
        self.gate, self.up = (torch.nn.Parameter(torch.randn(6, 16, dtype=dtype)) for _ in range(2))
        self.gate2, self.up2 = (torch.nn.Parameter(torch.randn(6, 16, dtype=dtype)) for _ in range(2))

    def forward(self, x, y):
        swiglu = F.linear(x, self.up) * F.silu(F.linear(x, self.gate))
        other_input = F.silu(F.linear(x, self.gate2)) * F.linear(y, self.up2)
        return swiglu, other_input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_in_either_order_only_on_one_input(dtype):
    gm = export(GateUp(dtype), torch.randn(5, 16, dtype=dtype), torch.randn(5, 16, dtype=dtype))
    x, y = torch.randn(7, 16, dtype=dtype), torch.randn(7, 16, dtype=dtype)
    expected, gate, up = gm(x, y), gm.gate.clone(), gm.up.clone()
    assert merge_projections.run(gm, PassContext()) == 1
    gm.recompile()
    fused = [n for n in gm.graph.nodes if n.target == llmc.norm_linear.default]
    assert len(fused) == 1 and fused[0].args[1].target == "gate_up"  # rows [gate; up], as the op expects
    torch.testing.assert_close(gm.gate_up, torch.cat([gate, up]), rtol=0, atol=0)
    assert sum(n.target == aten.silu.default for n in gm.graph.nodes) == 1
    tol = 1.3e-6 if dtype == torch.float32 else 1.6e-2
    for got, want in zip(gm(x, y), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=max(tol, 1e-5))
