"""graph_weights.releasing_weights: a weight goes the moment its last reader is erased, never while one reads it."""
import weakref

import pytest
import torch
from torch import fx

from llmc.passes.graph_weights import read, releasing_weights


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.randn(6, 4))
        self.register_buffer("b", torch.randn(6, 4))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.a) + torch.nn.functional.linear(x, self.b)


def _traced():
    gm = fx.symbolic_trace(TwoLinears())
    gm.a, gm.b = torch.randn(6, 4), torch.randn(6, 4)  # held by gm alone, as compile's bound weights are
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear]
    return gm, linears


def _double(gm, linear):
    """Replaces linear(x, W) by linear(x, 2 W), the replacement built before the old node is erased."""
    name = f"{linear.args[1].target}_doubled"
    gm.register_buffer(name, 2 * read(gm, linear.args[1]))
    with gm.graph.inserting_before(linear):
        weight = gm.graph.get_attr(name)
        new = gm.graph.call_function(torch.nn.functional.linear, (linear.args[0], weight))
    linear.replace_all_uses_with(new)
    gm.graph.erase_node(linear)


def test_a_weight_is_freed_when_its_last_reader_is_erased():
    gm, (first, second) = _traced()
    x = torch.randn(3, 4)
    want = 2 * gm(x)
    a, b = weakref.ref(gm.a), weakref.ref(gm.b)
    with releasing_weights(gm):
        _double(gm, first)
        assert a() is None and b() is not None  # a went with its reader; b is still read
        _double(gm, second)
        assert b() is None
    assert not hasattr(gm, "a") and not hasattr(gm, "b")
    gm.recompile()
    torch.testing.assert_close(gm(x), want)


def test_a_weight_read_by_another_node_stays():
    gm, (first, _) = _traced()
    with gm.graph.inserting_before(first):
        again = gm.graph.get_attr("a")
        twice = gm.graph.call_function(torch.nn.functional.linear, (first.args[0], again))
    first.replace_all_uses_with(twice)
    kept = weakref.ref(gm.a)
    with releasing_weights(gm):
        gm.graph.erase_node(first)
        assert kept() is not None and kept().device.type == "cpu"


def test_a_pass_reading_a_freed_weight_is_named():
    gm, (first, _) = _traced()
    x, total = first.args[0], next(iter(first.users))
    with pytest.raises(RuntimeError, match="weight a has no data"):
        with releasing_weights(gm):
            first.replace_all_uses_with(x)  # the wrong order: the old reader goes before its replacement exists
            gm.graph.erase_node(first)
            with gm.graph.inserting_before(total):
                new = gm.graph.call_function(torch.nn.functional.linear, (x, gm.graph.get_attr("a")))
            total.replace_input_with(x, new)
