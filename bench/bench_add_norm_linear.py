"""add_norm_linear: llmc's Triton residual add + norm + GEMM (+ SwiGLU) vs the unfused sequence, eager and
torch.compile. Shapes as bench_norm_linear.py. Run on a GPU: python bench/bench_add_norm_linear.py [...]"""
import harness
from bench_norm_linear import options, unfused_norm_linear


def main():
    args = harness.parse_args("add_norm_linear", ["m=1,n=4096,k=4096", "m=16,n=12288,k=4096",
                                                  "m=4096,n=12288,k=4096"], options)
    import torch

    from llmc.codegen.triton.launch import example_inputs, launch_add_norm_linear

    dtype = getattr(torch, args.dtype)

    def unfused(x, residual, weight, bias, eps, norm, epilogue):
        s = x + residual
        return s, unfused_norm_linear(torch, s, weight, bias, eps, norm, epilogue)

    harness.run(f"add_norm_linear_{args.norm}_{args.epilogue}", args,
                lambda shape: example_inputs("add_norm_linear", shape, dtype, "cuda", norm=args.norm,
                                             epilogue=args.epilogue),
                unfused, launch_add_norm_linear,
                lambda shape, inputs: (inputs[2].numel() + 3 * inputs[0].numel()) * inputs[0].element_size())


if __name__ == "__main__":
    main()
