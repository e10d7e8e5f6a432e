"""attention: llmc's Triton attention kernels vs torch SDPA (flash backend) and torch.compile of the models'
attention, timed in one run on the same inputs, with the device named. Qwen3-8B's layer shape by default (32 query
heads over 8 kv heads, head_dim 128, bf16).

prefill: llmc::causal_attention's block kernel over S tokens (batch 1) in TFLOP/s, causal FLOPs = 2 * H * S^2 * D
  (two GEMMs of 2 * S * S/2 * D each per head); against SDPA flash (is_causal, enable_gqa) and torch.compile of
  the unfused repeat_kv + SDPA the models run.
decode: llmc::paged_attention's split-K decode (one query per sequence over a paged cache of `context` tokens in
  blocks of 16, shuffled) in GB/s of K and V read (2 * B * context * Hkv * D * element bytes); against SDPA flash on
  the same keys stored contiguously (no paging: the best case) and torch.compile of the models' paged attention
  (gather the block table, mask, SDPA).
Run on a GPU: python bench/bench_attention.py [--mode prefill|decode|both] [--seqs 1024 4096 ...] [--batch 1]
"""
import argparse
import json

import harness
from llmc.bench.probe import device_name, device_slug


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark llmc's Triton attention kernels against torch SDPA "
                                                 "flash and torch.compile (needs a CUDA GPU).")
    parser.add_argument("--mode", default="both", choices=["prefill", "decode", "both"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="decode batch (prefill runs one sequence)")
    parser.add_argument("--prefill-seqs", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--block-size", type=int, default=16, help="paged cache block size (decode)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<device>/attention.json)")
    return parser.parse_args()


def repeat_kv(x, rep):
    """[B, Hkv, T, D] -> [B, Hkv * rep, T, D], as models/transformer.py does."""
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)


def prefill_rows(torch, args, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from llmc.codegen.triton.launch import launch_causal_attention

    f = torch.nn.functional
    rep = args.heads // args.kv_heads

    def models_attention(q, k, v):  # [B, S, H, D] in, as the unpassed graph computes it
        o = f.scaled_dot_product_attention(q.transpose(1, 2), repeat_kv(k.transpose(1, 2), rep),
                                           repeat_kv(v.transpose(1, 2), rep), is_causal=True)
        return o.transpose(1, 2)

    def sdpa_flash(qh, kh, vh):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return f.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=rep > 1)

    compiled = torch.compile(models_attention)
    rows = []
    for seq in args.prefill_seqs:
        q = torch.randn(1, seq, args.heads, args.head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, seq, args.kv_heads, args.head_dim, device="cuda", dtype=dtype) for _ in range(2))
        scale = args.head_dim ** -0.5
        qh, kh, vh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        ours = launch_causal_attention(q, k, v, scale, 0)
        torch.testing.assert_close(ours, sdpa_flash(qh, kh, vh).transpose(1, 2), rtol=2e-2, atol=2e-2)
        times = {"llmc": do_bench(lambda: launch_causal_attention(q, k, v, scale, 0)),
                 "sdpa_flash": do_bench(lambda: sdpa_flash(qh, kh, vh)),
                 "torch.compile": do_bench(lambda: compiled(q, k, v))}
        flops = 2 * args.heads * seq * seq * args.head_dim
        rows.append({"mode": "prefill", "seq": seq, "ms": times,
                     "TFLOPs": {name: flops / ms / 1e9 for name, ms in times.items()}})
    return rows


def decode_rows(torch, args, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from llmc.codegen.triton.launch import example_inputs, launch_paged_attention

    f = torch.nn.functional
    rep = args.heads // args.kv_heads

    def models_paged_attention(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window):
        # models/transformer.py's step: gather the whole table, mask past the sequence, SDPA over cache + new key.
        batch, width = block_table.shape
        past_k, past_v = k_cache[block_table].flatten(1, 2), v_cache[block_table].flatten(1, 2)
        keys, values = torch.cat([past_k, k], 1).transpose(1, 2), torch.cat([past_v, v], 1).transpose(1, 2)
        visible = torch.arange(past_k.shape[1], device=q.device)[None, :] < past_lens[:, None]
        mask = torch.cat([visible, visible.new_ones(batch, 1)], 1)[:, None, None, :]
        o = f.scaled_dot_product_attention(q.transpose(1, 2), repeat_kv(keys, rep), repeat_kv(values, rep),
                                           attn_mask=mask, scale=scale)
        return o.transpose(1, 2)

    def sdpa_flash(qh, kh, vh):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return f.scaled_dot_product_attention(qh, kh, vh, enable_gqa=rep > 1)

    compiled = torch.compile(models_paged_attention)
    rows = []
    for context in args.decode_contexts:
        shape = {"b": args.batch, "s": 1, "h": args.heads, "kv": args.kv_heads, "d": args.head_dim,
                 "past": context - 1, "bs": args.block_size}
        inputs = example_inputs("paged_attention", shape, dtype, "cuda")
        q, k, v, k_cache, v_cache, block_table, past_lens, scale, window = inputs
        # The same keys in sequence order, contiguous [B, Hkv, context, D]: what SDPA flash reads.
        positions = torch.arange(context - 1, device="cuda")
        slots = block_table[:, positions // args.block_size], positions % args.block_size
        kh = torch.cat([k_cache[slots], k], 1).transpose(1, 2).contiguous()
        vh = torch.cat([v_cache[slots], v], 1).transpose(1, 2).contiguous()
        qh = q.transpose(1, 2).contiguous()
        ours = launch_paged_attention(*inputs)
        torch.testing.assert_close(ours, sdpa_flash(qh, kh, vh).transpose(1, 2), rtol=2e-2, atol=2e-2)
        times = {"llmc": do_bench(lambda: launch_paged_attention(*inputs)),
                 "sdpa_flash_contiguous": do_bench(lambda: sdpa_flash(qh, kh, vh)),
                 "torch.compile": do_bench(lambda: compiled(*inputs))}
        kv_bytes = 2 * args.batch * context * args.kv_heads * args.head_dim * k.element_size()
        rows.append({"mode": "decode", "context": context, "batch": args.batch, "ms": times,
                     "GBps": {name: kv_bytes / ms / 1e6 for name, ms in times.items()}})
    return rows


def main():
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    device = device_name("cuda")
    rows = []
    if args.mode in ("prefill", "both"):
        rows += prefill_rows(torch, args, dtype)
    if args.mode in ("decode", "both"):
        rows += decode_rows(torch, args, dtype)
    print(f"attention on {device}, {args.dtype}, H={args.heads} Hkv={args.kv_heads} D={args.head_dim}")
    for row in rows:
        size = f"seq={row['seq']}" if row["mode"] == "prefill" else f"B={row['batch']} context={row['context']}"
        unit = "TFLOPs" if row["mode"] == "prefill" else "GBps"
        rates = "  ".join(f"{name} {row['ms'][name]:.3f} ms {row[unit][name]:.0f} {unit}" for name in row["ms"])
        print(f"{row['mode']:<8}{size:<24}{rates}")
    out = harness.Path(args.out) if args.out else (harness.RESULTS / device_slug(device)
                                                   / "attention.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"op": "attention", "device": device, "dtype": args.dtype, "torch": torch.__version__,
                               "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
