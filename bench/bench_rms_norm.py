"""rms_norm: llmc's Triton kernel vs the models' unfused RMSNorm (eager and torch.compile). Shapes: m tokens,
n hidden size. Run on a GPU: python bench/bench_rms_norm.py [--dtype bfloat16] [--shapes m=1,n=4096 ...]"""
import harness


def main():
    args = harness.parse_args("rms_norm", ["m=1,n=4096", "m=16,n=4096", "m=4096,n=4096", "m=16384,n=5120"])
    import torch

    from llmc.codegen.triton.launch import launch_rms_norm

    dtype = getattr(torch, args.dtype)

    def make_inputs(shape):
        return (torch.randn(shape["m"], shape["n"], device="cuda", dtype=dtype),
                torch.randn(shape["n"], device="cuda", dtype=dtype), 1e-6)

    def unfused(x, weight, eps):
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    harness.run("rms_norm", args, make_inputs, unfused, launch_rms_norm,
                lambda shape, inputs: 2 * inputs[0].numel() * inputs[0].element_size())


if __name__ == "__main__":
    main()
