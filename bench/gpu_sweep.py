"""The GPU sweep: Qwen3-8B shapes in bfloat16 with random weights, llmc beside transformers eager and
torch.compile, in one process per call. Needs a CUDA GPU (run it through the device tool).

A device call is limited to 10 minutes, so the sweep can be split over calls on one warm machine: the random
checkpoint is written once to --checkpoint-dir and reused, and each call merges its rows into the JSON:

    python bench/gpu_sweep.py --lengths 128 1024 4096 --batches 1 8 32 --out $OUT/qwen3-8b.json
    python bench/gpu_sweep.py --lengths 16384 32768 --batches 1 --out $OUT/qwen3-8b.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODEL = "qwen3-8b"


def merge(old: dict, new: dict) -> dict:
    """NEW with OLD's prefill and decode rows that NEW did not measure again (rows keyed by length / batch)."""
    for kind, key in (("prefill", "length"), ("decode", "batch")):
        seen = {row[key] for row in new[kind]}
        new[kind] = sorted([*new[kind], *(r for r in old[kind] if r[key] not in seen)], key=lambda r: r[key])
    for name in ("first_call_s",):
        new[name] = {**old.get(name, {}), **new.get(name, {})}
    return new


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/llmc-bench-qwen3-8b"),
                        help="where the random-weight checkpoint is written once and reused by later calls")
    parser.add_argument("--out", type=Path, help="JSON to write or merge into (default bench/results/<gpu>/)")
    parser.add_argument("--quick", action="store_true", help="one length and batch: checks the set-up")
    args = parser.parse_args(argv)

    import torch

    from llmc.bench.run import prepare_model, run_bench
    from llmc.bench.report import markdown, write_results

    if not torch.cuda.is_available():
        raise SystemExit("gpu_sweep needs a CUDA GPU; on CPU use `llmc bench qwen3-0.6b`")
    if not (args.checkpoint_dir / "config.json").is_file():
        prepare_model(MODEL, args.checkpoint_dir, "cuda")  # writes the random-weight checkpoint there
    report = run_bench(str(args.checkpoint_dir), quick=args.quick, device="cuda", lengths=args.lengths,
                       batches=args.batches, dtype="bfloat16")
    report["model"] = MODEL
    out = args.out or Path(__file__).parent / "results" / report["device_slug"] / f"{MODEL}.json"
    if out.is_file():
        report = merge(json.loads(out.read_text()), report)
    write_results(report, out.parent)
    print(markdown(report))


if __name__ == "__main__":
    main()
