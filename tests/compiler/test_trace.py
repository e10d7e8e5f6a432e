"""Tracing: one export gives a prefill graph dynamic in batch, sequence and cache sizes, and a decode graph
specialised to one token; both compute exactly what the eager paged step computes."""
import pytest
import torch

from llmc.common.contract import STEP_INPUTS
from llmc.compiler.trace import PagedStep, trace


@pytest.fixture(scope="module")
def traced(request):
    from llmc.models import ModelConfig, Transformer

    cfg = ModelConfig(family="llama", vocab_size=89, hidden_size=40, intermediate_size=72, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=10, rope_theta=500000.0, qk_norm=False)
    model = Transformer(cfg).eval()
    return model, {t.name: t.gm for t in trace(model, block_size=8)}


def step_inputs(cfg, batch, seq, num_blocks, max_blocks, block_size=8):
    past = torch.randint(0, max_blocks * block_size, (batch,))
    cache = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return (torch.randint(0, cfg.vocab_size, (batch, seq)), past[:, None] + torch.arange(seq), torch.randn(cache),
            torch.randn(cache), torch.randint(0, num_blocks, (batch, max_blocks)), past, torch.randint(0, seq, (batch,)),
            torch.full((batch, seq), -1))


@pytest.mark.parametrize("name,batch,seq,num_blocks,max_blocks", [
    ("prefill", 1, 1, 3, 1), ("prefill", 4, 13, 9, 5), ("decode", 1, 1, 2, 1), ("decode", 6, 1, 17, 4)])
def test_graphs_equal_eager_at_any_size(traced, name, batch, seq, num_blocks, max_blocks):
    model, graphs = traced
    x = step_inputs(model.config, batch, seq, num_blocks, max_blocks)
    with torch.no_grad():
        got, want = graphs[name](*x), PagedStep(model)(*x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_signature_and_decode_specialisation(traced):
    _, graphs = traced
    for gm in graphs.values():
        assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == list(STEP_INPUTS)
        # The model never reads slot_mapping; export keeps it as an input for the fuse_kv_write pass.
        assert not next(n for n in gm.graph.nodes if n.target == "slot_mapping").users
        assert not [n for n in gm.graph.nodes if n.op == "get_attr" and "." in n.target]

    def seq_sizes(gm):
        return [n for n in gm.graph.nodes if n.target == torch.ops.aten.sym_size.int
                and n.args[0].target in ("input_ids", "positions") and n.args[1] == 1]

    assert seq_sizes(graphs["prefill"]) and not seq_sizes(graphs["decode"])


def test_meta_model_traces(traced):
    from llmc.models import Transformer

    model, _ = traced
    with torch.device("meta"):
        meta = Transformer(model.config)
    graphs = trace(meta, block_size=8)
    assert all(getattr(t.gm, n.target).device.type == "meta" for t in graphs for n in t.gm.graph.nodes if n.op == "get_attr")
