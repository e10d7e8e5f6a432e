"""Host overhead of a decode step: the time outside the ops' own kernels, for an llmc bundle at batch 1.

A step's wall time (median over --steps decode steps, no profiler) is split with torch.profiler over the same
steps: "kernels" are the aten / mkldnn ops that compute (their exclusive CPU time), everything else is
overhead: Python (the engine, the FX graph's code, llmc's op bodies between kernels), dispatch, view and
metadata ops (VIEW_OPS), building the step's input tensors and sampling. The profiler makes every op slower, so
the overhead fraction is the profiled one (an upper bound) scaled to the unprofiled wall time: overhead =
unprofiled wall - kernel time.

    python bench/step_overhead.py BUNDLE [--threads 2] [--steps 64]   -> bench/results/<device>/step_overhead-<name>.{json,md}
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Ops that move no data (or only allocate): overhead, not kernels.
VIEW_OPS = {"aten::view", "aten::slice", "aten::select", "aten::transpose", "aten::as_strided", "aten::unsqueeze",
            "aten::squeeze", "aten::reshape", "aten::_unsafe_view", "aten::expand", "aten::t", "aten::permute",
            "aten::narrow", "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::empty_like",
            "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::chunk", "aten::split",
            "aten::unbind", "aten::sym_size", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero",
            "aten::contiguous", "aten::matmul", "aten::linear", "aten::flatten", "aten::set_", "aten::result_type"}


def kernel_seconds(events) -> tuple[float, dict]:
    per_op: dict = {}
    for e in events:
        if e.key.startswith(("aten::", "mkldnn::")) and e.key not in VIEW_OPS:
            per_op[e.key] = per_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    return sum(per_op.values()), per_op


def main() -> None:
    import llmc  # first: it sets the OpenMP wait policy before torch loads (llmc/openmp.py)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmc.bench import probe

    p = probe.script_parser(__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--steps", type=int, default=64)
    a = p.parse_args()
    load = probe.quiet_or_exit(a.force)

    torch.set_num_threads(a.threads)
    engine = llmc.load(a.bundle, prefix_caching=False)
    prompt = engine.chat_prompt([{"role": "user", "content": "Write a short poem about the sea."}])
    engine.generate([prompt], max_new_tokens=8)
    walls = []
    for _ in range(a.repeat):
        engine.generate([prompt], max_new_tokens=a.steps + 1)
        walls.append(engine.timing.decode_s / engine.timing.decode_tokens)
    wall = statistics.median(walls)
    profiled = {}
    for new in (1, a.steps + 1):  # the prompt's prefill alone, then with the decode steps: the difference
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            engine.generate([prompt], max_new_tokens=new)
            profiled_total = time.perf_counter() - t
        profiled[new] = kernel_seconds(prof.key_averages())
    profiled_step = engine.timing.decode_s / engine.timing.decode_tokens
    steps = engine.timing.decode_tokens
    per_op = {k: v - profiled[1][1].get(k, 0.0) for k, v in profiled[a.steps + 1][1].items()}
    kernel_step = (profiled[a.steps + 1][0] - profiled[1][0]) / steps
    report = {"device": probe.device_name(), "bundle": str(a.bundle), "dtype": engine.bundle.dtype,
              "quant": engine.bundle.manifest.get("quant"), "threads": a.threads, "load_at_start": load,
              "omp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
              "step_s": wall, "step_s_samples": walls, "profiled_step_s": profiled_step,
              "profiled_total_s": profiled_total, "kernel_s_per_step": kernel_step,
              "overhead_s_per_step": max(0.0, wall - kernel_step), "overhead_fraction": max(0.0, 1 - kernel_step / wall),
              "top_kernels": dict(sorted(((k, v / steps) for k, v in per_op.items()), key=lambda kv: -kv[1])[:12])}
    name = a.bundle.name.removesuffix(".llmc")
    out = a.out or RESULTS / probe.device_slug(report["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_overhead-{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"step_overhead-{name}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    ms = 1e3
    lines = [f"Decode step at batch 1, `{Path(r['bundle']).name}` ({r['dtype']}, quant {r['quant'] or 'none'}), "
             f"{r['device']}, {r['threads']} threads, OpenMP {r['omp']}. `python bench/step_overhead.py`", "",
             f"- step: {r['step_s'] * ms:.2f} ms (median of {len(r['step_s_samples'])}, "
             f"{min(r['step_s_samples']) * ms:.2f}-{max(r['step_s_samples']) * ms:.2f}); under the profiler "
             f"{r['profiled_step_s'] * ms:.2f} ms",
             f"- kernels: {r['kernel_s_per_step'] * ms:.2f} ms; host overhead outside them: "
             f"{r['overhead_s_per_step'] * ms:.2f} ms = {r['overhead_fraction']:.0%} of the step", "",
             "| kernel | ms per step |", "| --- | --- |"]
    lines += [f"| {k} | {v * ms:.3f} |" for k, v in r["top_kernels"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
