"""The pass pipeline: one ordered list of named passes in phases, a report per pass, and the numerics check.

`run_pipeline(..., check_inputs=...)` (the CLI's --check-passes) runs sample inputs through the graph after
every pass and compares all outputs with the unpassed graph's, so a wrong rewrite is named the moment it
happens instead of surfacing as bad tokens at the end.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from llmc.common.errors import LlmcError, UsageError
from llmc.passes import (block_attention, fold_constants, fold_rope, fuse_add_norm, fuse_kv_write, fuse_norm_linear,
                         fuse_rms_norm, lower_cpu, merge_projections, quantize, sparsify, strip_asserts)
from llmc.passes.graph_weights import releasing_weights
from llmc.passes.pattern import PassContext  # noqa: F401  (re-exported: callers build it from here)

# (phase, name, run(gm, ctx) -> rewrites), in the order they run.
# Later passes match llmc.rms_norm nodes, so fuse_rms_norm runs first; fold_rope absorbs the per-head q/k norms
# before fuse_add_norm / fuse_norm_linear claim the norms that feed GEMMs. block_attention matches the paged mask
# as the model builds it (ones / tril / arange of sizes), which no earlier pass folds; fuse_kv_write rewrites the
# keys' rope of the llmc.paged_attention calls it leaves. sparsify and quantize rewrite the fused GEMMs (merged,
# gains folded) and do nothing unless the compile asks for them (PassContext.sparsity / .quant); pruning first, so
# quantization sees the pruned weights. lower_cpu, last, swaps the target-independent ops for the CPU's lowerings of
# them (cpu targets only), once nothing else needs to match the reference ops.
PASSES = [
    ("cleanup", "strip_asserts", strip_asserts.run),
    ("canonicalize", "fuse_rms_norm", fuse_rms_norm.run),
    ("fold", "fold_rope", fold_rope.run),
    ("fold", "fold_constants", fold_constants.run),
    ("fusion", "block_attention", block_attention.run),
    ("fusion", "fuse_kv_write", fuse_kv_write.run),
    ("fusion", "merge_projections", merge_projections.run),
    ("fusion", "fuse_add_norm", fuse_add_norm.run),
    ("fusion", "fuse_norm_linear", fuse_norm_linear.run),
    ("quantize", "sparsify", sparsify.run),
    ("quantize", "quantize", quantize.run),
    ("lower", "lower_cpu", lower_cpu.run),
]

# (rtol, atol) by output dtype, from DESIGN.md: float32 allows for passes that change summation order.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


class UnknownPassError(LlmcError, ValueError):
    pass


class PassCheckError(LlmcError, ValueError):
    """A pass changed the graph's outputs; `.report` holds the records of the passes before it."""

    report: PipelineReport | None = None


@dataclass
class PassRecord:
    name: str
    phase: str
    rewrites: int
    nodes_before: int
    nodes_after: int
    seconds: float
    max_abs_diff: float | None  # largest |output - unpassed output| after this pass; None when not checked
    notes: list[str] = field(default_factory=list)  # fallbacks and skipped rewrites the pass reported (ctx.note)


@dataclass
class PipelineReport:
    graph: str
    records: list[PassRecord]

    def to_dict(self) -> dict:
        return {"graph": self.graph, "records": [asdict(r) for r in self.records]}

    def format(self) -> str:
        header = ("phase", "pass", "rewrites", "nodes", "seconds", "max |diff|")
        rows = [(r.phase, r.name, str(r.rewrites), f"{r.nodes_before} -> {r.nodes_after}", f"{r.seconds:.3f}",
                 "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}") for r in self.records]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [f"graph {self.graph}"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines += [f"  {r.name}: {note}" for r in self.records for note in r.notes]
        return "\n".join(lines)


def resolve_passes(spec: str | None) -> list[str]:
    """None -> every pass; "a,b" -> exactly those; "-a,-b" -> every pass but those. Pipeline order always."""
    known = [name for _, name, _ in PASSES]
    if spec is None:
        return known
    items = [item.strip() for item in spec.split(",") if item.strip()]
    excluded = [item.startswith("-") for item in items]
    if any(excluded) and not all(excluded):
        raise UsageError(f"--passes {spec!r} mixes names and -names: list the passes to run, or only the ones to skip")
    names = {item.removeprefix("-") for item in items}
    _check_known(names)
    if items and all(excluded):
        return [name for name in known if name not in names]
    return [name for name in known if name in names]


def _check_known(names) -> None:
    known = [name for _, name, _ in PASSES]
    unknown = sorted(set(names).difference(known))
    if unknown:
        raise UnknownPassError(f"unknown pass {', '.join(unknown)}; known passes: {', '.join(known)}")


def run_pipeline(gm: torch.fx.GraphModule, ctx: PassContext, passes: list[str], check_inputs: tuple | None = None,
                 graph_name: str = "prefill", free_weights: bool = False) -> PipelineReport:
    """Runs `passes` in the given order on gm, in place; after each: dead-code elimination, lint, recompile.

    With check_inputs (the graph's user inputs), every pass's outputs are compared with the unpassed graph's;
    the first divergence raises PassCheckError naming the pass. free_weights: a weight is freed as soon as no
    node reads it (graph_weights.releasing_weights), for a caller whose gm holds the only reference to its
    weights (compile); a pass rewriting every layer then holds one layer's old weights beside the new ones, not
    the whole model's.
    """
    _check_known(passes)
    table = {name: (phase, fn) for phase, name, fn in PASSES}
    dump = ctx.options.dump_after
    dump_index = dump_point(passes, dump[0]) if dump else None
    if dump_index == -1:
        _dump(gm, dump, graph_name, passes[:0])
    # gm has not been touched yet, so its outputs now are the unpassed graph's (no copy of the weights needed).
    expected = _outputs(gm, check_inputs) if check_inputs is not None else None
    records = []
    for index, name in enumerate(passes):
        phase, fn = table[name]
        nodes_before, first_note = len(gm.graph.nodes), len(ctx.notes)
        start = time.perf_counter()
        with releasing_weights(gm) if free_weights else contextlib.nullcontext():
            rewrites = fn(gm, ctx)
            gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        seconds = time.perf_counter() - start
        diff = None
        if expected is not None:
            diff, divergence = _compare(expected, _outputs(gm, check_inputs))
            if divergence is not None:
                error = PassCheckError(f"pass {name} broke the {graph_name} graph: {divergence}; "
                                       f"compile without it with --passes -{name}")
                error.report = PipelineReport(graph_name, records)  # the passes that ran fine before it
                raise error
        records.append(PassRecord(name, phase, rewrites, nodes_before, len(gm.graph.nodes), seconds, diff,
                                  ctx.notes[first_note:]))
        if index == dump_index:
            _dump(gm, dump, graph_name, passes[:index + 1])
    return PipelineReport(graph_name, records)


def dump_point(passes: list[str], where: str) -> int:
    """After which of `passes` (an index; -1: before the first) --dump-after WHERE writes the graph: WHERE names
    a pass, which must run, or a phase: after the last pass of that phase or an earlier one that runs."""
    phases = list(dict.fromkeys(phase for phase, _, _ in PASSES))
    if where in phases:
        order = {name: phases.index(phase) for phase, name, _ in PASSES}
        return max((i for i, name in enumerate(passes) if order[name] <= phases.index(where)), default=-1)
    if where in passes:
        return passes.index(where)
    known = [name for _, name, _ in PASSES]
    if where in known:
        raise UsageError(f"--dump-after {where}: that pass does not run in this compile (see --passes)")
    raise UsageError(f"--dump-after {where!r} names no phase ({', '.join(phases)}) and no pass ({', '.join(known)})")


def _dump(gm: torch.fx.GraphModule, dump: tuple[str, str], graph_name: str, ran: list[str]) -> None:
    """The graph as readable Python (shapes and dtypes on every line) into DIR/<graph>.after-<where>.txt."""
    where, directory = dump
    path = Path(directory) / f"{graph_name}.after-{where}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {graph_name} graph after --dump-after {where}; passes run: {', '.join(ran) or 'none'}\n"
    path.write_text(header + gm.print_readable(print_output=False), encoding="utf-8")


def _outputs(gm: torch.fx.GraphModule, inputs: tuple) -> list:
    # Inputs are cloned so a graph that writes into one cannot change what the next run sees.
    inputs = pytree.tree_map_only(torch.Tensor, torch.clone, inputs)
    with torch.no_grad():
        return pytree.tree_leaves(gm(*inputs))


def _compare(expected: list, actual: list) -> tuple[float, str | None]:
    """The largest absolute difference over all outputs, and what diverged past the dtype's tolerance (or None)."""
    if len(actual) != len(expected):
        return math.inf, f"{len(actual)} outputs instead of {len(expected)}"
    largest = 0.0
    for i, (want, got) in enumerate(zip(expected, actual)):
        if not isinstance(want, torch.Tensor):
            if got != want:
                return math.inf, f"output {i} is {got!r} instead of {want!r}"
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return math.inf, f"output {i} is {_describe(got)} instead of {_describe(want)}"
        if not want.is_floating_point():
            if not torch.equal(got, want):
                return math.inf, f"output {i}: {int((got != want).sum())} of {want.numel()} values differ"
            continue
        rtol, atol = TOLERANCES.get(want.dtype, TOLERANCES[torch.float32])
        got, want = got.double(), want.double()
        same = (got == want) | (got.isnan() & want.isnan())  # equal infinities and NaNs in the same places
        diff = torch.where(same, 0.0, (got - want).abs())
        worst = float(diff.max()) if diff.numel() else 0.0
        largest = max(largest, worst)
        if not torch.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True).all():
            return largest, f"output {i}: max abs diff {worst:.3g} (rtol {rtol:g}, atol {atol:g})"
    return largest, None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return repr(value)
