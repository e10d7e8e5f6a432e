import pytest
import torch

import llmc.codegen.ops  # noqa: F401
from llmc.compiler.trace import unlift
from llmc.passes import fuse_add_norm, strip_asserts
from llmc.passes.pattern import PassContext

aten, llmc = torch.ops.aten, torch.ops.llmc
SOURCES = [("llmc", "qwen3", torch.float32), ("llmc", "qwen3", torch.bfloat16), ("llmc", "llama", torch.float32),
           ("llmc", "llama", torch.bfloat16), ("hf", "qwen3", torch.bfloat16), ("hf", "llama", torch.float32)]
IDS = ["qwen3-llmc-fp32", "qwen3-llmc-bf16", "llama-llmc-fp32", "llama-llmc-bf16", "qwen3-hf-bf16", "llama-hf-fp32"]
EXACT = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("source,family,dtype", SOURCES, ids=IDS)
def test_every_residual_add_feeding_a_norm_fuses(fusion, source, family, dtype):
    L = fusion.LAYERS
    for name, gm, inputs in fusion.graphs(source, family, dtype):
        before, expected = fusion.census(gm), fusion.outputs(gm, inputs)
        norms = (4 * L + 1) if family == "qwen3" else (2 * L + 1)  # input, post-attention[, q, k] + final
        assert before[llmc.rms_norm.default] == norms

        # layer 0's input norm reads the embedding (no add); every other decoder norm reads a residual add
        assert fusion.run_passes(gm, fuse_add_norm) == [2 * L], name
        after = fusion.census(gm)
        assert after[llmc.add_rms_norm.default] == 2 * L
        assert after[llmc.rms_norm.default] == norms - 2 * L
        assert after[aten.add.Tensor] == before[aten.add.Tensor] - 2 * L
        fused = [n for n in gm.graph.nodes if n.target == llmc.add_rms_norm.default]
        assert {n.args[3] for n in fused} == {fusion.EPS[family]}
        assert all(n.args[2].op == "get_attr" and "norm" in n.args[2].target for n in fused)
        # the residual stream reads the sum: every fused add but the last (the final norm's) has sum users
        sums_used = [any(u.args[1] == 0 for u in n.users) for n in fused]
        assert sums_used == [True] * (2 * L - 1) + [False]

        for got, want in zip(fusion.outputs(gm, inputs), expected, strict=True):
            torch.testing.assert_close(got, want, **EXACT[dtype])


class AddNorms(torch.nn.Module):
    """A residual add feeding a norm (fuses), and a broadcast add of a bias feeding one (not a residual)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(16))
        self.shift = torch.nn.Parameter(torch.randn(16))

    def forward(self, x, y):
        s = x + y
        residual = llmc.rms_norm(s, self.weight, 1e-5) + s
        shifted = llmc.rms_norm(x + self.shift, self.weight, 1e-6)
        return residual, shifted


def test_a_broadcast_add_is_not_a_residual():
    with torch.no_grad():
        gm = unlift(torch.export.export(AddNorms(), (torch.randn(4, 16), torch.randn(4, 16))).run_decompositions({}))
    strip_asserts.run(gm, PassContext())
    x, y = torch.randn(6, 16), torch.randn(6, 16)
    expected = gm(x, y)
    assert fuse_add_norm.run(gm, PassContext()) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    fused = [n for n in gm.graph.nodes if n.target == llmc.add_rms_norm.default]
    assert len(fused) == 1 and fused[0].args[3] == 1e-5
    assert sum(n.target == llmc.rms_norm.default for n in gm.graph.nodes) == 1
    for got, want in zip(gm(x, y), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
