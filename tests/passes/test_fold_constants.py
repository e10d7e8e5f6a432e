from collections import Counter

import pytest
import torch
from torch.export import Dim
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from llmc.compiler.trace import example_inputs, trace, unlift
from llmc.models import ModelConfig, Transformer
from llmc.passes import fold_constants, fold_rope, fuse_rms_norm, strip_asserts
from llmc.passes.pattern import PassContext
from tests.passes.conftest import Logits, census, finish

aten = torch.ops.aten
SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_heads=6, num_kv_heads=2, head_dim=8)


def attributes(gm) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


class Constants(torch.nn.Module):
    """A weight transposed, constant arithmetic, a literal-only tensor, and two that must stay: an expand of a
    weight to a large shape (and the mean that reads it), and everything reading the input."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 16))
        self.scale = torch.nn.Parameter(torch.randn(8))
        self.register_buffer("bias", torch.randn(8))

    def forward(self, x):
        bias = self.bias * 2.0 + self.scale.exp()  # mul, exp, add: one value
        steps = torch.arange(8, dtype=torch.float32)  # no weight at all, and small
        wide = self.scale.expand(4096, 8)  # 128 KiB from 32 bytes: computed at run time, not stored
        return x @ self.weight.t() + bias + steps + wide.mean(0)


def exported(module: torch.nn.Module, *inputs) -> torch.fx.GraphModule:
    with torch.no_grad():
        ep = torch.export.export(module.eval(), inputs, dynamic_shapes=({0: Dim.AUTO},))
    gm = unlift(ep.run_decompositions({}))
    strip_asserts.run(gm, PassContext())
    finish(gm)
    return gm


@pytest.fixture(scope="module")
def constants_graphs():
    module = Constants()
    return module, [exported(module, torch.randn(n, 16)) for n in (3, 5)]


def test_constants_fold_into_new_weights_and_dead_weights_go(constants_graphs):
    _, (gm, _) = constants_graphs
    x = torch.randn(6, 16)
    expected = gm(x)
    before = census(gm)
    assert before[aten.t.default] == before[aten.exp.default] == before[aten.arange.default] == 1

    assert fold_constants.run(gm, PassContext()) == 5  # t; mul, exp, add; arange
    finish(gm)
    after = census(gm)
    assert after[aten.t.default] == after[aten.exp.default] == 0
    assert after[aten.arange.default] == after[aten.mul.Tensor] == 0 and after[aten.matmul.default] == 1
    assert after[aten.expand.default] == 1 and after[aten.mean.dim] == 1  # too large to store, and what it feeds
    # The weights only the folded nodes read are gone; scale still feeds the expand.
    assert not hasattr(gm, "weight") and not hasattr(gm, "bias") and hasattr(gm, "scale")
    new = attributes(gm) - {"scale"}
    assert len(new) == 3 and all(isinstance(getattr(gm, name), torch.Tensor) for name in new)
    assert all(getattr(gm, name).is_contiguous() for name in new)
    torch.testing.assert_close(gm(x), expected, rtol=1.3e-6, atol=1e-5)


def test_the_same_value_gets_the_same_name_in_every_graph(constants_graphs):
    module, _ = constants_graphs
    first, second = exported(module, torch.randn(3, 16)), exported(module, torch.randn(7, 16))
    fold_constants.run(first, PassContext())
    fold_constants.run(second, PassContext())
    assert attributes(first) == attributes(second)
    for name in attributes(first):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_weights_on_the_meta_device_fold_to_meta_values(constants_graphs):
    _, (_, gm) = constants_graphs
    gm = gm.to("meta")
    assert fold_constants.run(gm, PassContext()) == 5
    finish(gm)
    folded = {name: getattr(gm, name) for name in attributes(gm) - {"scale"}}
    assert sorted(tuple(t.shape) for t in folded.values()) == [(8,), (8,), (16, 8)]
    # The literal-only arange needs no weight: it is computed for real; the others are shapes only.
    assert sorted(t.device.type for t in folded.values()) == ["cpu", "meta", "meta"]


def test_a_split_folds_through_its_items_and_random_or_input_nodes_stay():
    class SplitAndRandom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            low, high = self.weight.split(4)
            return x * (low * high) + torch.rand(4) + x.shape[0]

    gm = exported(SplitAndRandom(), torch.randn(3, 4))
    x = torch.randn(5, 4)
    torch.manual_seed(7)
    expected = gm(x)
    before = census(gm)
    assert before[aten.split.Tensor] == 1 and before[aten.rand.default] == 1

    assert fold_constants.run(gm, PassContext()) == 4  # split, its two items, their product
    finish(gm)
    after = census(gm)
    assert after[aten.split.Tensor] == 0 and after[aten.rand.default] == 1
    assert after[aten.mul.Tensor] == 1 and not hasattr(gm, "weight")  # only the product is stored
    torch.manual_seed(7)
    torch.testing.assert_close(gm(x), expected, rtol=1.3e-6, atol=1e-5)


# ---- the models' graphs ---------------------------------------------------------------------------------------
# Traced graphs carry no constant arithmetic of their own, except transformers' RoPE frequencies cast to float32
# when the model was cast to bfloat16 (its buffer rounded with it). After fold_rope nothing constant is left.

def prepared(gm):
    for rewrite in (strip_asserts.run, fuse_rms_norm.run):
        rewrite(gm, PassContext())
        finish(gm)
    return gm


def ours(family, dtype):
    cfg = ModelConfig(family=family, num_layers=1, qk_norm=family == "qwen3", **SIZES)
    model = Transformer(cfg).to(dtype).eval()
    inputs = example_inputs(model, 3, 5, 16)
    ids = torch.randint(0, SIZES["vocab_size"], inputs[0].shape)
    k, v = torch.randn(inputs[2].shape).to(dtype), torch.randn(inputs[3].shape).to(dtype)
    table = torch.randperm(k.shape[1])[: inputs[4].numel()].view(inputs[4].shape)
    step = (ids, torch.randint(0, 60, (3, 1)) + torch.arange(5), k, v, table, torch.randint(0, 48, (3,)), inputs[6],
            inputs[7])
    return prepared(trace(model, 16)[0].gm), step


def transformers_model(family, dtype):
    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_class, model_class = classes[family]
    config = config_class(vocab_size=SIZES["vocab_size"], hidden_size=SIZES["hidden_size"],
                          intermediate_size=SIZES["intermediate_size"], num_hidden_layers=1,
                          num_attention_heads=SIZES["num_heads"], num_key_value_heads=SIZES["num_kv_heads"],
                          head_dim=SIZES["head_dim"])
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():
        ep = torch.export.export(Logits(model), (torch.randint(0, SIZES["vocab_size"], (2, 7)),),
                                 dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    return prepared(unlift(ep.run_decompositions({}))), (torch.randint(0, SIZES["vocab_size"], (3, 9)),)


@pytest.mark.parametrize("build,family,dtype,folds", [
    (ours, "qwen3", torch.bfloat16, 0), (ours, "llama", torch.float32, 0),
    (transformers_model, "qwen3", torch.bfloat16, 1), (transformers_model, "llama", torch.float32, 0),
], ids=["qwen3-llmc-bf16", "llama-llmc-fp32", "qwen3-hf-bf16", "llama-hf-fp32"])
def test_model_graphs(build, family, dtype, folds):
    gm, inputs = build(family, dtype)
    expected = gm(*inputs)
    before = census(gm)
    code = gm.code

    assert fold_constants.run(gm, PassContext()) == folds
    finish(gm)
    if folds:
        inv_freq = "model_rotary_emb_inv_freq"
        assert census(gm) == before - Counter({aten._to_copy.default: 1})
        assert not hasattr(gm, inv_freq) and len([a for a in attributes(gm) if a.startswith(inv_freq)]) == 1
    else:
        assert gm.code == code
    for got, want in zip(gm(*inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same arithmetic, done earlier

    assert fold_rope.run(gm, PassContext(max_seq_len=64)) == 3
    finish(gm)
    assert fold_constants.run(gm, PassContext()) == 0
