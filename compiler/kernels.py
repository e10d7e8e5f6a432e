"""The bundle's kernels/ for a GPU target: plan the Triton kernels both graphs launch, compile each distinct one
once for the target's arch (codegen/triton/aot.py, no GPU needed), and report what was built.

triton is imported only for GPU targets: a host that compiles for --target cpu does not need it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from llmc.common.errors import UsageError
from llmc.common.targets import Target


@dataclass
class KernelBuild:
    files: dict[str, bytes]  # relative to kernels/: write_bundle(extra_files=...)
    report: dict  # distinct_kernels, kernels_compiled, launches_served, launches_per_step, archs, seconds, ...

    def format(self) -> str:
        r = self.report
        per_step = ", ".join(f"{graph} {n}" for graph, n in r["launches_per_step"].items())
        ops = ", ".join(f"{op} {n}" for op, n in r["kernels_per_op"].items())
        return (f"kernels: {r['kernels_compiled']} compiled for {', '.join(r['archs'])} in {r['seconds']:.1f}s "
                f"({r['distinct_kernels']} distinct: {ops or 'none'}), serving {r['launches_served']} launches "
                f"({per_step} per step)")


def aot_for_target(graphs, target: Target, workers: int | None = None) -> KernelBuild | None:
    """Cubins for `target`'s arch of every kernel the traced, passed `graphs` (compiler.trace.Traced) launch, with
    the Triton sources as the JIT fallback; None for the cpu target."""
    if not target.is_gpu:
        return None
    try:
        from llmc.codegen.triton import aot, plan
    except ImportError as e:
        raise UsageError(f"compiling for {target.name} builds Triton kernels and needs triton ({e}): "
                         "pip install 'llmc[gpu]', or compile with --target cpu") from None
    start = time.perf_counter()
    per_graph = {t.name: plan.kernel_specs(t.gm, target.arch) for t in graphs}
    plan_seconds = time.perf_counter() - start
    result = aot.compile_all([spec for specs in per_graph.values() for spec in specs], [target.arch], workers=workers)
    # A step's launches, each graph at its own shape class (a decode step, a prefill of a long prompt); the kernels'
    # own counts (index.json) are call sites per shape class, so they add up to more than one step launches.
    size = {"decode": plan.CLASS_DIM_SIZE["decode"], "prefill": plan.CLASS_DIM_SIZE["prefill"]}
    per_step = {t.name: plan.launches_per_step(t.gm, target.arch, size.get(t.name, size["prefill"])) for t in graphs}
    report = {**result.report(), "launches_served": sum(per_step.values()), "launches_per_step": per_step,
              "plan_seconds": round(plan_seconds, 3),
              "kernels_per_op": _kernels_per_op(result)}
    return KernelBuild(aot.kernel_files(result), report)


def _kernels_per_op(result) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in result.kernels.values():
        for op in entry.ops:
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))
