"""cpu_attention: llmc::paged_attention_cpu (codegen/cpu/attention.py) against its reference llmc::paged_attention,
one layer, on the CPU, alternated in one run on the same inputs, with the device named.

Shapes: llmc-tiny's heads (models/embedded/config.json: 4 query heads over 2 kv heads, head_dim 64) and
qwen3-0.6b's (16 over 8, head_dim 128); KV blocks of 16 tokens, each sequence's blocks shuffled over the cache.
decode: one new token for each of B sequences with `context` cached tokens each (B 1 / 8 / 32, context 128 / 512 /
  2048; llmc-tiny itself stops at 512 positions, its rows beyond are the op at that head geometry); GB/s counts the
  cached keys and values read once (2 * B * context * Hkv * D * element bytes).
prefill: a 512-token chunk of one sequence over 512 / 1536 cached tokens (chunked prefill).
Method: 2 threads, OMP_WAIT_POLICY=PASSIVE (set before torch starts OpenMP), the two ops alternated within each
repetition (each going first in turn), medians and min-max over --repeat samples (a sample: the mean of as many
calls as take about 20 ms, at least one) after one warm-up call each; refuses to run when the 1-minute load average
is above --max-load (another process on the cores makes the figures meaningless).
Writes bench/results/<device>/cpu_attention.{json,md} (and .png with matplotlib).
Run: python bench/bench_cpu_attention.py [--dtypes float32 bfloat16] [--repeat 5] [--quick]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import llmc.codegen.ops  # noqa: E402,F401  (registers torch.ops.llmc)
from llmc.models.config import ModelConfig  # noqa: E402
from llmc.models.registry import EMBEDDED_DIR, get_config  # noqa: E402
from llmc.bench.probe import device_name, device_slug  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BLOCK_SIZE = 16
SAMPLE_S = 0.02  # fast cases average several calls per sample: one call of 0.2 ms is mostly timer and jitter
OPS = {"reference": torch.ops.llmc.paged_attention, "cpu": torch.ops.llmc.paged_attention_cpu}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark llmc's CPU paged attention against its reference.")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per op and case (at least 5 to publish)")
    parser.add_argument("--quick", action="store_true", help="batch 1 / 8 at contexts 128 / 512 only")
    parser.add_argument("--max-load", type=float, default=0.5, help="refuse above this 1-minute load average")
    parser.add_argument("--out", type=Path, default=None, help="directory (default bench/results/<device>/)")
    return parser.parse_args()


def models() -> dict[str, ModelConfig]:
    tiny = ModelConfig.from_hf(json.loads((EMBEDDED_DIR / "config.json").read_text()))
    return {"llmc-tiny": tiny, "qwen3-0.6b": get_config("qwen3-0.6b")}


def cases(quick: bool) -> list[dict]:
    batches, contexts = ((1, 8), (128, 512)) if quick else ((1, 8, 32), (128, 512, 2048))
    decode = [{"mode": "decode", "batch": b, "seq": 1, "past": c} for b in batches for c in contexts]
    prefill = [{"mode": "prefill", "batch": 1, "seq": 512, "past": c} for c in ((512,) if quick else (512, 1536))]
    return decode + prefill


def step_inputs(config: ModelConfig, case: dict, dtype: torch.dtype) -> list:
    """[q, k, v, k_cache, v_cache, block_table, past_lens, scale] with each sequence's blocks shuffled."""
    batch, seq, past = case["batch"], case["seq"], case["past"]
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    per_sequence = -(-(past + seq) // BLOCK_SIZE)
    num_blocks = batch * per_sequence + 1
    k_cache, v_cache = (torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim).to(dtype) for _ in range(2))
    block_table = torch.randperm(num_blocks)[: batch * per_sequence].view(batch, per_sequence)
    q = torch.randn(batch, seq, heads, head_dim).to(dtype)
    k, v = (torch.randn(batch, seq, kv_heads, head_dim).to(dtype) for _ in range(2))
    return [q, k, v, k_cache, v_cache, block_table, torch.full((batch,), past), head_dim ** -0.5]


def measure(inputs: list, repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each op: `repeat` samples each, the ops alternated (which goes first alternates too),
    a sample averaging as many calls as take about SAMPLE_S (one, for the slow cases) after one warm-up call."""
    calls = {}
    for name, op in OPS.items():
        start = time.perf_counter()
        op(*inputs, 0)
        calls[name] = max(1, int(SAMPLE_S / (time.perf_counter() - start)))
    samples = {name: [] for name in OPS}
    for i in range(repeat):
        for name in list(OPS)[i % 2:] + list(OPS)[:i % 2]:
            op = OPS[name]
            start = time.perf_counter()
            for _ in range(calls[name]):
                op(*inputs, 0)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return samples


def run_case(model: str, config: ModelConfig, case: dict, dtype_name: str, repeat: int) -> dict:
    dtype = getattr(torch, dtype_name)
    inputs = step_inputs(config, case, dtype)
    want, got = OPS["reference"](*inputs, 0), OPS["cpu"](*inputs, 0)
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)  # never time a wrong kernel
    samples = measure(inputs, repeat)
    ms = {name: {"median": 1e3 * statistics.median(s), "min": 1e3 * min(s), "max": 1e3 * max(s)}
          for name, s in samples.items()}
    ratio = ms["reference"]["median"] / ms["cpu"]["median"]
    row = {"model": model, **case, "dtype": dtype_name, "ms": ms, "ratio": ratio}
    if case["mode"] == "decode":
        kv_bytes = 2 * case["batch"] * case["past"] * config.num_kv_heads * config.head_dim * dtype.itemsize
        row["cpu_GBps"] = kv_bytes / ms["cpu"]["median"] / 1e6
    return row


def describe(row: dict) -> str:
    if row["mode"] == "decode":
        return f"decode batch {row['batch']}, context {row['past']}"
    return f"prefill {row['seq']} over {row['past']} cached"


def markdown(report: dict) -> str:
    lines = [f"paged attention, one layer: llmc::paged_attention_cpu vs the reference llmc::paged_attention on "
             f"{report['device']}; {report['threads']} threads, torch {report['torch']}; 1-minute load average "
             f"{report['load_before']:.2f} before the run ({report['load_after']:.2f} after, its own threads "
             f"included); median (min-max) of {report['repeat']} alternated samples. Decode rows all hold "
             f"`context` cached tokens.", "",
             "| model shapes | dtype | case | reference ms | cpu ms | reference / cpu | cpu GB/s |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        cells = [f"{m['median']:.3f} ({m['min']:.3f}-{m['max']:.3f})" for m in row["ms"].values()]
        rate = f"{row['cpu_GBps']:.1f}" if "cpu_GBps" in row else "-"
        lines.append(f"| {row['model']} | {row['dtype']} | {describe(row)} | {cells[0]} | {cells[1]} | "
                     f"{row['ratio']:.2f}x | {rate} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, directory: Path) -> list[Path]:
    """Reference / cpu per case, one bar group per model and dtype; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # plots are optional (pip install llmc[bench])
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(row["model"], row["dtype"]) for row in report["rows"]})
    labels = list(dict.fromkeys(describe(row) for row in report["rows"]))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        ratio = {describe(r): r["ratio"] for r in report["rows"] if (r["model"], r["dtype"]) == group}
        ax.bar([x + i * width for x in range(len(labels))], [ratio.get(label, 0) for label in labels], width,
               label=" ".join(group))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=45, ha="right", fontsize=7)
    ax.set(yscale="log", ylabel="reference / cpu (speed-up)", title=f"paged attention, one layer\n{report['device']}")
    ax.axhline(1, color="gray", linestyle="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / "cpu_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def main() -> None:
    args = parse_args()
    load = os.getloadavg()[0]
    if load > args.max_load:
        raise SystemExit(f"the 1-minute load average is {load:.2f} (> {args.max_load}): another process is using "
                         f"the cores; wait and run again (or raise --max-load, and do not publish the figures)")
    torch.set_num_threads(args.threads)
    device = device_name("cpu")
    rows = []
    for model, config in models().items():
        for dtype_name in args.dtypes:
            for case in cases(args.quick):
                row = run_case(model, config, case, dtype_name, args.repeat)
                rows.append(row)
                ms = row["ms"]
                print(f"{model:<11} {dtype_name:<9} {describe(row):<32} reference {ms['reference']['median']:9.3f} "
                      f"ms  cpu {ms['cpu']['median']:8.3f} ms  {row['ratio']:6.2f}x", flush=True)
    report = {"op": "paged_attention_cpu", "device": device, "threads": args.threads, "repeat": args.repeat,
              "torch": torch.__version__, "load_before": load, "load_after": os.getloadavg()[0], "rows": rows}
    directory = args.out or RESULTS / device_slug(device)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu_attention.json").write_text(json.dumps(report, indent=1) + "\n")
    (directory / "cpu_attention.md").write_text(markdown(report))
    written = ["cpu_attention.json", "cpu_attention.md", *(p.name for p in plot(report, directory))]
    print(f"wrote {', '.join(written)} to {directory}")


if __name__ == "__main__":
    main()
