import pytest
import torch
from torch.export import Dim

from llmc.compiler.trace import unlift
from llmc.passes.pattern import PassContext, Pattern, replace_all
from llmc.passes.strip_asserts import remove_assertions
from tests.passes.conftest import finish

aten = torch.ops.aten
SCALE = 0.123457  # sentinel for the captured scalar


def scaled_relu(x, scale=SCALE):
    return torch.relu(x) * scale


def as_clamp(match):
    """The replacement the tests install: the same value through other ops, so outputs can be compared."""
    return match.graph.call_function(aten.mul.Tensor, (
        match.graph.call_function(aten.clamp_min.default, (match.inputs["x"], 0.0)), match.scalars["scale"]))


def relu_pattern(**kwargs) -> Pattern:
    kwargs.setdefault("example_inputs", lambda dtype: (torch.randn(4, 8, dtype=dtype),))
    kwargs.setdefault("dtypes", [torch.float32])  # each dtype is one more export to trace
    return Pattern("scaled_relu", [scaled_relu], scalars={"scale": SCALE}, **kwargs)


def export(fn, *inputs, dynamic=False) -> torch.fx.GraphModule:
    class Module(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    shapes = {"args": tuple({0: Dim.AUTO} for _ in inputs)} if dynamic else None
    with torch.no_grad():
        gm = unlift(torch.export.export(Module(), inputs, dynamic_shapes=shapes).run_decompositions({}))
    remove_assertions(gm.graph)  # as the pipeline's first pass does: they are extra users that block matches
    gm.recompile()
    return gm


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def rewrite(gm, pattern, build=as_clamp) -> int:
    n = replace_all(gm, pattern, build)
    finish(gm)
    return n


def test_captures_each_scalar_and_keeps_the_outputs():
    gm = export(lambda a, b: torch.relu(a) * 0.5 + torch.relu(b + 1) * 3.0, torch.randn(3, 8), torch.randn(3, 8),
                dynamic=True)
    matches = relu_pattern().find(gm.graph)
    assert sorted(m.scalars["scale"] for m in matches) == [0.5, 3.0]
    a, b = torch.randn(6, 8), torch.randn(6, 8)  # a batch size the export did not see
    expected = gm(a, b)
    assert rewrite(gm, relu_pattern()) == 2
    assert count(gm, aten.relu.default) == 0 and count(gm, aten.clamp_min.default) == 2
    torch.testing.assert_close(gm(a, b), expected, rtol=0, atol=0)
    new = next(n for n in gm.graph.nodes if n.target == aten.clamp_min.default).users
    assert all(u.meta["val"].shape[1] == 8 and u.meta["val"].dtype == torch.float32 for u in new)


def test_other_literals_must_be_equal():
    pattern = Pattern("relu_squared", [lambda x: torch.relu(x).pow(2)], dtypes=[torch.float32],
                      example_inputs=lambda dtype: (torch.randn(4, 8, dtype=dtype),))
    assert pattern.find(export(lambda x: torch.relu(x).pow(3), torch.randn(3, 8)).graph) == []
    assert len(pattern.find(export(lambda x: torch.relu(x).pow(2), torch.randn(3, 8)).graph)) == 1


def test_a_pattern_node_never_matches_a_literal():
    # SubgraphMatcher(ignore_literals=True) alone would accept x * 2.0 for x * relu(y).
    pattern = Pattern("mul_relu", [lambda x, y: x * torch.relu(y)], dtypes=[torch.float32],
                      example_inputs=lambda dtype: (torch.randn(4, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype)))
    assert pattern.find(export(lambda x: x * 2.0, torch.randn(3, 8)).graph) == []


def test_patterns_are_typed():
    graph = export(lambda x: torch.relu(x) * 0.5, torch.randn(3, 8, dtype=torch.float16)).graph
    assert relu_pattern(dtypes=[torch.float32]).find(graph) == []
    assert [m.variant for m in relu_pattern(dtypes=[torch.float16]).find(graph)] == ["scaled_relu[float16]"]


def test_extra_check_rejects_and_the_match_is_left_alone():
    gm = export(lambda a, b: torch.relu(a) * 0.5 + (torch.relu(b) * 0.5).sum(), torch.randn(3, 8), torch.randn(3, 6))
    wide = relu_pattern(extra_check=lambda m: m.val("x").shape[-1] == 8)
    assert rewrite(gm, wide) == 1
    assert count(gm, aten.relu.default) == 1 and count(gm, aten.clamp_min.default) == 1


def test_an_intermediate_used_outside_blocks_the_match():
    gm = export(lambda x: (torch.relu(x) * 0.5, torch.relu(x).sum()), torch.randn(3, 8))
    # The two relu calls are separate nodes; make one shared so it leaks out of the pattern.
    relus = [n for n in gm.graph.nodes if n.target == aten.relu.default]
    relus[1].replace_all_uses_with(relus[0])
    gm.graph.erase_node(relus[1])
    assert relu_pattern().find(gm.graph) == []


def test_variants_and_chained_matches():
    def gate_first(x, w):
        return w * torch.relu(x)

    def gate_last(x, w):
        return torch.relu(x) * w

    def as_clamp_gate(match):
        clamped = match.graph.call_function(aten.clamp_min.default, (match.inputs["x"], 0.0))
        return match.graph.call_function(aten.mul.Tensor, (clamped, match.inputs["w"]))

    pattern = Pattern("gate", [gate_first, gate_last], dtypes=[torch.float32],
                      example_inputs=lambda dtype: (torch.randn(4, 8, dtype=dtype), torch.randn(8, dtype=dtype)))
    gm = export(lambda x, w1, w2: w2 * torch.relu(torch.relu(x) * w1), torch.randn(3, 8), torch.randn(8),
                torch.randn(8))
    inputs = torch.randn(5, 8), torch.randn(8), torch.randn(8)
    expected = gm(*inputs)
    assert [m.variant for m in pattern.find(gm.graph)] == ["gate_first[float32]", "gate_last[float32]"]
    assert rewrite(gm, pattern, as_clamp_gate) == 2  # the outer match reads the inner one's output
    assert count(gm, aten.relu.default) == 0
    torch.testing.assert_close(gm(*inputs), expected, rtol=0, atol=0)


def test_identical_traces_are_deduplicated_and_larger_variants_win():
    def with_casts(x, scale=SCALE):
        return (torch.relu(x.float()) * scale).to(x.dtype)

    pattern = Pattern("scaled_relu", [scaled_relu, with_casts], scalars={"scale": SCALE},
                      dtypes=[torch.float32, torch.bfloat16],
                      example_inputs=lambda dtype: (torch.randn(4, 8, dtype=dtype),))
    names = [v.name for v in pattern.variants]
    # In float32 the casts vanish, so with_casts is the same graph as scaled_relu.
    assert names.count("with_casts[float32]") == 0 and "with_casts[bfloat16]" in names
    graph = export(lambda x: (torch.relu(x.float()) * 0.5).to(x.dtype), torch.randn(3, 8, dtype=torch.bfloat16)).graph
    assert [m.variant for m in pattern.find(graph)] == ["with_casts[bfloat16]"]


def test_multiple_outputs():
    def split(x):
        h = torch.relu(x)
        return h + 1, h * 2

    def build(match):
        g = match.graph
        h = g.call_function(aten.clamp_min.default, (match.inputs["x"], 0.0))
        return g.call_function(aten.add.Tensor, (h, 1)), g.call_function(aten.mul.Tensor, (h, 2))

    def model(x):
        a, b = split(torch.sin(x))
        c, d = split(torch.cos(x))
        return a * d - b * c

    pattern = Pattern("split", [split], dtypes=[torch.float32],
                      example_inputs=lambda dtype: (torch.randn(4, 8, dtype=dtype),))
    gm = export(model, torch.randn(3, 8))
    x = torch.randn(3, 8)
    expected = gm(x)
    assert rewrite(gm, pattern, build) == 2
    assert count(gm, aten.relu.default) == 0
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_a_replacement_of_another_type_is_a_bug_in_the_pass():
    gm = export(lambda x: torch.relu(x) * 0.5, torch.randn(3, 8))

    def wrong_dtype(match):
        return match.graph.call_function(aten._to_copy.default, (as_clamp(match),), {"dtype": torch.float16})

    with pytest.raises(RuntimeError, match="float16.*where the graph had float32"):
        replace_all(gm, relu_pattern(), wrong_dtype)


def test_a_scalar_folded_away_is_reported_when_tracing():
    pattern = Pattern("folded", [lambda x, scale=SCALE: torch.relu(x) * (scale * 2)], scalars={"scale": SCALE},
                      dtypes=[torch.float32],
                      example_inputs=lambda dtype: (torch.randn(4, 8, dtype=dtype),))
    with pytest.raises(ValueError, match="scale"):
        pattern.variants


def test_pass_context_takes_a_dtype_name():
    assert PassContext(dtype="bfloat16").dtype is torch.bfloat16
    assert PassContext(dtype=torch.float16).dtype is torch.float16
    with pytest.raises(ValueError, match="bfloat17"):
        PassContext(dtype="bfloat17")
