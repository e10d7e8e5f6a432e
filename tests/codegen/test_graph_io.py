"""graph.json round trip: a traced graph, serialised and rebuilt, computes the same outputs; unknown targets
and argument kinds are refused, so graph.json cannot smuggle arbitrary calls."""
import json

import pytest
import torch

from llmc.codegen.graph_io import GraphFormatError, graph_from_json, graph_to_json
from llmc.compiler.trace import PagedStep, example_inputs, trace
from llmc.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def traced():
    cfg = ModelConfig(family="qwen3", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, qk_norm=True)
    model = Transformer(cfg).eval()
    return model, trace(model, block_size=16)


def random_inputs(model, batch, seq):
    ids, pos, k, v, table, past, last, slots = example_inputs(model, batch, seq, 16)
    ids = torch.randint(0, model.config.vocab_size, ids.shape)
    k, v = torch.randn_like(k), torch.randn_like(v)
    table = torch.randint(0, k.shape[1], table.shape)
    past = torch.randint(0, table.shape[1] * 16, (batch,))
    return ids, past[:, None] + torch.arange(seq), k, v, table, past, torch.randint(0, seq, (batch,)), slots


@pytest.mark.parametrize("index", [0, 1])
def test_round_trip_is_exact(traced, index):
    model, graphs = traced
    t = graphs[index]
    data = json.loads(json.dumps(graph_to_json(t.gm), allow_nan=False))
    tensors = {n.target: getattr(t.gm, n.target) for n in t.gm.graph.nodes if n.op == "get_attr"}
    rebuilt = graph_from_json(data, tensors)
    seq = 9 if t.name == "prefill" else 1
    for batch in (1, 4):  # sizes other than the traced ones: the dims stayed dynamic
        x = random_inputs(model, batch, seq)
        with torch.no_grad():
            got, want = rebuilt(*x), PagedStep(model)(*x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_refuses_unknown_targets_and_kinds(traced):
    _, graphs = traced
    data = graph_to_json(graphs[1].gm)
    call = next(e for e in data["nodes"] if e["op"] == "call_function")
    for evil in ("builtins.eval", "os.system", "aten.no_such_op.default"):
        call["target"] = evil
        with pytest.raises(GraphFormatError, match="target|op"):
            graph_from_json(data, {n.target: getattr(graphs[1].gm, n.target) for n in graphs[1].gm.graph.nodes if n.op == "get_attr"})
    with pytest.raises(GraphFormatError, match="format"):
        graph_from_json({"format": "other", "nodes": []}, {})


def test_missing_tensor_is_named(traced):
    _, graphs = traced
    data = graph_to_json(graphs[1].gm)
    with pytest.raises(GraphFormatError, match="needs tensor"):
        graph_from_json(data, {})


def test_special_floats_survive():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.aten.clamp.default, (x, float("-inf"), float("inf")))
    g.output((y,))
    data = json.loads(json.dumps(graph_to_json(torch.fx.GraphModule({}, g)), allow_nan=False))
    rebuilt = graph_from_json(data, {})
    t = torch.randn(5)
    assert torch.equal(rebuilt(t)[0], t)
