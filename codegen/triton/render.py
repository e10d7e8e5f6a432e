"""Renders an op's jinja2 template into Triton source specialised for one spec, and loads it.

A spec is a flat dict of strings, ints and bools (dtypes, hidden sizes, block sizes, options). The same spec
always gives the same source, byte for byte: the AOT compiler hashes it. The kernel's name carries a hash of
the template text and the spec, so a cache file named after the kernel is content-addressed.

@triton.jit reads the function's source through `inspect`, so the rendered text is written to a file under the
cache dir ($LLMC_CACHE/kernels, else ~/.cache/llmc/kernels) and imported from there. Whether Triton builds a
compiled or an interpreted function is decided when the module is imported (TRITON_INTERPRET), so loaded
modules are memoised per spec and per that flag.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"
DTYPES = ("float32", "float16", "bfloat16")
_NAME_SLOT = "__LLMC_KERNEL_NAME__"

# Keys each op's spec must hold (templates are rendered with StrictUndefined, this names what is missing first).
_ROW = ("dtype", "weight_dtype", "out_dtype", "n", "block_n", "num_warps")
_GEMM = ("dtype", "n", "k", "norm", "epilogue", "has_bias", "block_m", "block_n", "block_k", "num_warps",
         "num_stages")
SPEC_KEYS = {
    "rms_norm": _ROW,
    "add_rms_norm": _ROW,
    "norm_linear": _GEMM,
    "add_norm_linear": _GEMM,
    "rope": ("dtype", "out_dtype", "heads", "head_dim", "has_norm", "block_h", "num_warps"),
    "rope_write_kv": ("dtype", "out_dtype", "heads", "head_dim", "has_norm", "block_h", "num_warps"),
    "attention_prefill": ("dtype", "heads", "kv_heads", "head_dim", "paged", "windowed", "cache_block_size",
                          "block_m", "block_n", "num_warps", "num_stages"),
    "attention_decode": ("dtype", "heads", "kv_heads", "head_dim", "windowed", "cache_block_size", "block_h",
                         "block_n", "num_warps", "num_stages"),
    "attention_combine": ("dtype", "head_dim", "block_s", "num_warps"),
    "attention_sparse": ("dtype", "heads", "kv_heads", "head_dim", "windowed", "decode", "block", "cache_block_size",
                         "block_m", "block_n", "num_warps", "num_stages"),
    # quant_linear (codegen/triton/quant.py); scheme is the weight format: fp8 | int8 | int4
    "quant_linear_a16": ("dtype", "scheme", "n", "k", "group_size", "norm", "epilogue", "has_bias", "has_in_scale",
                         "block_m", "block_n", "block_k", "num_warps", "num_stages"),
    "quant_linear_rows": ("dtype", "scheme", "k", "norm", "has_in_scale", "block_k", "num_warps"),
    "quant_linear_a8": ("dtype", "scheme", "n", "k", "group_size", "epilogue", "has_bias", "block_m", "block_n",
                        "block_k", "num_warps", "num_stages"),
}

# Ops rendered from another op's template, which branches on `op` (rope_write_kv: rope's kernel plus the stores).
TEMPLATE_OF = {"rope_write_kv": "rope"}

_environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                                  keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def _check(op: str, spec: dict) -> None:
    if op not in SPEC_KEYS:
        raise ValueError(f"no Triton template for op {op!r}; known: {', '.join(SPEC_KEYS)}")
    missing = [key for key in SPEC_KEYS[op] if key not in spec]
    if missing:
        raise ValueError(f"spec for {op} lacks {', '.join(missing)}")
    for key, value in spec.items():
        if not isinstance(value, (str, int, bool)):
            raise ValueError(f"spec value {key}={value!r} of {op} must be a str, int or bool")
        if key.endswith("dtype") and value not in DTYPES:
            raise ValueError(f"spec {key}={value!r} of {op}: one of {', '.join(DTYPES)}")


def render(op: str, **spec) -> tuple[str, str]:
    """(source, kernel_name) of `op`'s Triton kernel specialised for `spec` (see SPEC_KEYS). The name ends in a
    hash of the source, so equal sources share a name and a cache file."""
    _check(op, spec)
    spec_line = ", ".join(f"{key}={spec[key]}" for key in sorted(spec))
    template = _environment.get_template(f"{TEMPLATE_OF.get(op, op)}.py.j2")
    source = template.render(**spec, op=op, kernel_name=_NAME_SLOT, spec_line=spec_line)
    name = f"llmc_{op}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    return source.replace(_NAME_SLOT, name), name


def cache_dir() -> Path:
    root = os.environ.get("LLMC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "llmc") / "kernels"


def _write_once(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Another process may write the same file at the same time: write aside, then rename atomically.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def source_file(op: str, **spec) -> tuple[Path, str]:
    """(path, kernel_name) of `op`'s source rendered for `spec`, written to the cache dir (once per content):
    what the AOT compiler and the shipped-kernel lookup read, without importing the kernel."""
    source, name = render(op, **spec)
    path = cache_dir() / f"{name}.py"
    _write_once(path, source)
    return path, name


@functools.lru_cache(maxsize=None)
def _load(op: str, spec_items: tuple, interpret: bool, directory: str):
    source, name = render(op, **dict(spec_items))
    path = Path(directory) / f"{name}.py"
    _write_once(path, source)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def load(op: str, **spec):
    """The @triton.jit kernel of `op` for `spec`, rendered, written to the cache dir and imported once."""
    from triton import knobs

    return _load(op, tuple(sorted(spec.items())), bool(knobs.runtime.interpret), str(cache_dir()))
