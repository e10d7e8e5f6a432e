"""llmc: an ahead-of-time compiler and kernel-fusion pass library for LLM inference.

    import llmc
    path = llmc.compile("llmc-tiny", target="cpu", out="tiny.llmc")
    engine = llmc.load(path)
    engine.generate([engine.encode("def main(")], max_new_tokens=32)

The public functions are imported on first use, so that `llmc.common.targets` stays a leaf module the compiler and
the runtime can both import, and an inference host that only loads bundles never imports the compiler.
"""
from llmc.openmp import set_wait_policy

set_wait_policy()  # before anything imports torch (llmc/openmp.py says why)

__version__ = "0.1.0"
__all__ = ["compile", "load", "last_report", "CompileOptions"]


def compile(model, target=None, out=None, **options):
    """Compiles model for target (default cpu) into a bundle directory; the options as keywords (the command
    line's, see llmc.compiler.api.compile) or options=llmc.CompileOptions(...)."""
    from llmc.compiler.api import compile as _compile

    return _compile(model, target, out, **options)


def load(path, **runtime_options):
    """An Engine for the bundle at path (options: llmc.runtime.engine.load). The KV cache's device pool is sized
    by at most one of kv_cache_memory (bytes or "2GiB"), kv_cache_fraction (of the GPU memory free after the
    weights load; CUDA only) and kv_cache_tokens, by default room for 4 sequences of the bundle's max_seq_len;
    kv_offload_memory sizes the host tier preempted sequences swap to (default none: they are recomputed);
    prefix_caching=False stops sharing cached prompt blocks; max_batch caps the sequences per step."""
    from llmc.runtime.engine import load as _load

    return _load(path, **runtime_options)


def last_report():
    """The report of the last compile in this thread: llmc.compile's CompileReport, or, when
    torch.compile(..., backend="llmc") compiled last, the BackendReport of its last graph (llmc/backend.py).
    Compiles in other threads do not change it; a bundle's manifest keeps its own compile's passes and counts."""
    from llmc.compiler.api import last_report as _last

    return _last()


def __getattr__(name):
    if name == "CompileOptions":  # imported on first use, as the functions above import what they call
        from llmc.passes.options import CompileOptions

        return CompileOptions
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")
