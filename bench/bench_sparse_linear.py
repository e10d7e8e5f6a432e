"""sparse_linear: llmc's 2:4 semi-structured GEMM (torch's sparse tensor-core backends, cuSPARSELt and CUTLASS, with
the norm prologue and SwiGLU epilogue in torch) vs the dense GEMM over the same pruned weight, eager and
torch.compile, at Qwen3-8B's GEMM shapes: decode-like (m = 1..16 tokens) and prefill-like (m = 512..8192).
Layers: qkv [6144, 4096], o [4096, 4096], gate_up [24576, 4096] + SwiGLU, down [4096, 12288].
Run on a GPU: python bench/bench_sparse_linear.py [--layers qkv down] [--m 1 16 4096] [--norm rms]"""
import argparse
import json
from pathlib import Path

import harness
from bench_norm_linear import unfused_norm_linear
from llmc.bench.probe import device_name, device_slug

QWEN3_8B = {"qkv": (6144, 4096, "none"), "o": (4096, 4096, "none"), "gate_up": (24576, 4096, "swiglu"),
            "down": (4096, 12288, "none")}  # layer -> (N weight rows, K input features, epilogue)
DECODE_M, PREFILL_M = [1, 4, 16], [512, 2048, 8192]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark llmc::sparse_linear (2:4 sparse tensor cores) against "
                                                 "the dense GEMM, eager and torch.compile, at Qwen3-8B shapes "
                                                 "(needs a CUDA GPU, sm_80+).")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--layers", nargs="+", default=list(QWEN3_8B), choices=list(QWEN3_8B))
    parser.add_argument("--m", nargs="+", type=int, default=DECODE_M + PREFILL_M, help="tokens per GEMM")
    parser.add_argument("--norm", default="none", choices=["none", "rms", "layer"],
                        help="norm prologue (o and down read none in the model; qkv and gate_up rms)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>/)")
    return parser.parse_args()


def main():
    args = parse_args()
    import torch
    from triton.testing import do_bench

    import llmc.codegen.ops  # noqa: F401  (registers llmc::sparse_linear and its CUDA kernel)
    from llmc.codegen.sparse_linear import (BACKENDS, compress_24, prune_24, semi_structured_backend,
                                            semi_structured_linear, semi_structured_weight)

    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_linear needs a CUDA GPU")
    device, capability = device_name("cuda"), torch.cuda.get_device_capability()
    dtype, eps = getattr(torch, args.dtype), 1e-6
    dense = lambda *inputs: unfused_norm_linear(torch, *inputs)  # noqa: E731
    compiled = torch.compile(dense)
    rows = []
    for layer in args.layers:
        n, k, epilogue = QWEN3_8B[layer]
        weight = prune_24(torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype)
        values, meta = compress_24(weight)
        available = [b for b in BACKENDS if semi_structured_backend(
            capability, dtype, n, k, b == "cusparselt" and torch.backends.cusparselt.is_available())[0] == b]
        sparse = {b: semi_structured_weight(values, meta, b) for b in available}
        for m in args.m:
            x = torch.randn(m, k, device="cuda").to(dtype)
            fns = {"dense eager": lambda: dense(x, weight, None, eps, args.norm, epilogue),
                   "dense compile": lambda: compiled(x, weight, None, eps, args.norm, epilogue),
                   "llmc op": lambda: torch.ops.llmc.sparse_linear(x, values, meta, None, eps, args.norm, epilogue)}
            fns |= {f"sparse {b}": (lambda w=w: semi_structured_linear(x, w, None, eps, args.norm, epilogue))
                    for b, w in sparse.items()}
            want = fns["dense eager"]().float()
            for name, fn in fns.items():
                torch.testing.assert_close(fn().float(), want, rtol=2e-2, atol=2e-2, msg=lambda s, n=name: f"{n}: {s}")
            ms = {name: do_bench(fn) for name, fn in fns.items()}
            best_sparse = min(ms[name] for name in fns if name.startswith("sparse") or name == "llmc op")
            rows.append({"layer": layer, "m": m, "n": n, "k": k, "epilogue": epilogue, "ms": ms,
                         "speedup_vs_eager": ms["dense eager"] / best_sparse,
                         "speedup_vs_compile": ms["dense compile"] / best_sparse,
                         "llmc_op_vs_eager": ms["dense eager"] / ms["llmc op"],
                         "dense_TFLOPs": 2 * m * n * k / ms["dense eager"] / 1e9,
                         "weight_bytes_dense": weight.numel() * weight.element_size(),
                         "weight_bytes_sparse": values.numel() * values.element_size() + meta.numel()})
    names = list(rows[0]["ms"]) if rows else []
    print(f"sparse_linear (2:4) on {device} (sm_{capability[0]}{capability[1]}), {args.dtype}, norm {args.norm}; "
          f"cuSPARSELt {'available' if torch.backends.cusparselt.is_available() else 'absent'}")
    header = "".join(f"{name + ' ms':>20}" for name in names)
    print(f"{'layer':<9}{'m':>6}{header}{'x eager':>9}{'x compile':>11}")
    for row in rows:
        print(f"{row['layer']:<9}{row['m']:>6}" + "".join(f"{row['ms'][name]:>20.4f}" for name in names)
              + f"{row['speedup_vs_eager']:>9.2f}{row['speedup_vs_compile']:>11.2f}")
    out = args.out or harness.RESULTS / device_slug(device) / "sparse_linear.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"op": "sparse_linear", "device": device, "capability": list(capability),
                               "dtype": args.dtype, "norm": args.norm, "torch": torch.__version__,
                               "cusparselt": torch.backends.cusparselt.is_available(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
