"""Measured quality of every lossy option: held-out perplexity of the embedded model (llmc-tiny) compiled in each
precision, quantization scheme and sparsity setting, as `llmc eval BUNDLE --perplexity FILE` computes it.

    python bench/quality.py                      # every variant, 64 windows of 256 tokens (all of heldout.txt)
    python bench/quality.py --windows 16 --only fp32 int8

Each variant is one `llmc compile llmc-tiny --target cpu ...` (the flags are in VARIANTS and in the table) and one
evaluation; calibration-aware schemes read models/embedded/calibration.txt (training-split text, never the held-out
file: scripts/calibration_sample.py). Quantized variants start from float32 weights so the table isolates each
scheme's own error; the bf16 / fp16 rows show what 16-bit activations alone cost. Writes
bench/results/<device>/quality.json and quality.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import llmc
import llmc.models
from llmc.bench.probe import device_name, device_slug
from llmc.runtime.engine import load
from llmc.runtime.evaluate import perplexity, read_token_ids

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = Path(llmc.models.__file__).parent / "embedded"
HELDOUT, CALIBRATION = EMBEDDED / "heldout.txt", EMBEDDED / "calibration.txt"
CAL = {"calibration": str(CALIBRATION)}
# llmc-tiny's feed-forward is 704 wide: group 64 divides it (128 would leave the down projections in 16 bits).
G64 = {"quant_group_size": 64}
VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp16": {"dtype": "float16"},
    "fp8 (W8A8)": {"quant": "fp8"},
    "fp8-w8a16": {"quant": "fp8-w8a16"},
    "int8 (SmoothQuant)": {"quant": "int8", **CAL},
    "int8-rtn": {"quant": "int8-rtn"},
    "int4 (RTN, g64)": {"quant": "int4", **G64},
    "int4-awq (g64)": {"quant": "int4-awq", **G64, **CAL},
    "w4a8 (g64)": {"quant": "w4a8", **G64},
    "mixed (g64)": {"quant": "mixed", **G64},
    "2:4 (magnitude)": {"sparsity": "2:4"},
    "2:4 (Wanda)": {"sparsity": "2:4", **CAL},
    "attention keep 0.5 (block 16)": {"attention_keep": 0.5, "attention_block": 16},
    "attention keep 0.2 (block 16)": {"attention_keep": 0.2, "attention_block": 16},
}


def flags(options: dict) -> str:
    """The variant as `llmc compile` flags."""
    parts = []
    for key, value in options.items():
        value = "models/embedded/calibration.txt" if key == "calibration" else value
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def measure(name: str, options: dict, ids, seq_len: int, windows: int, workdir: Path) -> dict:
    options = {"dtype": "float32", **options}
    start = time.perf_counter()
    bundle = llmc.compile("llmc-tiny", target="cpu", out=workdir / "b.llmc", **options)
    compile_s = time.perf_counter() - start
    weights = sum(f.stat().st_size for f in (bundle / "weights").glob("*.safetensors"))
    engine = load(bundle, kv_cache_tokens=max(512, 16 * (seq_len + 16)), prefix_caching=False)
    result = perplexity(engine, ids, seq_len, windows, batch_size=16)
    shutil.rmtree(bundle)
    return {"variant": name, "flags": flags(options), "perplexity": result.perplexity, "tokens": result.tokens,
            "weight_bytes": weights, "compile_s": compile_s, "eval_s": result.seconds}


def markdown(report: dict) -> str:
    base = next(r["perplexity"] for r in report["rows"] if r["variant"] == "fp32")
    lines = [f"llmc-tiny held-out perplexity, {report['tokens']} tokens ({report['windows']} windows of "
             f"{report['seq_len']}), {report['device']}, `python bench/quality.py`", "",
             "| variant | `llmc compile llmc-tiny --target cpu` flags | perplexity | vs fp32 | weights on disk |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | `{r['flags']}` | {r['perplexity']:.3f} | "
                     f"{100 * (r['perplexity'] / base - 1):+.2f}% | {r['weight_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--only", nargs="+", help="variant names (or their first word) to run; fp32 always runs")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    chosen = {name: opts for name, opts in VARIANTS.items()
              if not args.only or name == "fp32" or name in args.only or name.split()[0] in args.only}
    device = device_name("cpu")
    out = args.out or ROOT / "bench" / "results" / device_slug(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine_ids = None
        for name, options in chosen.items():
            if engine_ids is None:  # the tokenizer is the model's: any bundle reads the file the same way
                first = llmc.compile("llmc-tiny", target="cpu", out=Path(tmp) / "t.llmc", dtype="float32")
                engine_ids = read_token_ids(load(first, kv_cache_tokens=512), HELDOUT)
            row = measure(name, options, engine_ids, args.seq_len, args.windows, Path(tmp))
            rows.append(row)
            print(f"{name:32s} perplexity {row['perplexity']:.4f}  ({row['eval_s']:.0f} s)", flush=True)
    report = {"model": "llmc-tiny", "device": device, "seq_len": args.seq_len, "windows": rows[0]["tokens"] //
              args.seq_len, "tokens": rows[0]["tokens"], "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
