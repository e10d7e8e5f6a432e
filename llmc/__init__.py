"""llmc: an ahead-of-time compiler and kernel-fusion pass library for LLM inference."""
__version__ = "0.1.0"
