"""rope: llmc's Triton rotary embedding (with Qwen3's per-head q/k RMSNorm) vs the unfused norm + table gather
+ rotate_half, eager and torch.compile. Shapes: m tokens, n heads, k head_dim.
Run on a GPU: python bench/bench_rope.py [--no-norm] [--shapes m=1,n=32,k=128 ...]"""
import harness


def options(parser):
    parser.add_argument("--no-norm", action="store_true", help="rotation only (Llama), no per-head RMSNorm")


def main():
    args = harness.parse_args("rope", ["m=1,n=32,k=128", "m=16,n=32,k=128", "m=4096,n=32,k=128",
                                       "m=16384,n=8,k=128"], options)
    import torch

    from llmc.codegen.triton.launch import example_inputs, launch_rope

    dtype = getattr(torch, args.dtype)

    def unfused(x, positions, cos_table, sin_table, norm_weight, eps):
        h = x
        if norm_weight is not None:
            f = x.float()
            h = norm_weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        cos = cos_table[positions].to(h.dtype).unsqueeze(2)
        sin = sin_table[positions].to(h.dtype).unsqueeze(2)
        half = h.shape[-1] // 2
        return h * cos + torch.cat((-h[..., half:], h[..., :half]), dim=-1) * sin

    harness.run("rope" if not args.no_norm else "rope_no_norm", args,
                lambda shape: example_inputs("rope", shape, dtype, "cuda", with_norm_weight=not args.no_norm),
                unfused, launch_rope, lambda shape, inputs: 2 * inputs[0].numel() * inputs[0].element_size())


if __name__ == "__main__":
    main()
