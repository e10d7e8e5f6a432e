"""The activation memory plan: exact live ranges on a hand-built graph, the arena invariants on random
intervals and random graphs, and the plan executed for real: every planned buffer is moved into one arena at
its offset while the graph runs, and the outputs must match a plain run (a wrong live range or offset lets a
later buffer overwrite a live one, which changes the outputs; the sabotage test shows it does); and a bundle's
graphs planned at the engine's steps, as `llmc inspect` shows them.
"""
from __future__ import annotations

import operator
import random

import pytest
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from llmc.codegen.graph_io import graph_to_json
from llmc.common.contract import DEFAULT_MAX_BATCH, KV_BLOCK_SIZE
from llmc.common.targets import get_target
from llmc.compiler import pipeline
from llmc.compiler.api import check_inputs
from llmc.compiler.trace import trace
from llmc.models import Transformer
from llmc.runtime.engine import DEFAULT_PREFILL_CHUNK
from llmc.runtime.plan import (ALIGNMENT, Buffer, MemoryPlan, PlanningShape, assign_offsets, liveness, plan_bundle,
                               plan_memory, step_inputs)
from tests.conftest import randomize_parameters_, tiny_config

aten = torch.ops.aten
# Longer than the engine's prefill chunk, so that a prompt of MAX_SEQ_LEN tokens takes two prefill steps.
MAX_SEQ_LEN = DEFAULT_PREFILL_CHUNK + 2 * KV_BLOCK_SIZE + 3
# Activations of all layers add up without reuse and not with it: a few layers show the gap.
LAYERS = 4


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown on failure, to replay it
    return random.Random(seed)


def assert_sound(plan: MemoryPlan) -> None:
    """(a) buffers alive at the same node never share a byte; (b) live set <= peak <= naive sum."""
    buffers = plan.buffers
    for i, a in enumerate(buffers):
        assert a.offset >= 0 and a.offset % ALIGNMENT == 0, a
        for b in buffers[i + 1:]:
            if a.first <= b.last and b.first <= a.last:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
    last = max((b.last for b in buffers), default=0)
    live = max((sum(b.size for b in buffers if b.first <= i <= b.last) for i in range(last + 1)), default=0)
    assert plan.live_bytes == live
    assert plan.peak_bytes == max((b.offset + b.size for b in buffers), default=0)
    assert live <= plan.peak_bytes <= plan.naive_bytes == sum(b.size for b in buffers)


class ArenaRun(fx.Interpreter):
    """Runs the graph for real with every planned buffer living in one arena at its planned offset."""

    def __init__(self, gm: fx.GraphModule, plan: MemoryPlan):
        super().__init__(gm)
        self.arena = torch.full((plan.peak_bytes,), 0xFF, dtype=torch.uint8)  # poison: all-ones bytes are NaN
        self.slots = {(b.node, b.output): b for b in plan.buffers}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        leaves, spec = tree_flatten(value)
        k = 0
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                slot = self.slots.get((n.name, k))
                if slot is not None:
                    leaves[i] = self.place(leaf, slot)
                k += 1
        return tree_unflatten(leaves, spec)

    def place(self, t: torch.Tensor, slot: Buffer) -> torch.Tensor:
        nbytes = t.untyped_storage().nbytes()
        assert nbytes <= slot.size, f"{slot.node} needs {nbytes} bytes, planned {slot.size}"
        raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        self.arena[slot.offset: slot.offset + nbytes].copy_(raw)
        typed = self.arena[slot.offset: slot.offset + nbytes].view(t.dtype)
        # as_strided's offset counts from the arena's start, not from the slice's
        return typed.as_strided(t.shape, t.stride(), typed.storage_offset() + t.storage_offset())


def assert_arena_run_matches(gm: fx.GraphModule, inputs, plan: MemoryPlan) -> None:
    expected = gm(*inputs)
    got = ArenaRun(gm, plan).run(*inputs)
    torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5)


# --- live ranges ---------------------------------------------------------------------------------------------------

def test_live_ranges_of_a_hand_built_graph():
    root = torch.nn.Module()
    root.w = torch.randn(8, 4)
    g = fx.Graph()
    x = g.placeholder("x")                                  # 0: host input, no buffer
    w = g.get_attr("w")                                     # 1: weight, no buffer
    xt = g.call_function(aten.t.default, (x,))              # 2: view of an input, no buffer
    a = g.call_function(aten.mm.default, (x, w))            # 3: buffer [4, 4] f32
    av = g.call_function(aten.view.default, (a, [16]))      # 4: alias of a
    b = g.call_function(aten.neg.default, (xt,))            # 5: buffer [8, 4] f32
    pair = g.call_function(aten.sort.default, (b,))         # 6: two buffers: values f32, indices i64
    values = g.call_function(operator.getitem, (pair, 0))   # 7: alias of pair's values
    c = g.call_function(aten.add.Tensor, (values, b))       # 8: buffer; last use of b and of values
    s = g.call_function(aten.sum.default, (av,))            # 9: buffer (0-d); last use of a, through av
    g.output((c, s))                                        # 10
    gm = fx.GraphModule(root, g)
    got = {(f.node, f.output): (f.size, f.first, f.last) for f in liveness(gm, [torch.randn(4, 8)], alignment=1)}
    assert got == {(a.name, 0): (64, 3, 9), (b.name, 0): (128, 5, 8), (pair.name, 0): (128, 6, 8),
                   (pair.name, 1): (256, 6, 6), (c.name, 0): (128, 8, 10), (s.name, 0): (4, 9, 10)}


def test_sizes_round_up_to_the_alignment():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(aten.neg.default, (x,)))
    (buffer,) = liveness(fx.GraphModule(torch.nn.Module(), g), [torch.randn(3)])
    assert buffer.size == ALIGNMENT


# --- offsets -------------------------------------------------------------------------------------------------------

def random_buffers(rng: random.Random, n: int) -> list[Buffer]:
    out = []
    for i in range(n):
        first = rng.randrange(50)
        out.append(Buffer(f"n{i}", 0, ALIGNMENT * rng.randint(1, 40), first, first + rng.randrange(15)))
    return out


def test_offsets_of_random_buffers_never_collide(rng):
    for _ in range(20):
        buffers = assign_offsets(random_buffers(rng, rng.randint(1, 60)))
        peak = max(b.offset + b.size for b in buffers)
        assert_sound(MemoryPlan(buffers, peak, sum(b.size for b in buffers),
                                max(sum(b.size for b in buffers if b.first <= i <= b.last) for i in range(70))))


def test_offsets_do_not_depend_on_the_order_buffers_come_in(rng):
    buffers = random_buffers(rng, 50)
    shuffled = buffers[:]
    rng.shuffle(shuffled)
    by_name = {b.node: b.offset for b in assign_offsets(shuffled)}
    assert {b.node: b.offset for b in assign_offsets(buffers)} == by_name


def test_best_fit_takes_the_tightest_gap():
    # b and d die early and leave holes of 90 and 70 bytes between a, c and e; f (50 bytes, later) fits both and
    # takes the tighter one (first fit would take the lower).
    lives = {"a": (100, 0, 9), "b": (90, 0, 1), "c": (80, 0, 9), "d": (70, 0, 1), "e": (60, 0, 9), "f": (50, 5, 9)}
    buffers = [Buffer(name, 0, size, first, last) for name, (size, first, last) in lives.items()]
    placed = {p.node: p.offset for p in assign_offsets(buffers)}
    assert placed == {"a": 0, "b": 100, "c": 190, "d": 270, "e": 340, "f": 270}


# --- random graphs, executed -----------------------------------------------------------------------------------------

def random_graph(rng: random.Random) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """Elementwise ops, matmuls with a weight, views (t, split, copying or viewing reshape) and cats."""
    rows, cols = rng.randint(2, 7), rng.randint(2, 7)
    root = torch.nn.Module()
    root.w = torch.randn(cols, cols)
    g = fx.Graph()
    pool = [(g.placeholder("x"), (rows, cols))]
    for _ in range(rng.randint(6, 30)):
        node, (r, c) = rng.choice(pool)
        kind = rng.choice(["unary", "binary", "mm", "t", "cat", "split", "reshape"])
        if kind == "binary":
            other = rng.choice([n for n, shape in pool if shape == (r, c)])
            pool.append((g.call_function(rng.choice([aten.add.Tensor, aten.mul.Tensor]), (node, other)), (r, c)))
        elif kind == "mm" and c == cols:
            pool.append((g.call_function(aten.mm.default, (node, g.get_attr("w"))), (r, c)))
        elif kind == "t":
            pool.append((g.call_function(aten.t.default, (node,)), (c, r)))
        elif kind == "cat" and r < 30:
            other = rng.choice([n for n, shape in pool if shape[1] == c])
            rows_other = next(shape[0] for n, shape in pool if n is other)
            pool.append((g.call_function(aten.cat.default, ([node, other],)), (r + rows_other, c)))
        elif kind == "split" and r > 1:
            parts = g.call_function(aten.split.Tensor, (node, r // 2))
            pool.append((g.call_function(operator.getitem, (parts, 0)), (r // 2, c)))
        elif kind == "reshape":  # a view when `node` is contiguous, a copy after a transpose
            pool.append((g.call_function(aten.reshape.default, (node, [c, r])), (c, r)))
        else:
            pool.append((g.call_function(rng.choice([aten.neg.default, aten.tanh.default, aten.sin.default]),
                                         (node,)), (r, c)))
    outputs = [pool[-1][0], *rng.sample([n for n, _ in pool[1:]], min(2, len(pool) - 1))]
    g.output(tuple(outputs))
    gm = fx.GraphModule(root, g)
    return gm, [torch.randn(rows, cols)]


def test_random_graphs_run_correctly_from_their_arena(rng):
    for _ in range(15):
        gm, inputs = random_graph(rng)
        plan = plan_memory(gm, inputs)
        assert_sound(plan)
        assert_arena_run_matches(gm, inputs, plan)
        assert plan_memory(gm, inputs).to_dict() == plan.to_dict()  # (d) deterministic


# --- a tiny model ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_graphs():
    """(model, traced graphs after the default passes) at the tests' tiny shape, with random weights."""
    model = Transformer(tiny_config(num_layers=LAYERS, max_position_embeddings=2 * DEFAULT_PREFILL_CHUNK))
    randomize_parameters_(model)
    graphs = trace(model.eval(), KV_BLOCK_SIZE)
    ctx = pipeline.PassContext(target=get_target("cpu"), dtype="float32", max_seq_len=MAX_SEQ_LEN)
    for t in graphs:
        pipeline.run_pipeline(t.gm, ctx, pipeline.resolve_passes(None), graph_name=t.name)
    return model, graphs


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_tiny_model_runs_correctly_from_its_arena(tiny_graphs, graph):
    model, graphs = tiny_graphs
    gm = next(t.gm for t in graphs if t.name == graph)
    inputs = check_inputs(model, graph, MAX_SEQ_LEN, seed=random.randrange(2**32))
    plan = plan_memory(gm, inputs)
    assert_sound(plan)
    # (c) reuse pays: under half the naive sum (3.4x to 5.7x here, by graph and attention lowering)
    assert 2 * plan.peak_bytes < plan.naive_bytes, (plan.peak_bytes, plan.naive_bytes)
    assert_arena_run_matches(gm, inputs, plan)
    assert plan_memory(gm, inputs).to_dict() == plan.to_dict()


def test_an_arena_without_reuse_planning_corrupts_the_outputs(tiny_graphs):
    """The arena check has teeth: every buffer at offset 0 (what a planner that ignored lives would do) must
    change the decode graph's outputs."""
    model, graphs = tiny_graphs
    gm = next(t.gm for t in graphs if t.name == "decode")
    inputs = check_inputs(model, "decode", MAX_SEQ_LEN, seed=random.randrange(2**32))
    plan = plan_memory(gm, inputs)
    collapsed = MemoryPlan([Buffer(b.node, b.output, b.size, b.first, b.last, 0) for b in plan.buffers],
                           max(b.size for b in plan.buffers), plan.naive_bytes, plan.live_bytes)
    with pytest.raises((AssertionError, IndexError, RuntimeError)):  # wrong values, or indices that became garbage
        assert_arena_run_matches(gm, inputs, collapsed)


def test_a_bundle_is_planned_at_the_engines_prefill_chunk(tiny_graphs):
    """plan_bundle (what llmc inspect shows) plans graph.json's graphs at the engine's steps: prefill one chunk,
    decode one token, each at batch 1 and the largest batch, over a max_seq_len context."""
    model, graphs = tiny_graphs
    cfg = model.config.to_dict()
    graph = {"graphs": {t.name: graph_to_json(t.gm) for t in graphs}}  # as compile writes graph.json
    plans = plan_bundle(graph, cfg, torch.float32, KV_BLOCK_SIZE, MAX_SEQ_LEN, DEFAULT_PREFILL_CHUNK)
    blocks = -(-MAX_SEQ_LEN // KV_BLOCK_SIZE)
    for name, tokens in [("prefill", DEFAULT_PREFILL_CHUNK), ("decode", 1)]:
        assert [p["shape"] for p in plans[name]] == [{"batch": b, "new_tokens": tokens, "kv_blocks": blocks}
                                                      for b in (1, DEFAULT_MAX_BATCH)]
        small, large = plans[name]
        assert small["peak_bytes"] < large["peak_bytes"]
        for p in plans[name]:
            assert p["live_bytes"] <= p["peak_bytes"] < p["naive_bytes"]
        # graph.json's rebuilt graph plans as the traced one does
        gm = next(t.gm for t in graphs if t.name == name)
        shape = plans[name][0]["shape"]
        expected = plan_memory(gm, step_inputs(cfg, KV_BLOCK_SIZE, torch.float32, PlanningShape(**shape)))
        assert small == {"shape": shape, **expected.to_dict()}
    # The logits of the largest decode batch are an output: no plan can hold less.
    assert plans["decode"][1]["peak_bytes"] >= DEFAULT_MAX_BATCH * cfg["vocab_size"] * 4
    # A chunk needs less than the whole prompt in one step, which the engine no longer runs.
    whole = plan_bundle(graph, cfg, torch.float32, KV_BLOCK_SIZE, MAX_SEQ_LEN, MAX_SEQ_LEN)
    assert whole["prefill"][0]["shape"]["new_tokens"] == MAX_SEQ_LEN
    assert plans["prefill"][0]["peak_bytes"] < whole["prefill"][0]["peak_bytes"]
