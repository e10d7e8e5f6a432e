"""From one launch of a rendered kernel to the KernelSpec that compiles it ahead of time, and back at run time.

Every launcher in launch.py ends in `kernel[grid](*args, num_warps=..., num_stages=...)` on what `load()`
returned. Two hooks in launch.py swap that kernel for one of the classes here, so the launchers' logic (checks,
block configuration, argument order) is used as is and never restated:

- `RecordingKernel` (planning, `launch.recording(arch)`): launches nothing and records the launch's spec; the
  launcher ran on meta tensors, which carry every shape, stride, dtype and storage offset a spec depends on.
- `LibraryKernel` (a GPU host serving a bundle, inside `launch.using(shipped)`): derives the spec of the real
  launch the same way and launches the bundle's cubin of that key, or the JIT kernel where the bundle has none.

Both go through `launch_spec`, so a launch at run time finds the cubin planned for it exactly when the planner
saw the same kernel, argument types, pointer alignment and launch options. The signature follows Triton's own
rules for a JIT launch: a tensor is a pointer to its dtype, a bool is i1, an int is i32 when it fits, else
i64 (u64 above that), a float is fp32. Only pointers are declared 16-aligned (tt.divisibility), and only when
the tensor's address is: integer arguments include token counts and strides that change with the batch, and
declaring them would split one kernel into a cubin per token count.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc.codegen.triton import render
from llmc.codegen.triton.aot import KernelSpec, KernelSpecError

# What Triton's CUDA backend compiles with when a launch does not say (triton.backends.nvidia CUDAOptions).
TRITON_DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}
ALIGNMENT = 16
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
                  torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8",
                  torch.uint8: "*u8", torch.bool: "*i1"}


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel as the spec needs it: its file, name, parameters in order, which of them are constexpr,
    and the launch options its template declares (LAUNCH_OPTIONS), read from the source without importing it."""

    path: Path
    name: str
    params: tuple[str, ...]
    constexprs: frozenset[str]
    options: dict


@functools.lru_cache(maxsize=None)
def _kernel_source(op: str, spec_items: tuple, directory: str) -> KernelSource:
    path, name = render.source_file(op, **dict(spec_items))
    tree = ast.parse(path.read_text(encoding="utf-8"))
    function = next((f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == name), None)
    if function is None:
        raise KernelSpecError(f"rendered source {path} defines no function {name}")
    params = tuple(arg.arg for arg in function.args.args)
    constexprs = frozenset(arg.arg for arg in function.args.args
                           if arg.annotation is not None and ast.unparse(arg.annotation).endswith("constexpr"))
    options = dict(TRITON_DEFAULT_OPTIONS)
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(getattr(t, "id", None) == "LAUNCH_OPTIONS"
                                                     for t in statement.targets):
            options.update(ast.literal_eval(statement.value))
    return KernelSource(path, name, params, constexprs, options)


def kernel_source(op: str, spec: dict) -> KernelSource:
    key = (op, tuple(sorted(spec.items())), str(render.cache_dir()))
    source = _kernel_source(*key)
    if not source.path.is_file():  # the cache dir was cleaned since: render it again
        _kernel_source.cache_clear()
        source = _kernel_source(*key)
    return source


def argument_type(value) -> str:
    """The Triton signature type of one launch argument, as a JIT launch would specialise it."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise KernelSpecError(f"no Triton pointer type for a {value.dtype} tensor")
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if -2**31 <= value < 2**31:
            return "i32"
        return "i64" if -2**63 <= value < 2**63 else "u64"
    if isinstance(value, float):
        return "fp32"
    raise KernelSpecError(f"cannot pass a {type(value).__name__} to a Triton kernel")


def bind_arguments(source: KernelSource, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """(parameter -> value, launch options) of a `kernel[grid](*args, **kwargs)` call."""
    options = {**source.options}
    values = dict(zip(source.params, args))
    for key, value in kwargs.items():
        if key in source.params:
            values[key] = value
        elif key in options:
            options[key] = value
        else:
            raise KernelSpecError(f"kernel {source.name}: launch option {key}={value!r} cannot be compiled ahead "
                                  "of time (only num_warps and num_stages)")
    if len(args) > len(source.params) or set(values) != set(source.params):
        raise KernelSpecError(f"kernel {source.name} takes {', '.join(source.params)}; the launch passed "
                              f"{len(args)} positional and {sorted(kwargs)} keyword arguments")
    return values, options


def launch_spec(op: str, spec: dict, args: tuple, kwargs: dict) -> KernelSpec:
    """The KernelSpec that compiles the kernel `load(op, **spec)` for this launch's arguments."""
    source = kernel_source(op, spec)
    values, options = bind_arguments(source, args, kwargs)
    signature, constexprs, aligned = {}, {}, []
    for name in source.params:
        value = values[name]
        if name in source.constexprs:
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = argument_type(value)
        if isinstance(value, torch.Tensor) and value.data_ptr() % ALIGNMENT == 0:
            aligned.append(name)
    return KernelSpec(source.path, source.name, signature, constexprs, num_warps=options["num_warps"],
                      num_stages=options["num_stages"], aligned=tuple(aligned), op=op)


class KernelRecorder:
    """Collects the spec of every launch made while `launch.recording(arch)` is active."""

    def __init__(self, arch: str):
        self.arch = arch
        self.specs: list[KernelSpec] = []

    def kernel(self, op: str, spec: dict) -> RecordingKernel:
        return RecordingKernel(self, op, spec)


class RecordingKernel:
    def __init__(self, recorder: KernelRecorder, op: str, spec: dict):
        self._recorder, self._op, self._spec = recorder, op, spec

    def __getitem__(self, grid):
        def record(*args, **kwargs) -> None:
            self._recorder.specs.append(launch_spec(self._op, self._spec, args, kwargs))

        return record


class ShippedKernels:
    """A bundle's kernel library (runtime/kernels.py KernelLibrary: `index.kernels` keyed by spec key, and
    `kernel(key)` -> a LoadedKernel called as `kernel(grid, *runtime_args)`), with each launch's lookup
    remembered: the key hashes the kernel source, too slow to compute per launch."""

    def __init__(self, library):
        self.library = library
        self._resolved: dict[tuple, object] = {}

    def find(self, op: str, spec: dict, args: tuple, kwargs: dict):
        """(the library's loaded kernel for this launch or None when the bundle has none, its runtime arguments
        in the kernel's order)."""
        source = kernel_source(op, spec)
        values, options = bind_arguments(source, args, kwargs)
        runtime_args = [values[name] for name in source.params if name not in source.constexprs]
        identity = (source.name, options["num_warps"], options["num_stages"],
                    *((name, values[name]) if name in source.constexprs else
                      (name, argument_type(values[name]),
                       isinstance(values[name], torch.Tensor) and values[name].data_ptr() % ALIGNMENT == 0)
                      for name in source.params))
        if identity not in self._resolved:
            key = launch_spec(op, spec, args, kwargs).key()
            self._resolved[identity] = self.library.kernel(key) if key in self.library.index.kernels else None
        return self._resolved[identity], runtime_args


class LibraryKernel:
    """What `load()` returns while a library is in use: launches the shipped cubin when one matches."""

    def __init__(self, shipped: ShippedKernels, op: str, spec: dict, jit_kernel):
        self._shipped, self._op, self._spec, self._jit = shipped, op, spec, jit_kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            loaded, runtime_args = self._shipped.find(self._op, self._spec, args, kwargs)
            if loaded is None:
                return self._jit[grid](*args, **kwargs)
            return loaded(tuple(grid), *runtime_args)

        return launch
