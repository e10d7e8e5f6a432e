"""Layer stitching: the graph replayed from a 2-layer export is the graph a whole export gives, node for node,
and computes the same outputs bit for bit."""
import warnings

import pytest
import torch

from llmc.compiler.stitch import StitchError, layer_of, stitch
from llmc.compiler.trace import PagedStep, export_step, trace
from llmc.models import ModelConfig, Transformer

CONFIGS = {
    "qwen3": ModelConfig(family="qwen3", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=5,
                         num_heads=4, num_kv_heads=2, head_dim=12, qk_norm=True, tie_word_embeddings=True),
    "llama": ModelConfig(family="llama", vocab_size=89, hidden_size=40, intermediate_size=72, num_layers=4,
                         num_heads=4, num_kv_heads=1, head_dim=10, rope_theta=500000.0, qk_norm=False),
}


def ops(gm):
    return [(n.op, str(n.target) if n.op != "get_attr" else n.target) for n in gm.graph.nodes]


def step_inputs(cfg, batch, seq, block_size=8, num_blocks=9, max_blocks=4):
    past = torch.randint(0, max_blocks * block_size - seq, (batch,))
    cache = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return (torch.randint(0, cfg.vocab_size, (batch, seq)), past[:, None] + torch.arange(seq), torch.randn(cache),
            torch.randn(cache), torch.randint(0, num_blocks, (batch, max_blocks)), past,
            torch.randint(0, seq, (batch,)), torch.full((batch, seq), -1))


@pytest.mark.parametrize("family", CONFIGS)
def test_stitched_graph_is_the_whole_export(family):
    cfg = CONFIGS[family]
    model = Transformer(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # falling back to the whole export warns: here it must not happen
        stitched = {t.name: t.gm for t in trace(model, block_size=8)}
    whole = {t.name: t.gm for t in trace(model, block_size=8, stitch_layers=False)}
    for name in ("prefill", "decode"):
        got, want = ops(stitched[name]), ops(whole[name])
        assert sorted(got) == sorted(want), f"{name}: the stitched graph has other nodes than the whole export"
        # Same operations in the same order, up to where the weight reads sit.
        assert [o for o in got if o[0] != "get_attr"] == [o for o in want if o[0] != "get_attr"]
    k_cache = next(n for n in stitched["prefill"].graph.nodes if n.target == "k_cache")
    assert k_cache.meta["val"].shape[0] == cfg.num_layers
    for name, batch, seq in (("prefill", 3, 7), ("decode", 2, 1)):
        x = step_inputs(cfg, batch, seq)
        with torch.no_grad():
            got, want, eager = stitched[name](*x), whole[name](*x), PagedStep(model)(*x)
        for g, w, e in zip(got, want, eager, strict=True):
            assert torch.equal(g, w), f"{name}: stitched and whole graphs compute different values"
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_every_layer_reads_its_own_weights_and_cache_slice():
    cfg = CONFIGS["qwen3"]
    with torch.device("meta"):
        model = Transformer(cfg)
    gm = trace(model, block_size=8)[0].gm
    weights = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for i in range(cfg.num_layers):
        assert f"layers_{i}_self_attn_q_proj_weight" in weights and f"layers_{i}_mlp_down_proj_weight" in weights
    slices = sorted(n.args[2] for n in gm.graph.nodes if n.target == torch.ops.aten.select.int
                    and n.args[0].target == "k_cache")
    assert slices == list(range(cfg.num_layers))


def test_layers_that_differ_are_refused():
    cfg = CONFIGS["llama"]
    with torch.device("meta"):
        model = Transformer(ModelConfig(**{**cfg.__dict__, "num_layers": 2}))
    gm = export_step(model, block_size=8)
    # Layer 1 scaled differently from layer 0: no layer index explains that, so stitching must refuse it.
    node = next(n for n in gm.graph.nodes if layer_of(n) == 1 and n.target == torch.ops.aten.pow.Tensor_Scalar)
    node.args = (node.args[0], 3)
    with pytest.raises(StitchError, match="constant"):
        stitch(gm, 4)
