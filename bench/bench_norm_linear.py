"""norm_linear: llmc's Triton GEMM with the norm in its prologue (and SwiGLU in its epilogue) vs the unfused
RMSNorm + linear (+ silu * up), eager and torch.compile. Shapes: m tokens, n output features (per half for
swiglu), k input features. Run on a GPU: python bench/bench_norm_linear.py [--norm rms] [--epilogue swiglu]"""
import harness


def options(parser):
    parser.add_argument("--norm", default="rms", choices=["none", "rms", "layer"])
    parser.add_argument("--epilogue", default="none", choices=["none", "swiglu"])


def unfused_norm_linear(torch, x, weight, bias, eps, norm, epilogue):
    h = x.float()
    if norm == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + eps)
    y = torch.nn.functional.linear(h.to(x.dtype), weight, bias)
    if epilogue == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y


def main():
    args = harness.parse_args("norm_linear", ["m=1,n=4096,k=4096", "m=16,n=12288,k=4096", "m=4096,n=4096,k=4096",
                                              "m=4096,n=12288,k=4096"], options)
    import torch

    from llmc.codegen.triton.launch import example_inputs, launch_norm_linear

    dtype = getattr(torch, args.dtype)
    harness.run(f"norm_linear_{args.norm}_{args.epilogue}", args,
                lambda shape: example_inputs("norm_linear", shape, dtype, "cuda", norm=args.norm,
                                             epilogue=args.epilogue),
                lambda *inputs: unfused_norm_linear(torch, *inputs), launch_norm_linear,
                lambda shape, inputs: (inputs[1].numel() + inputs[0].numel()) * inputs[0].element_size())


if __name__ == "__main__":
    main()
