"""Activation memory plan: one arena per graph and planning shape, offsets assigned by liveness.

What is planned: every tensor a graph computes (its intermediates and its outputs). Placeholders (input ids,
positions, block table, the paged KV cache) belong to the host, and get_attr tensors are the weights: neither
is an activation, and nor is a view of either. A view or alias of an intermediate (view, transpose, slice,
getitem of a multi-output op, ...) is not a buffer of its own: it shares its base's bytes and extends its
base's life to its own last use. Aliasing is read off storages, not op names: the graph is run under
FakeTensorMode at the planning shape (no data, no weight memory touched), and an output whose storage is
already known aliases that buffer; so a reshape that copies gets a buffer and one that views does not.

A buffer lives from the node that allocates it to the last node that reads it or any of its aliases
(inclusive: an op reads its inputs while it writes its output, so the two never share bytes). Graph outputs
live to the output node. Offsets come from greedy-by-size best fit (Pisarchyk & Lee, "Efficient Memory
Management for Deep Neural Net Inference", 2020; TFLite's arena planner): buffers largest first, each at the
smallest gap between already placed buffers whose lives overlap its own, else above them. Sizes are rounded
up to ALIGNMENT bytes. An op's own scratch space (SDPA's score matrix inside the kernel) is not visible in
the graph and not planned.

Planning shapes: the steps the engine (runtime/engine.py) runs at its limits. Prefill: batch B (1 and the
largest batch) of one chunk each (the engine's prefill chunk: a longer prompt takes several steps), each over a
block table spanning max_seq_len tokens (the last chunk of the longest prompt attends over all of it, and no
chunk has more new tokens or more past). Decode: batch B, one new token, the same block table.

Who uses it: `llmc inspect` computes it on demand from the bundle's graph.json (no weights read) for the engine's
prefill chunk and largest batch; compiling no longer stores it (bundles of older llmc carry a graph.json
"memory" section planned for whole-prompt prefill, which nothing reads). The runtime runs graphs with an FX
interpreter that frees each value after its last use, so torch's allocator reuses memory by itself; the plan is
the figure a host sizes its memory from, and the layout a future arena executor would allocate once.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from llmc.codegen import ops  # noqa: F401  (registers the llmc:: ops graph.json names)
from llmc.codegen.graph_io import graph_from_json
from llmc.common.contract import DEFAULT_MAX_BATCH

ALIGNMENT = 256  # bytes: what cudaMalloc guarantees, so any kernel may assume it of an arena slice
PLAN_DEVICE = torch.device("cpu")  # sizes do not depend on the device; fake tensors never allocate


@dataclass(frozen=True)
class PlanningShape:
    """The sizes a step is planned for: `batch` sequences of `new_tokens` each, `kv_blocks` blocks per
    sequence in the block table (the past the step attends over)."""

    batch: int
    new_tokens: int
    kv_blocks: int


@dataclass(frozen=True)
class Buffer:
    node: str  # the node that allocates it
    output: int  # which tensor of that node's output (0 unless the op returns several)
    size: int  # bytes, rounded up to the plan's alignment
    first: int  # index (in graph order) of the allocating node
    last: int  # index of the last node that reads it or one of its aliases
    offset: int = -1  # in the arena; -1 until assigned


@dataclass
class MemoryPlan:
    buffers: list[Buffer]
    peak_bytes: int  # arena size
    naive_bytes: int  # every buffer its own memory: the sum of all sizes
    live_bytes: int  # the largest sum of sizes live at one node: no plan can be smaller

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "naive_bytes": self.naive_bytes, "live_bytes": self.live_bytes,
                "alignment": ALIGNMENT, "buffers": [asdict(b) for b in self.buffers]}


def overlaps(a: Buffer, b: Buffer) -> bool:
    return a.first <= b.last and b.first <= a.last


def largest_live_set(buffers: Iterable[Buffer]) -> int:
    """max over nodes of the bytes live at that node."""
    delta: dict[int, int] = {}
    for b in buffers:
        delta[b.first] = delta.get(b.first, 0) + b.size
        delta[b.last + 1] = delta.get(b.last + 1, 0) - b.size
    live = best = 0
    for index in sorted(delta):
        live += delta[index]
        best = max(best, live)
    return best


def assign_offsets(buffers: Sequence[Buffer]) -> list[Buffer]:
    """Greedy by size, best fit: the buffers (same order) with offsets; no two with overlapping lives share
    a byte. Ties break on (first, last, node, output), so the result depends on the buffers alone."""
    placed: list[Buffer] = []
    for b in sorted(buffers, key=lambda b: (-b.size, b.first, b.last, b.node, b.output)):
        best = best_gap = None
        top = 0  # the highest end among overlapping buffers at or below the current gap
        for p in sorted((p for p in placed if overlaps(p, b)), key=lambda p: p.offset):
            gap = p.offset - top
            if gap >= b.size and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, p.offset + p.size)
        placed.append(replace(b, offset=top if best is None else best))
    where = {(p.node, p.output): p.offset for p in placed}
    return [replace(b, offset=where[(b.node, b.output)]) for b in buffers]


def _aligned(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment


class _FakeRun(fx.Interpreter):
    """Runs the graph on fake tensors, keeping every node's value (and so every storage) alive: storage
    identity is then a sound alias test, since no storage is freed and reused mid-run."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, object] = {}

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):  # a stand-in: weights may be on meta, and are never read
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=PLAN_DEVICE)
        return value

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        self.values[n] = value
        return value


def _fake_inputs(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=PLAN_DEVICE) for t in inputs]


def liveness(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], alignment: int = ALIGNMENT) -> list[Buffer]:
    """The graph's activation buffers with their live ranges (no offsets) at the sizes of `inputs` (real,
    meta or fake tensors: only their shapes, strides and dtypes are used)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        run = _FakeRun(gm)
        run.run(*_fake_inputs(inputs))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    owner: dict[StorageWeakRef, tuple[str, int]] = {}  # storage -> (allocating node, output index)
    external: set[StorageWeakRef] = set()
    first: dict[tuple[str, int], int] = {}
    size: dict[tuple[str, int], int] = {}
    node_buffers: dict[fx.Node, set[tuple[str, int]]] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        tensors = [t for t in tree_leaves(run.values.get(n)) if isinstance(t, torch.Tensor)]
        held = set()
        for k, t in enumerate(tensors):
            storage = StorageWeakRef(t.untyped_storage())
            if storage in external:
                continue
            if n.op in ("placeholder", "get_attr"):
                external.add(storage)
                continue
            if storage not in owner:
                nbytes = t.untyped_storage().nbytes()
                if nbytes == 0:
                    continue
                owner[storage] = (n.name, k)
                first[(n.name, k)] = order[n]
                size[(n.name, k)] = _aligned(nbytes, alignment)
            held.add(owner[storage])
        node_buffers[n] = held
    last = dict(first)
    for n, held in node_buffers.items():
        for user in n.users:
            if user.target is operator.getitem and isinstance(run.values.get(n), (tuple, list)):
                continue  # picks one output, which it aliases: its own users extend that one alone
            for key in held:
                last[key] = max(last[key], order[user])
    return [Buffer(node, k, size[(node, k)], first[(node, k)], last[(node, k)]) for node, k in first]


def plan_memory(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], alignment: int = ALIGNMENT) -> MemoryPlan:
    """The arena plan of `gm` run on tensors shaped like `inputs`."""
    buffers = assign_offsets(liveness(gm, inputs, alignment))
    peak = max((b.offset + b.size for b in buffers), default=0)
    return MemoryPlan(buffers, peak, sum(b.size for b in buffers), largest_live_set(buffers))


def step_inputs(config: dict, block_size: int, dtype: torch.dtype, shape: PlanningShape) -> tuple:
    """Meta tensors shaped like one paged step's inputs (common/contract.py STEP_INPUTS) at `shape`; `config` is
    the manifest's model section."""
    cache = (config["num_layers"], shape.batch * shape.kv_blocks, block_size, config["num_kv_heads"],
             config["head_dim"])
    with torch.device("meta"):
        tokens = torch.empty(shape.batch, shape.new_tokens, dtype=torch.long)
        return (tokens, torch.empty_like(tokens), torch.empty(cache, dtype=dtype), torch.empty(cache, dtype=dtype),
                torch.empty(shape.batch, shape.kv_blocks, dtype=torch.long),
                torch.empty(shape.batch, dtype=torch.long), torch.empty(shape.batch, dtype=torch.long),
                torch.empty_like(tokens))


def planning_shapes(graph_name: str, max_seq_len: int, block_size: int, prefill_chunk: int,
                    max_batch: int = DEFAULT_MAX_BATCH) -> list[PlanningShape]:
    """The shapes a bundle's graph is planned for (see the module docstring for why these)."""
    blocks = math.ceil(max_seq_len / block_size)
    new_tokens = {"prefill": min(prefill_chunk, max_seq_len), "decode": 1}.get(graph_name)
    if new_tokens is None:
        raise ValueError(f"no planning shape for graph {graph_name!r}: add one to runtime/plan.py planning_shapes")
    return [PlanningShape(batch=b, new_tokens=new_tokens, kv_blocks=blocks) for b in sorted({1, max_batch})]


def meta_weights(graph: dict) -> dict[str, torch.Tensor]:
    """A meta tensor for every get_attr of graph.json's graphs, from the shape and dtype recorded there."""
    return {n["target"]: torch.empty(n["shape"], dtype=getattr(torch, n["dtype"]), device="meta")
            for g in graph["graphs"].values() for n in g["nodes"] if n["op"] == "get_attr"}


def plan_bundle(graph: dict, config: dict, dtype: torch.dtype, block_size: int, max_seq_len: int,
                prefill_chunk: int, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, list[dict]]:
    """{graph name: [{"shape": PlanningShape as a dict, **MemoryPlan.to_dict()}, ...]} for a bundle's graph.json
    (`graph`) and the manifest's model section (`config`), at the shapes of planning_shapes; reads no weights."""
    tensors = meta_weights(graph)
    plans = {}
    for name, g in graph["graphs"].items():
        gm = graph_from_json(g, tensors, "cpu")
        plans[name] = [{"shape": asdict(shape),
                        **plan_memory(gm, step_inputs(config, block_size, dtype, shape)).to_dict()}
                       for shape in planning_shapes(name, max_seq_len, block_size, prefill_chunk, max_batch)]
    return plans
