"""Graphs the fusion-pass tests share (each export costs seconds, so each is built once per session).

`fusion.graphs(source, family, dtype)` -> [(name, gm, inputs)]: our paged prefill/decode step ("llmc") or
transformers' *ForCausalLM logits ("hf"), after strip_asserts and fuse_rms_norm (where the fusion passes start),
as fresh copies a test may rewrite, with fresh random inputs. Our Qwen3 ties lm_head to the embedding; our
Llama has attention biases, so both the tied fold and the biased merge run on real model graphs.

Helpers the pass tests import (`from tests.passes.conftest import Logits, census, finish`): `Logits` (a model's
logits from input ids, what the tests export), `census` (call target -> count), `finish` (what the pipeline runs
after each pass).
"""
from __future__ import annotations

import copy
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.export import Dim

from llmc.compiler.api import check_inputs
from llmc.compiler.trace import trace, unlift
from llmc.models import ModelConfig, Transformer
from llmc.passes import fuse_rms_norm, strip_asserts
from llmc.passes.pattern import PassContext

LAYERS = 2
SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_heads=6, num_kv_heads=2, head_dim=8)
EPS = {"qwen3": 1e-6, "llama": 1e-5}


def our_config(family: str) -> ModelConfig:
    return ModelConfig(family=family, num_layers=LAYERS, qk_norm=family == "qwen3", rms_norm_eps=EPS[family],
                       tie_word_embeddings=family == "qwen3", attention_bias=family == "llama", **SHAPE)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains around 1 (ones would hide a dropped or misplaced fold), other weights O(0.2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.eval()


def canonical(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    for p in (strip_asserts, fuse_rms_norm):
        p.run(gm, PassContext())
        gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class Logits(torch.nn.Module):
    """A model's logits from input ids alone (transformers' *ForCausalLM without a cache, or our Transformer),
    what the tests export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        if isinstance(self.model, Transformer):
            return self.model(input_ids)
        return self.model(input_ids, use_cache=False).logits


def hf_model(family: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    kw = dict(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"], num_hidden_layers=LAYERS,
              intermediate_size=SHAPE["intermediate_size"], num_attention_heads=SHAPE["num_heads"],
              num_key_value_heads=SHAPE["num_kv_heads"], head_dim=SHAPE["head_dim"], rms_norm_eps=EPS[family],
              tie_word_embeddings=family == "qwen3")
    return Qwen3ForCausalLM(Qwen3Config(**kw)) if family == "qwen3" else LlamaForCausalLM(LlamaConfig(**kw))


def _build(source: str, family: str, dtype: torch.dtype):
    if source == "llmc":
        model = randomize(Transformer(our_config(family))).to(dtype)
        return model, [(t.name, canonical(t.gm)) for t in trace(model, block_size=16)]
    model = randomize(hf_model(family)).to(dtype)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 7))
    with torch.no_grad():
        ep = torch.export.export(Logits(model), (ids,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    return model, [("logits", canonical(unlift(ep.run_decompositions({}))))]


def _inputs(source: str, model, name: str) -> tuple:
    if source == "llmc":
        return check_inputs(model, name, model.config.max_position_embeddings, seed=random.randrange(2**31))
    return (torch.randint(0, SHAPE["vocab_size"], (3, 9)),)  # sizes the export did not see


def fresh_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy a test may rewrite: cloned tensors, new nodes sharing the original's fake values. (deepcopy would
    copy the fake tensors out of their fake mode onto the meta device, where new cpu weights mismatch them.)"""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    root = torch.nn.Module()
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    for name, tensor in tensors.items():
        root.register_buffer(name, tensor.detach().clone())
    return torch.fx.GraphModule(root, graph)


def census(gm: torch.fx.GraphModule) -> Counter:
    """Call target -> count, the op census the Before/After tests compare."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def finish(gm: torch.fx.GraphModule) -> None:
    """What the pipeline does after each pass: dead-code elimination, lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def run_passes(gm: torch.fx.GraphModule, *passes) -> list[int]:
    """Runs the passes in order as the pipeline does (dead-code elimination, lint, recompile after each)."""
    counts = []
    for p in passes:
        counts.append(p.run(gm, PassContext()))
        finish(gm)
    return counts


def tolerance(dtype: torch.dtype) -> dict:
    """Fusions that fold a gain into a weight or reorder sums: DESIGN.md's 1e-4 (fp32), 1.6e-2 (bf16)."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}[dtype]
    return dict(rtol=tol, atol=tol)


def assert_model_outputs_close(got: list, want: list, dtype: torch.dtype) -> None:
    """Whole-graph outputs after a rewrite that rounds differently (a gain folded into a bf16 weight): fp32 within
    1e-4; bf16 by DESIGN.md's whole-model criterion, cosine >= 0.999 per output. Elementwise 1.6e-2 is a
    per-op bound: two layers of bf16 rounding move logits of magnitude ~4 by a few ulps (0.03-0.06) in the
    unfused model as much as in the fused one, measured against the same weights in fp32."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, **tolerance(dtype))
            continue
        assert g.shape == w.shape and g.dtype == w.dtype
        cosine = torch.nn.functional.cosine_similarity(g.double().flatten(), w.double().flatten(), dim=0)
        assert cosine >= 0.999, f"cosine {float(cosine):.5f} < 0.999"


def outputs(gm: torch.fx.GraphModule, inputs: tuple) -> list:
    with torch.no_grad():
        out = gm(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]



@pytest.fixture(scope="session")
def fusion():
    """Namespace: graphs(source, family, dtype) (see the module docstring), census, run_passes, tolerance,
    outputs, assert_model_outputs_close, LAYERS, EPS, SHAPE."""
    built = {}

    def graphs(source: str, family: str, dtype: torch.dtype):
        key = (source, family, dtype)
        if key not in built:
            built[key] = _build(*key)
        model, traced = built[key]
        return [(name, fresh_copy(gm), _inputs(source, model, name)) for name, gm in traced]

    return SimpleNamespace(graphs=graphs, census=census, run_passes=run_passes, tolerance=tolerance,
                           outputs=outputs, assert_model_outputs_close=assert_model_outputs_close,
                           LAYERS=LAYERS, EPS=EPS, SHAPE=SHAPE)
