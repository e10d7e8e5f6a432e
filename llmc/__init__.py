"""llmc: an ahead-of-time compiler and kernel-fusion pass library for LLM inference.

    import llmc
    path = llmc.compile("llmc-tiny", target="cpu", out="tiny.llmc")
    engine = llmc.load(path)
    engine.generate([engine.encode("def main(")], max_new_tokens=32)

The public functions are imported on first use, so that `llmc.targets` stays a leaf module the compiler and
the runtime can both import, and an inference host that only loads bundles never imports the compiler.
"""
__version__ = "0.1.0"
__all__ = ["compile", "load", "last_report"]


def compile(model, target="cpu", out=None, **options):
    from llmc.compiler.api import compile as _compile

    return _compile(model, target, out, **options)


def load(path, **runtime_options):
    from llmc.runtime.engine import load as _load

    return _load(path, **runtime_options)


def last_report():
    from llmc.compiler.api import last_report as _last

    return _last()
