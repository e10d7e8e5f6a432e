"""add_rms_norm: llmc's Triton kernel vs the unfused residual add + RMSNorm (eager and torch.compile). Shapes:
m tokens, n hidden size. Run on a GPU: python bench/bench_add_rms_norm.py [--dtype ...] [--shapes ...]"""
import harness


def main():
    args = harness.parse_args("add_rms_norm", ["m=1,n=4096", "m=16,n=4096", "m=4096,n=4096", "m=16384,n=5120"])
    import torch

    from llmc.codegen.triton.launch import launch_add_rms_norm

    dtype = getattr(torch, args.dtype)

    def make_inputs(shape):
        return (torch.randn(shape["m"], shape["n"], device="cuda", dtype=dtype),
                torch.randn(shape["m"], shape["n"], device="cuda", dtype=dtype),
                torch.randn(shape["n"], device="cuda", dtype=dtype), 1e-6)

    def unfused(x, residual, weight, eps):
        s = x + residual
        h = s.float()
        return s, weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)

    harness.run("add_rms_norm", args, make_inputs, unfused, launch_add_rms_norm,
                lambda shape, inputs: 4 * inputs[0].numel() * inputs[0].element_size())


if __name__ == "__main__":
    main()
