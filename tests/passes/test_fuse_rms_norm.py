import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from llmc.compiler.trace import unlift
from llmc.models import ModelConfig, Transformer
from llmc.passes import fuse_rms_norm, strip_asserts
from llmc.passes.pattern import PassContext
from tests.passes.conftest import Logits, finish

LAYERS = 2
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16)
EPS = {"qwen3": 1e-6, "llama": 1e-5}  # distinct, so a wrongly captured eps shows
NORMS = {"qwen3": 4 * LAYERS + 1, "llama": 2 * LAYERS + 1}  # (input, post-attention[, q, k]) per layer + final
RSQRT, FUSED = torch.ops.aten.rsqrt.default, torch.ops.llmc.rms_norm.default


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start at ones, which would hide a dropped or misplaced weight multiply."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))


def ours(family: str, dtype: torch.dtype) -> torch.nn.Module:
    cfg = ModelConfig(family=family, num_layers=LAYERS, qk_norm=family == "qwen3", rms_norm_eps=EPS[family], **SIZES)
    return Transformer(cfg).to(dtype)


def transformers_model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    kw = dict(vocab_size=SIZES["vocab_size"], hidden_size=SIZES["hidden_size"], num_hidden_layers=LAYERS,
              intermediate_size=SIZES["intermediate_size"], num_attention_heads=SIZES["num_heads"],
              num_key_value_heads=SIZES["num_kv_heads"], head_dim=SIZES["head_dim"], rms_norm_eps=EPS[family])
    model = Qwen3ForCausalLM(Qwen3Config(**kw)) if family == "qwen3" else LlamaForCausalLM(LlamaConfig(**kw))
    return model.to(dtype)


def exported(model: torch.nn.Module) -> torch.fx.GraphModule:
    randomize_norms(model)
    with torch.no_grad():
        ep = torch.export.export(Logits(model).eval(), (torch.randint(0, SIZES["vocab_size"], (2, 7)),))
    gm = unlift(ep.run_decompositions({}))
    strip_asserts.run(gm, PassContext())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def fuse(gm) -> int:
    rewrites = fuse_rms_norm.run(gm, PassContext())
    finish(gm)
    return rewrites


# transformers' graphs in one dtype per family (each export costs seconds): its RMSNorm is spelled as ours,
# and with the two families in different dtypes both the cast and the cast-free forms are covered.
@pytest.mark.parametrize("family,build,dtype", [
    ("qwen3", ours, torch.float32), ("qwen3", ours, torch.bfloat16),
    ("llama", ours, torch.float32), ("llama", ours, torch.bfloat16),
    ("qwen3", transformers_model, torch.bfloat16), ("llama", transformers_model, torch.float32),
], ids=["qwen3-llmc-fp32", "qwen3-llmc-bf16", "llama-llmc-fp32", "llama-llmc-bf16", "qwen3-hf-bf16", "llama-hf-fp32"])
def test_every_norm_of_the_model_becomes_one_op(family, build, dtype):
    gm = exported(build(family, dtype))
    ids = torch.randint(0, SIZES["vocab_size"], (2, 7))  # fresh tokens; the export is static in shape
    before = gm(ids)
    assert count(gm, RSQRT) == NORMS[family]

    assert fuse(gm) == NORMS[family]
    assert count(gm, RSQRT) == 0 and count(gm, FUSED) == NORMS[family]
    fused = [n for n in gm.graph.nodes if n.target == FUSED]
    assert {n.args[2] for n in fused} == {EPS[family]}
    norm_weights = {n.target for n in gm.graph.nodes if n.op == "get_attr" and "norm" in n.target}
    assert {n.args[1].target for n in fused} == norm_weights
    assert all(n.meta["val"].dtype == dtype for n in fused)
    torch.testing.assert_close(gm(ids), before, rtol=1e-4, atol=1e-4)


class Norms(torch.nn.Module):
    """The weight-last spelling (no model of ours uses it, others do), and two look-alikes that are not norms."""

    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(32, dtype=dtype))
        self.rows = torch.nn.Parameter(torch.randn(5, 32, dtype=dtype))

    @staticmethod
    def normalized(x, dtype):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-3)).to(dtype)

    def forward(self, x):
        weight_last = self.normalized(x, x.dtype) * self.weight
        per_row_weight = self.rows * self.normalized(x, x.dtype)  # not a per-channel scale
        other_dtype = torch.float16 if x.dtype == torch.bfloat16 else torch.bfloat16
        cast_elsewhere = self.weight.to(other_dtype) * self.normalized(x, other_dtype)  # a rounding the op lacks
        return weight_last + per_row_weight + cast_elsewhere.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_weight_last_fuses_and_look_alikes_do_not(dtype):
    model = Norms(dtype)
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(5, 32, dtype=dtype),))
    gm = unlift(ep.run_decompositions({}))
    strip_asserts.run(gm, PassContext())
    x = torch.randn(5, 32, dtype=dtype)
    before = gm(x)
    assert count(gm, RSQRT) == 3

    assert fuse(gm) == 1
    fused = next(n for n in gm.graph.nodes if n.target == FUSED)
    assert fused.args[1].target == "weight" and fused.args[2] == 1e-3
    assert count(gm, RSQRT) == 2
    torch.testing.assert_close(gm(x), before, rtol=1e-4, atol=1e-4)
