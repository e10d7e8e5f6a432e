"""CPU: the onnx backend (onnxruntime, IO binding) against the default backend's graphs (llmc ops' torch references)
on one model, same process, same engine code: prefill time by prompt length and decode step time by batch size.

    python bench/onnx_vs_reference.py [--model llmc-tiny] [--lengths 128 511] [--batches 1 8 32]

Writes bench/results/<device>/onnx-vs-reference.json and .md. float32: onnxruntime's CPU provider has no bfloat16
kernels.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import llmc
from llmc.bench.probe import device_name, device_slug
from llmc.runtime.engine import load

ROOT = Path(__file__).resolve().parent.parent


def step_seconds(engine, batch: int, tokens: int, cached: int, repeat: int) -> float:
    """Median seconds of one graph call: `batch` rows of `tokens` new tokens after `cached` cached ones."""
    pool = engine.cache.pool
    blocks = [pool.allocate(pool.blocks_for(cached + tokens)) for _ in range(batch)]
    kind = "prefill" if tokens > 1 else "decode"
    ids = torch.randint(0, engine.bundle.config["vocab_size"], (batch, tokens)).tolist()
    times = []
    try:
        for _ in range(repeat + 1):  # the first call warms caches and allocators
            start = time.perf_counter()
            engine.run_step(kind, blocks, [cached] * batch, ids)
            times.append(time.perf_counter() - start)
    finally:
        for b in blocks:
            pool.free(b)
    return statistics.median(times[1:])


def measure(bundle: Path, lengths, batches, context: int, repeat: int) -> dict:
    longest = max(max(lengths), context + 1)
    engine = load(bundle, kv_cache_tokens=max(batches) * (longest + 32), prefix_caching=False)
    return {"prefill_s": {n: step_seconds(engine, 1, n, 0, repeat) for n in lengths},
            "decode_s": {b: step_seconds(engine, b, 1, context, repeat) for b in batches}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llmc-tiny")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 511])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, default=256, help="cached tokens per row during decode")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = device_name("cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("triton", "onnx"):
            bundle = llmc.compile(args.model, target="cpu", dtype="float32", backend=backend,
                                  out=Path(tmp) / f"{backend}.llmc")
            results[backend] = measure(bundle, args.lengths, args.batches, args.context, args.repeat)
    report = {"model": args.model, "device": device, "dtype": "float32", "threads": torch.get_num_threads(),
              "context": args.context, **results}
    out = args.out or ROOT / "bench" / "results" / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx-vs-reference.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [f"{args.model} on {device}, float32, {report['threads']} threads: the default backend's graph (torch "
            "reference ops on CPU) vs --backend onnx (onnxruntime), `python bench/onnx_vs_reference.py`", "",
            "| step | reference | onnxruntime | onnxruntime speed-up |", "|---|---|---|---|"]
    for key, label in (("prefill_s", "prefill {} tokens"), ("decode_s", f"decode batch {{}}, {args.context} cached")):
        for size, ref in results["triton"][key].items():
            ort = results["onnx"][key][size]
            rows.append(f"| {label.format(size)} | {ref * 1e3:.1f} ms | {ort * 1e3:.1f} ms | {ref / ort:.2f}x |")
    (out / "onnx-vs-reference.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
