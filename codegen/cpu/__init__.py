"""CPU lowerings of llmc ops (issue 14): custom ops with their reference's schema and meaning, written for ATen's
CPU kernels, which passes/lower_cpu.py swaps in for the reference when a bundle is compiled for --target cpu."""
