"""Shared driver of the bench_<op>.py microbenchmarks: the Triton kernel beside the unfused torch sequence and
torch.compile of that sequence, timed in the same run on the same inputs, printed as a table naming the device
and written as JSON to bench/results/<device>/<op>.json. GPU only."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmc.bench.probe import device_name, device_slug

RESULTS = Path(__file__).parent / "results"


def parse_args(op: str, default_shapes: list[str], extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"Benchmark llmc's Triton {op} kernel against torch eager and "
                                                 "torch.compile of the unfused ops (needs a CUDA GPU).")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=default_shapes,
                        help="shapes as m=...,n=...,k=... (m: tokens; see the script for n and k)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>/)")
    if extra:
        extra(parser)
    return parser.parse_args()


def parse_shape(text: str) -> dict:
    return {key: int(value) for key, value in (part.split("=") for part in text.split(","))}


def run(op: str, args, make_inputs, unfused, kernel, bytes_moved) -> None:
    """make_inputs(shape) -> tuple; unfused(*inputs) and kernel(*inputs) compute the op; bytes_moved(shape,
    inputs) -> minimal bytes read and written, for the bandwidth column."""
    import torch
    from triton.testing import do_bench

    if not torch.cuda.is_available():
        raise SystemExit(f"bench_{op} needs a CUDA GPU")
    from llmc.codegen.triton.launch import register_cuda_impls

    register_cuda_impls()
    device = device_name("cuda")
    compiled = torch.compile(unfused)
    rows = []
    for text in args.shapes:
        shape = parse_shape(text)
        inputs = make_inputs(shape)
        reference = unfused(*inputs)
        first = lambda value: value[-1] if isinstance(value, tuple) else value  # noqa: E731 (the op's main output)
        torch.testing.assert_close(first(kernel(*inputs)).float(), first(reference).float(), rtol=2e-2, atol=2e-2)
        times = {name: do_bench(lambda fn=fn: fn(*inputs)) for name, fn in
                 (("eager", unfused), ("torch.compile", compiled), ("triton", kernel))}
        rows.append({"shape": shape, "ms": times, "speedup_vs_eager": times["eager"] / times["triton"],
                     "speedup_vs_compile": times["torch.compile"] / times["triton"],
                     "triton_GBps": bytes_moved(shape, inputs) / times["triton"] / 1e6})
    print(f"{op} on {device}, {args.dtype}")
    print(f"{'shape':<28}{'eager ms':>10}{'compile ms':>12}{'triton ms':>11}{'x eager':>9}{'x compile':>11}{'GB/s':>8}")
    for row in rows:
        shape = ",".join(f"{k}={v}" for k, v in row["shape"].items())
        ms = row["ms"]
        print(f"{shape:<28}{ms['eager']:>10.4f}{ms['torch.compile']:>12.4f}{ms['triton']:>11.4f}"
              f"{row['speedup_vs_eager']:>9.2f}{row['speedup_vs_compile']:>11.2f}{row['triton_GBps']:>8.0f}")
    out = args.out or RESULTS / device_slug(device) / f"{op}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"op": op, "device": device, "dtype": args.dtype, "torch": torch.__version__,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
