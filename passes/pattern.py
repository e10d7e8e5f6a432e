"""Shared machinery of the passes: a pattern written in plain torch, matched in aten graphs, and replaced.

A `Pattern` is a list of variant functions (the spellings real models use: `weight * h` or `h * weight`, ...)
traced with torch.export + run_decompositions({}), the tracer our graphs come from, once per example dtype,
so a pattern's nodes look exactly like the graph's (casts that vanish in float32 vanish in the pattern too).
Matching is torch.fx's SubgraphMatcher, followed by our own literal check:
- every literal in the pattern must equal the graph's, except scalars the pattern captures: a variant takes
  them as keyword arguments, traced with an unusual sentinel value, and the value found in the graph at that
  place lands in `Match.scalars` (eps, for instance);
- patterns are typed: every matched input has the dtype its example input was traced with, so a pattern
  traced in bfloat16 never fires on a float16 graph whose casts would then mean something else.
`replace_all` inserts the replacement a pass builds, gives every new node its `meta["val"]` (the fake tensor
later passes read dtypes and shapes from), checks it has the shape and dtype of what it replaces, and counts.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher
from torch.utils import _pytree as pytree

from .options import CompileOptions
from .strip_asserts import remove_assertions

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class PassContext:
    """What every pass may ask: the target (an llmc.common.targets Target, or None for target-independent passes)
    and the model dtype. `note` records a fallback or a skipped rewrite for the pipeline report."""

    target: Any = None
    dtype: torch.dtype | None = None  # a name ("bfloat16") is accepted and turned into the torch.dtype
    max_seq_len: int | None = None  # the bundle's longest sequence: the length of tables folded at compile time
    # The compile's options (passes/options.py): sliding window and attention sparsity (block_attention), the
    # quantization config or policy (quantize), the structured-sparsity config (sparsify).
    options: CompileOptions = field(default_factory=CompileOptions)
    # Calibration: graph inputs (tuples, in the graph's placeholder order) that calibration-aware passes run
    # through the graph they rewrite, and what they measured, by weight name, shared between the graphs.
    calibration: list | None = None
    calibration_stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.dtype, str):
            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {self.dtype!r}: use a torch dtype name such as bfloat16")
            self.dtype = dtype

    @property
    def sliding_window(self) -> int:
        return self.options.sliding_window

    @property
    def attention_keep(self) -> float:
        return self.options.attention_keep

    @property
    def attention_block(self) -> int:
        return self.options.attention_block

    @property
    def quant(self):
        return self.options.quant

    @property
    def sparsity(self):
        return self.options.sparsity

    def note(self, message: str) -> None:
        self.notes.append(message)


@dataclass
class Match:
    """One occurrence of a pattern in a graph."""

    graph: Graph
    variant: str  # "<function name>[<dtype>]"
    inputs: dict[str, Node]  # pattern parameter name -> graph node
    scalars: dict[str, Any]  # captured scalar name -> the literal found in the graph
    outputs: list[Node]  # graph nodes standing for the pattern's outputs, in order
    nodes: list[Node]  # every matched graph node that is not an input, in graph order

    def val(self, name: str) -> torch.Tensor:
        """The fake tensor (shape, dtype) of input `name`."""
        return self.inputs[name].meta["val"]


class _StructuralMatcher(SubgraphMatcher):
    """SubgraphMatcher matching nodes only; `Pattern._literals_agree` then compares literals with the context
    (captured scalars, free ops) the stock `ignore_literals` lacks. Unlike `ignore_literals`, a pattern node
    facing a literal is a mismatch: the stock flag accepts `mul(x, rsqrt(..))` against `mul(x, 1.0)`.
    Overlaps are resolved by `Pattern.find` after its checks, so a rejected match never hides a good one."""

    def __init__(self, pattern: Graph):
        super().__init__(pattern, remove_overlapping_matches=False)

    def _match_literals(self, pn, gn, match) -> bool:
        return not isinstance(pn, Node)


@dataclass
class _Variant:
    name: str
    graph: Graph
    input_names: list[str]
    input_dtypes: list[torch.dtype]
    matcher: SubgraphMatcher


class Pattern:
    """A subgraph to find, written as plain torch functions.

    variants: functions `fn(*tensors, **scalars)` returning a tensor or a tuple of tensors; tensor parameter
      names become `Match.inputs` keys. Use scalars directly (`x + eps`), not in arithmetic that export would
      fold into another constant.
    example_inputs: dtype -> the example tensors (any sizes the functions accept).
    dtypes: the dtypes each variant is traced and matched in.
    scalars: captured scalar name -> the sentinel it is traced with (a value no other literal of the pattern has).
    extra_check: match -> bool, for conditions on dtypes, shapes, the target (a match it rejects is left alone).
    free_literal_ops: targets whose literal arguments are not compared (shape lists of view, expand, ...).
    """

    def __init__(self, name: str, variants: Sequence[Callable], example_inputs: Callable[[torch.dtype], tuple],
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, scalars: dict[str, float | int] | None = None,
                 extra_check: Callable[[Match], bool] | None = None, free_literal_ops: Sequence = ()):
        self.name = name
        self.functions = list(variants)
        self.example_inputs = example_inputs
        self.dtypes = tuple(dtypes)
        self.scalars = dict(scalars or {})
        self.extra_check = extra_check
        self.free_literal_ops = frozenset(free_literal_ops)
        sentinels = list(self.scalars.values())
        if len(set(sentinels)) != len(sentinels):
            raise ValueError(f"pattern {name}: scalar sentinels must be distinct, got {self.scalars}")

    @cached_property
    def variants(self) -> list[_Variant]:
        """The traced variants, largest first, without duplicates (a spelling with casts traced in float32 is
        the cast-free one). Largest first, so a variant never claims the inside of a larger one's match: the
        float32 core of a bfloat16 norm is itself a float32 norm."""
        variants, seen = [], set()
        for dtype in self.dtypes:
            inputs = self.example_inputs(dtype)
            for fn in self.functions:
                graph = _trace(fn, inputs, self.scalars)
                key = (graph.python_code("self").src, tuple(t.dtype for t in inputs))
                if key in seen:
                    continue
                seen.add(key)
                names = list(inspect.signature(fn).parameters)[:len(inputs)]
                matcher = _StructuralMatcher(graph)
                variants.append(_Variant(f"{fn.__name__}[{_dtype_name(dtype)}]", graph, names,
                                         [t.dtype for t in inputs], matcher))
        return sorted(variants, key=lambda v: -len(v.graph.nodes))

    def find(self, graph: Graph) -> list[Match]:
        """Every non-overlapping match in `graph` that passes the literal, dtype and extra checks; where
        matches of different variants overlap, the one of the earlier (larger) variant wins."""
        found, claimed = [], set()
        order = {node: i for i, node in enumerate(graph.nodes)}
        for variant in self.variants:
            for internal in variant.matcher.match(graph):
                match = self._to_match(graph, variant, internal, order)
                if match is None or claimed.intersection(match.nodes):
                    continue
                if self.extra_check is not None and not self.extra_check(match):
                    continue
                claimed.update(match.nodes)
                found.append(match)
        return found

    def _to_match(self, graph: Graph, variant: _Variant, internal, order: dict[Node, int]) -> Match | None:
        inputs = dict(zip(variant.input_names, internal.placeholder_nodes, strict=True))
        for node, dtype in zip(inputs.values(), variant.input_dtypes, strict=True):
            val = node.meta.get("val") if isinstance(node, Node) else None
            if not isinstance(val, torch.Tensor) or val.dtype != dtype:
                return None
        scalars: dict[str, Any] = {}
        for pn, gn in internal.nodes_map.items():
            if pn.op == "call_function" and not self._literals_agree(pn, gn, scalars):
                return None
        if set(scalars) != set(self.scalars):
            return None
        nodes = sorted((gn for pn, gn in internal.nodes_map.items() if pn.op not in ("placeholder", "output")),
                       key=order.__getitem__)
        return Match(graph, variant.name, inputs, scalars, list(internal.returning_nodes), nodes)

    def _literals_agree(self, pn: Node, gn: Node, scalars: dict[str, Any]) -> bool:
        free = pn.target in self.free_literal_ops
        sentinel_names = {v: k for k, v in self.scalars.items()}

        def agree(p, g) -> bool:
            if isinstance(p, Node) or isinstance(g, Node):
                # Node pairs were matched structurally; a literal of the pattern facing a node of the graph
                # (a symbolic size where the pattern has a number) only passes in a free op.
                return (isinstance(p, Node) and isinstance(g, Node)) or free
            if isinstance(p, (list, tuple)) and isinstance(g, (list, tuple)):
                return len(p) == len(g) and all(agree(a, b) for a, b in zip(p, g))
            if free:
                return True
            if type(p) in (int, float) and p in sentinel_names:
                name = sentinel_names[p]
                if type(g) not in (int, float) or scalars.setdefault(name, g) != g:
                    return False
                return True
            return type(p) is type(g) and p == g

        return agree(_arguments(pn), _arguments(gn))


def replace_all(gm: GraphModule, pattern: Pattern, build_replacement: Callable[[Match], Node | Sequence[Node]]) -> int:
    """Replaces every match of `pattern` in gm.graph by what `build_replacement(match)` inserts (it creates nodes
    with `match.graph.call_function(...)`; the insertion point is set) and returns the number of rewrites.

    The replaced nodes are erased at once, so a later pattern never matches their remains.
    """
    return replace_matches(gm, pattern.name, pattern.find(gm.graph), build_replacement)


def replace_matches(gm: GraphModule, name: str, matches: Sequence[Match],
                    build_replacement: Callable[[Match], Node | Sequence[Node]]) -> int:
    """`replace_all` for matches a pass found and filtered itself (by work it does once for many matches)."""
    graph = gm.graph
    mode = _fake_mode(graph)
    replaced: dict[Node, Node] = {}
    count = 0
    for match in matches:
        match.inputs = {k: replaced.get(v, v) for k, v in match.inputs.items()}
        last = match.nodes[-1]  # a single output is the last node; its users all follow it
        if len(match.outputs) > 1:
            order = {node: i for i, node in enumerate(graph.nodes)}
            users = [u for out in match.outputs for u in out.users if u not in match.nodes]
            if any(order[u] <= order[last] for u in users):
                continue  # results used between the match's own nodes: no single place fits the replacement
        with graph.inserting_before(last.next):
            new = build_replacement(match)
        new_outputs = [new] if isinstance(new, Node) else list(new)
        if len(new_outputs) != len(match.outputs):
            raise RuntimeError(f"pattern {name}: replacement gives {len(new_outputs)} outputs, "
                               f"the pattern {len(match.outputs)}")
        for old, fresh in zip(match.outputs, new_outputs):
            _fill_meta(gm, fresh, mode)
            _check_same_type(name, old, fresh)
            for key in ("stack_trace", "nn_module_stack"):
                if key in old.meta:
                    fresh.meta.setdefault(key, old.meta[key])
            old.replace_all_uses_with(fresh)
            replaced[old] = fresh
        for node in reversed(match.nodes):
            if not node.users:
                graph.erase_node(node)
        count += 1
    return count


@contextlib.contextmanager
def _without_guard_checks():
    """run_decompositions re-traces ep.module(), which inserts a `_guards_fn` checking the example inputs' shapes.
    Inside a torch.compile backend (llmc/backend.py traces patterns lazily there), torch 2.13 sometimes generates
    that function with dynamo's `L[...]` names left in: a NameError that depends on the hash seed (reproduced with
    PYTHONHASHSEED=3). A pattern graph is only matched, never run on other inputs, so it needs no guards."""
    original = torch.export.ExportedProgram.module

    def module(self, check_guards=True):
        return original(self, check_guards=False)

    torch.export.ExportedProgram.module = module
    try:
        yield
    finally:
        torch.export.ExportedProgram.module = original


def _trace(fn: Callable, inputs: tuple, scalars: dict) -> Graph:
    class Wrapped(torch.nn.Module):
        def forward(self, *args):
            return fn(*args, **scalars)

    with torch.no_grad(), _without_guard_checks():
        ep = torch.export.export(Wrapped(), tuple(inputs)).run_decompositions({})
    graph = ep.graph_module.graph
    remove_assertions(graph)
    graph.eliminate_dead_code()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"pattern {fn.__name__} traced to {len(placeholders)} inputs for {len(inputs)} example "
                         "tensors: build tensors from the inputs, not inside the pattern")
    literals = {a for n in graph.nodes for a in pytree.tree_leaves((n.args, n.kwargs)) if type(a) in (int, float)}
    lost = [name for name, sentinel in scalars.items() if sentinel not in literals]
    if lost:
        raise ValueError(f"pattern {fn.__name__}: scalars {lost} do not appear as literals in the traced graph; "
                         "use them directly, not inside arithmetic export folds")
    return graph


def _arguments(node: Node) -> list:
    """The node's arguments in schema order with defaults filled in, so `f(x, 2)` and `f(x, p=2)` compare equal."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return [*node.args, *node.kwargs.values()]
    out = []
    for i, arg in enumerate(target._schema.arguments):
        if arg.name in node.kwargs:
            out.append(node.kwargs[arg.name])
        elif not arg.kwarg_only and i < len(node.args):
            out.append(node.args[i])
        else:
            out.append(arg.default_value)
    return out


def _fake_mode(graph: Graph) -> FakeTensorMode:
    """The fake mode the graph's meta values live in (new values must share it, and its symbolic sizes)."""
    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)


def _fill_meta(gm: GraphModule, node: Node, mode: FakeTensorMode) -> None:
    """Computes meta["val"] of a new node (and of new nodes it reads) by running it on fake tensors."""
    if "val" in node.meta:
        return
    for arg in node.all_input_nodes:
        _fill_meta(gm, arg, mode)
    if node.op == "get_attr":
        tensor = gm
        for part in node.target.split("."):
            tensor = getattr(tensor, part)
        node.meta["val"] = mode.from_tensor(tensor)
        return
    if node.op != "call_function":
        raise RuntimeError(f"cannot infer the type of new node {node.format_node()}")
    args, kwargs = pytree.tree_map_only(Node, lambda n: n.meta["val"], (node.args, node.kwargs))
    with mode, torch.no_grad():
        node.meta["val"] = node.target(*args, **kwargs)


def _check_same_type(pattern_name: str, old: Node, new: Node) -> None:
    """A replacement must produce what it replaces: a mismatch is a bug in the pass, not in the model."""
    before, after = old.meta.get("val"), new.meta["val"]
    if not isinstance(before, torch.Tensor):
        return
    same = (isinstance(after, torch.Tensor) and before.dtype == after.dtype and before.dim() == after.dim()
            and all(statically_known_true(a == b) for a, b in zip(before.shape, after.shape)))
    if not same:
        raise RuntimeError(f"pattern {pattern_name}: replacement {new.format_node()} gives "
                           f"{_describe(after)} where the graph had {_describe(before)}")


def _describe(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_dtype_name(val.dtype)}{list(val.shape)}"
    return type(val).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
