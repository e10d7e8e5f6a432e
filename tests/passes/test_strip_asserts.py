import operator

import pytest
import torch
from torch.export import Dim

from llmc.compiler.trace import unlift
from llmc.passes import strip_asserts
from llmc.passes.pattern import PassContext
from tests.passes.conftest import finish


class Checked(torch.nn.Module):
    """Export leaves three _assert_scalar (from the checks) and two _assert_tensor_metadata (from the casts)."""

    def forward(self, x, n):
        k = n.item()
        torch._check(k >= 2)
        torch._check(k < 64)
        return x.float().to(torch.float16)[:k] * 2 + x.shape[0]


def exported() -> torch.fx.GraphModule:
    example = (torch.randn(8, 4, dtype=torch.float16), torch.tensor(3))
    with torch.no_grad():
        ep = torch.export.export(Checked(), example, dynamic_shapes=({0: Dim.AUTO}, None))
    return unlift(ep.run_decompositions({}))


def count(gm, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def test_removes_every_assertion_and_counts_them():
    gm = exported()
    scalar, metadata = torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_tensor_metadata.default
    assert count(gm, scalar) == 3 and count(gm, metadata) == 2
    x = torch.randn(11, 4, dtype=torch.float16)
    before = gm(x, torch.tensor(5))
    with pytest.raises(RuntimeError):
        gm(x, torch.tensor(1))  # violates k >= 2

    assert strip_asserts.run(gm, PassContext()) == 5
    assert count(gm, *strip_asserts.ASSERTION_TARGETS) == 0
    finish(gm)
    assert count(gm, operator.ge, operator.le, operator.lt) == 0  # what fed only the checks is dead code now
    assert torch.equal(gm(x, torch.tensor(5))[0], before[0])
    gm(x, torch.tensor(1))  # the check is gone, not just renamed


def test_a_graph_without_assertions_is_left_alone():
    gm = exported()
    strip_asserts.run(gm, PassContext())
    gm.recompile()
    code = gm.code
    assert strip_asserts.run(gm, PassContext()) == 0
    gm.recompile()
    assert gm.code == code
