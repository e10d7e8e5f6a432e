import pytest
import torch

from llmc.compiler.trace import trace, unlift
from llmc.models import ModelConfig, Transformer
from llmc.passes import fuse_add_norm, fuse_norm_linear, fuse_rms_norm, merge_projections, strip_asserts
from llmc.passes.pattern import PassContext

aten, llmc = torch.ops.aten, torch.ops.llmc
SOURCES = [("llmc", "qwen3", torch.float32), ("llmc", "qwen3", torch.bfloat16), ("llmc", "llama", torch.float32),
           ("llmc", "llama", torch.bfloat16), ("hf", "qwen3", torch.bfloat16), ("hf", "llama", torch.float32)]
IDS = ["qwen3-llmc-fp32", "qwen3-llmc-bf16", "llama-llmc-fp32", "llama-llmc-bf16", "qwen3-hf-bf16", "llama-hf-fp32"]
FUSION = (merge_projections, fuse_add_norm, fuse_norm_linear)


def tensors(gm) -> dict:
    return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}


def qk_norms(family: str, layers: int) -> int:
    return 2 * layers if family == "qwen3" else 0  # they feed the rotation, not a linear: they stay


@pytest.mark.parametrize("source,family,dtype", SOURCES, ids=IDS)
def test_alone_every_decoder_norm_moves_into_its_linears(fusion, source, family, dtype):
    L = fusion.LAYERS
    prefix = "" if source == "llmc" else "model_"
    for name, gm, inputs in fusion.graphs(source, family, dtype):
        weights, expected = {k: v.clone() for k, v in tensors(gm).items()}, fusion.outputs(gm, inputs)
        embedding = next(n for n in gm.graph.nodes if n.target == aten.embedding.default).args[0].target

        # input, post-attention and final norm; the final one through the last-token gather / slices
        assert fusion.run_passes(gm, fuse_norm_linear) == [2 * L + 1], name
        after = fusion.census(gm)
        assert after[llmc.norm_linear.default] == 5 * L + 1  # q, k, v, gate, up per layer; lm_head
        assert after.get(llmc.rms_norm.default, 0) == qk_norms(family, L)
        assert after[aten.linear.default] == 2 * L  # o and down read no norm
        fused = [n for n in gm.graph.nodes if n.target == llmc.norm_linear.default]
        assert all(n.args[3:] == (fusion.EPS[family], "rms", "none") for n in fused)

        kept = tensors(gm)
        gain = weights[f"{prefix}layers_0_input_layernorm_weight"].float()
        q = weights[f"{prefix}layers_0_self_attn_q_proj_weight"]
        folded = kept[f"{prefix}layers_0_self_attn_q_proj_weight__{prefix}layers_0_input_layernorm_weight"]
        torch.testing.assert_close(folded, (q.float() * gain).to(dtype), rtol=0, atol=0)
        assert f"{prefix}layers_0_input_layernorm_weight" not in kept
        assert f"{prefix}layers_0_self_attn_q_proj_weight" not in kept
        # tied lm_head: the fold is a new tensor, the embedding keeps the unscaled one
        torch.testing.assert_close(kept[embedding], weights[embedding], rtol=0, atol=0)

        fusion.assert_model_outputs_close(fusion.outputs(gm, inputs), expected, dtype)


@pytest.mark.parametrize("source,family,dtype", SOURCES, ids=IDS)
def test_after_merging_each_norm_is_one_gemm_with_its_residual_add(fusion, source, family, dtype):
    L = fusion.LAYERS
    for name, gm, inputs in fusion.graphs(source, family, dtype):
        expected = fusion.outputs(gm, inputs)
        assert fusion.run_passes(gm, *FUSION) == [2 * L, 2 * L, 2 * L + 1], name
        after = fusion.census(gm)
        # layer 0's q/k/v reads the embedding's norm: norm_linear; every later norm reads a residual add
        assert after[llmc.add_norm_linear.default] == 2 * L and after[llmc.norm_linear.default] == 1
        assert llmc.add_rms_norm.default not in after and aten.silu.default not in after
        assert after.get(llmc.rms_norm.default, 0) == qk_norms(family, L)
        assert after[aten.linear.default] == 2 * L
        epilogues = [n.args[-1] for n in gm.graph.nodes if n.target == llmc.add_norm_linear.default]
        assert epilogues.count("swiglu") == L
        fusion.assert_model_outputs_close(fusion.outputs(gm, inputs), expected, dtype)


def test_a_model_without_weights_fuses_on_meta(fusion):
    L = fusion.LAYERS
    cfg = ModelConfig(family="qwen3", num_layers=L, qk_norm=True, tie_word_embeddings=True, dtype="bfloat16",
                      **fusion.SHAPE)
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    for t in trace(model, block_size=16):
        counts = fusion.run_passes(t.gm, strip_asserts, fuse_rms_norm, *FUSION)
        assert counts[2:] == [2 * L, 2 * L, 2 * L + 1], t.name
        new = [n.target for n in t.gm.graph.nodes if n.op == "get_attr" and "__" in n.target]
        assert len(new) == 2 * L + 1
        assert all(getattr(t.gm, name).device.type == "meta" for name in new)


class LayerNormMLP(torch.nn.Module):
    """A pre-norm MLP (LayerNorm -> Linear -> GELU -> Linear), and a LayerNorm whose output also feeds an add."""

    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.other_norm, self.proj = torch.nn.LayerNorm(32), torch.nn.Linear(32, 32)
        with torch.no_grad():
            for p in (self.norm.weight, self.other_norm.weight):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            self.norm.bias.copy_(0.5 * torch.randn_like(self.norm.bias))

    def forward(self, x):
        h = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        n = self.other_norm(h)
        return self.proj(n) + n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_norm_folds_gain_and_shift_into_the_linear(dtype):
    module = LayerNormMLP().to(dtype)
    with torch.no_grad():
        gm = unlift(torch.export.export(module, (torch.randn(2, 5, 32, dtype=dtype),)).run_decompositions({}))
    strip_asserts.run(gm, PassContext())
    gm.recompile()
    x = torch.randn(3, 7, 32, dtype=dtype)
    expected = gm(x)
    norms = [n for n in gm.graph.nodes if n.target in (aten.layer_norm.default, aten.native_layer_norm.default)]
    assert len(norms) == 2

    assert fuse_norm_linear.run(gm, PassContext()) == 1
    gm.graph.lint()
    gm.recompile()
    fused = [n for n in gm.graph.nodes if n.target == llmc.norm_linear.default]
    assert len(fused) == 1 and fused[0].args[4:] == ("layer", "none") and fused[0].args[3] == 1e-5
    w, b, beta = module.up.weight.float(), module.up.bias.float(), module.norm.bias.float()
    torch.testing.assert_close(getattr(gm, fused[0].args[2].target), (w @ beta + b).to(dtype), rtol=0, atol=0)
    left = [n for n in gm.graph.nodes if n.target in (aten.layer_norm.default, aten.native_layer_norm.default)]
    assert len(left) == 1  # other_norm: its output is also added, so it stays
    assert not hasattr(gm, "norm_weight") and not hasattr(gm, "up_weight")
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(gm(x), expected, rtol=tol, atol=tol)


class RmsNormLinear(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.gain = torch.nn.Parameter(1 + 0.3 * torch.randn(32, dtype=dtype))
        self.proj = torch.nn.Linear(32, 24, bias=True, dtype=dtype)

    def forward(self, x):
        return self.proj(llmc.rms_norm(x, self.gain, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_rms_norm_and_linear_match_within_the_op_tolerance(dtype):
    with torch.no_grad():
        ep = torch.export.export(RmsNormLinear(dtype), (torch.randn(4, 32, dtype=dtype),))
    gm = unlift(ep.run_decompositions({}))
    strip_asserts.run(gm, PassContext())
    x = torch.randn(9, 32, dtype=dtype)
    expected = gm(x)
    assert fuse_norm_linear.run(gm, PassContext()) == 1
    gm.recompile()
    fused = next(n for n in gm.graph.nodes if n.target == llmc.norm_linear.default)
    assert fused.args[2].target == "proj_bias" and fused.args[3:] == (1e-6, "rms", "none")
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(gm(x), expected, rtol=tol, atol=tol)
