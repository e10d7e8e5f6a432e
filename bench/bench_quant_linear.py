"""quant_linear: llmc's quantized GEMM kernels (every scheme) on Qwen3-8B's projection shapes, beside the bf16
GEMM they replace (torch.matmul / F.linear, eager, the unquantized weight) and torch.compile of the scheme's
dequantize + matmul (the weight dequantized to bf16 in the graph, then F.linear), timed in the same run.

Shapes: qkv 4096 -> 6144, o 4096 -> 4096, gate_up 4096 -> 2 x 12288 with the SwiGLU epilogue (all three
variants compute silu(gate) * up), down 12288 -> 4096; at decode-like M = 1..16 and prefill-like M = 512..8192
tokens. A shape is m=...,n=...,k=...[,swiglu=1] (n per half with swiglu). Times are CUDA-graph replays
(triton.testing.do_bench_cudagraph): the runtime replays decode steps in CUDA graphs, and a launcher's Python
checks would otherwise be timed in place of the kernel at decode sizes. Reported: ms, TFLOP/s (2 M N K) and
GB/s (the fewest bytes each variant must move: its weight, scales and zero points, x and the output).

GPU only; a device call lasts at most 10 minutes, so split a full sweep by --schemes or --shapes:
    python bench/bench_quant_linear.py --schemes int4_w4a16 fp8_w8a8
JSON goes to bench/results/<device>/quant_linear.json (or --out); a later run merges its rows into it.
"""
import json

import harness
from llmc.bench.probe import device_name, device_slug

SCHEMES = ("fp8_w8a16", "fp8_w8a8", "int8_w8a8", "int4_w4a16", "int4_w4a8")
PROJECTIONS = {"qkv": (6144, 4096, 0), "o": (4096, 4096, 0), "gate_up": (12288, 4096, 1), "down": (4096, 12288, 0)}
TOKENS = (1, 2, 4, 8, 16, 512, 2048, 8192)
DEFAULT_SHAPES = [f"m={m},n={n},k={k}" + (",swiglu=1" if swiglu else "")
                  for n, k, swiglu in PROJECTIONS.values() for m in TOKENS]


def options(parser):
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")


def projection_name(shape: dict) -> str:
    key = (shape["n"], shape["k"], shape.get("swiglu", 0))
    return next((name for name, value in PROJECTIONS.items() if value == key), "custom")


def check(torch, quant, out, reference, scheme):
    """DESIGN.md's tolerances against the reference op (fp8 GEMM; int4 mean relative error), bf16's for int8."""
    if scheme.startswith("int4"):
        error = ((out.float() - reference.float()).abs().mean() / reference.float().abs().mean()).item()
        assert error < 0.04, f"{scheme}: mean relative error {error:.3g} against the reference"
        return
    rtol, atol = (1e-2, 5e-2) if scheme.startswith("fp8") else (1.6e-2, 1.6e-2)
    torch.testing.assert_close(out.float(), reference.float(), rtol=rtol, atol=atol)


def main():
    args = harness.parse_args("quant_linear", DEFAULT_SHAPES, options)
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench_cudagraph

    from llmc.codegen import quant
    from llmc.codegen.triton.hooks import current_arch
    from llmc.codegen.triton.quant import check_arch, launch_quant_linear

    if not torch.cuda.is_available():
        raise SystemExit("bench_quant_linear needs a CUDA GPU")
    arch = current_arch(torch.device("cuda"))
    schemes = []
    for scheme in args.schemes:
        try:
            check_arch(scheme, arch)
            schemes.append(scheme)
        except ValueError as e:
            print(f"skipping {scheme}: {e}")
    torch._dynamo.config.recompile_limit = 1024  # one compiled baseline per scheme and weight shape
    dtype, device = getattr(torch, args.dtype), device_name("cuda")
    group = args.group_size

    def epilogue(y, swiglu):
        if not swiglu:
            return y
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up

    def dequantize_matmul(x, qweight, scale, zero, scheme, swiglu):
        w = quant.dequantize_weight(qweight, scale, zero, scheme, group).to(x.dtype)
        return epilogue(F.linear(x, w), swiglu)

    compiled = torch.compile(dequantize_matmul)  # token counts turn dynamic after the first recompile
    rows = []
    for text in args.shapes:
        shape = harness.parse_shape(text)
        m, n, k, swiglu = shape["m"], shape["n"], shape["k"], bool(shape.get("swiglu", 0))
        total_n = 2 * n if swiglu else n
        weight = torch.randn(total_n, k, device="cuda") * k ** -0.5
        x = torch.randn(m, k, device="cuda").to(dtype)
        dense = weight.to(dtype)
        flops = 2 * m * total_n * k
        activation_bytes = (m * k + m * n) * x.element_size()
        variants = {"bf16 eager": (lambda: epilogue(F.linear(x, dense), swiglu),
                                   dense.numel() * dense.element_size() + activation_bytes)}
        for scheme in schemes:
            qweight, scale, zero = quant.quantize_weight(weight, scheme, group)
            weight_bytes = sum(t.numel() * t.element_size() for t in (qweight, scale, zero) if t is not None)
            llmc = (lambda s=scheme, q=qweight, sc=scale, z=zero:
                    launch_quant_linear(x, q, sc, z, None, None, 1e-6, "none", "swiglu" if swiglu else "none", s,
                                        group))
            if m <= 16:  # the reference's float64 integer GEMMs are too large to hold at prefill sizes
                check(torch, quant, llmc(), quant.quant_linear(x, qweight, scale, zero, None, None, 1e-6, "none",
                                                               "swiglu" if swiglu else "none", scheme, group), scheme)
            variants[f"{scheme} llmc"] = (llmc, weight_bytes + activation_bytes)
            if not args.no_compile:
                variants[f"{scheme} torch.compile"] = (
                    lambda s=scheme, q=qweight, sc=scale, z=zero: compiled(x, q, sc, z, s, swiglu),
                    weight_bytes + activation_bytes)
        for name, (fn, moved) in variants.items():
            fn()  # compile / JIT before the graph capture
            ms = do_bench_cudagraph(fn)
            rows.append({"projection": projection_name(shape), **shape, "variant": name, "ms": ms,
                         "TFLOPs": flops / ms / 1e9, "GBps": moved / ms / 1e6})
        baseline = next(row["ms"] for row in rows[-len(variants):] if row["variant"] == "bf16 eager")
        for row in rows[-len(variants):]:
            row["speedup_vs_bf16"] = baseline / row["ms"]
        print(f"{text}: " + ", ".join(f"{row['variant']} {row['ms']:.4f} ms" for row in rows[-len(variants):]))
    report(args, torch, triton, device, rows)


def report(args, torch, triton, device, rows) -> None:
    print(f"\nquant_linear on {device}, {args.dtype}, int4 group {args.group_size}")
    print(f"{'projection':<9}{'m':>6}  {'variant':<26}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'x bf16':>8}")
    for row in rows:
        print(f"{row['projection']:<9}{row['m']:>6}  {row['variant']:<26}{row['ms']:>9.4f}{row['TFLOPs']:>9.1f}"
              f"{row['GBps']:>8.0f}{row['speedup_vs_bf16']:>8.2f}")
    out = args.out or harness.RESULTS / device_slug(device) / "quant_linear.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    measured = {(row["projection"], row["m"], row["n"], row["k"], row["variant"]) for row in rows}
    if out.is_file():  # keep the rows of earlier runs (other schemes or shapes) that this one did not measure
        earlier = json.loads(out.read_text())["rows"]
        rows = [r for r in earlier if (r["projection"], r["m"], r["n"], r["k"], r["variant"]) not in measured] + rows
    out.write_text(json.dumps({"op": "quant_linear", "device": device, "dtype": args.dtype,
                               "group_size": args.group_size, "torch": torch.__version__,
                               "triton": triton.__version__, "timing": "CUDA graph replay (do_bench_cudagraph)",
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
