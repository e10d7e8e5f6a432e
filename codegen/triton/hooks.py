"""What every launcher shares: which kernel `load()` hands it (the JIT kernel, a planning recorder's stand-in, or a
bundle's shipped cubin), which arch's block configurations apply, and the dtype names and output allocation of
the kernel specs. launch.py (the row, GEMM and rope launchers) and attention.py (the attention launchers) build on
it; launch.py re-exports `recording`, `using`, `load` and `current_arch`.

Both hooks are context variables, never process-wide state: a recorder replaces the kernels inside
`recording(arch)`, a bundle's shipped kernels inside `using(shipped)`, which the engine that loaded them enters
around each of its graph calls. So two engines in one process each launch their own bundle's kernels, whether their
steps interleave in one thread, one engine steps inside another's callback, or they serve from separate threads
(asyncio tasks included: each has its own context); and a torch.compile graph launches none of theirs.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
from triton import knobs

from llmc.codegen.triton import configs, render
from llmc.codegen.triton.record import KernelRecorder, LibraryKernel, ShippedKernels

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# What `load()` hands the launchers instead of the JIT kernel (record.py): a recorder while planning, a bundle's
# shipped kernels while an engine serving it on a GPU host runs a graph.
_RECORDER: ContextVar[KernelRecorder | None] = ContextVar("llmc_kernel_recorder", default=None)
_SHIPPED: ContextVar[ShippedKernels | None] = ContextVar("llmc_shipped_kernels", default=None)


def active_recorder() -> KernelRecorder | None:
    """The recorder of the innermost `recording` block in this context, None outside one."""
    return _RECORDER.get()


@contextlib.contextmanager
def recording(arch: str):
    """Launchers called inside launch nothing: each launch appends its KernelSpec to the yielded recorder's
    `specs`, with `arch`'s block configurations. Tensors may be on the meta device."""
    if arch not in configs.ARCHS or arch == "interpret":
        raise ValueError(f"no kernel configurations for arch {arch!r}; known: {', '.join(configs.ARCHS[:-1])}")
    recorder = KernelRecorder(arch)
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


@contextlib.contextmanager
def using(shipped: ShippedKernels | None):
    """Compiled launches inside take the cubin `shipped` (record.py ShippedKernels over a runtime/kernels.py
    KernelLibrary, made once per loaded bundle) holds for their spec, and JIT-compile only what it lacks; None:
    JIT only, whatever an enclosing block uses."""
    token = _SHIPPED.set(shipped)
    try:
        yield
    finally:
        _SHIPPED.reset(token)


def load(op: str, **spec):
    """The kernel `op`'s launcher launches: render.load's JIT kernel, unless a hook above replaces it."""
    recorder = _RECORDER.get()
    if recorder is not None:
        return recorder.kernel(op, spec)
    kernel = render.load(op, **spec)
    shipped = _SHIPPED.get()
    if shipped is not None and not knobs.runtime.interpret:
        return LibraryKernel(shipped, op, spec, kernel)
    return kernel


def current_arch(device: torch.device) -> str:
    """The config table's arch for `device`: the recorded target's while recording, "interpret" under
    TRITON_INTERPRET, else sm_XY, an arch newer than the table's newest using the newest entry."""
    recorder = _RECORDER.get()
    if recorder is not None:
        return recorder.arch
    if knobs.runtime.interpret:
        return "interpret"
    if device.type != "cuda":
        raise ValueError(f"Triton kernels run on CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to "
                         "interpret them on the CPU")
    major, minor = torch.cuda.get_device_capability(device)
    known = [arch for arch in configs.ARCHS if arch.startswith("sm_")]
    fitting = [arch for arch in known if int(arch[3:]) <= major * 10 + minor]
    if not fitting:
        raise ValueError(f"GPU arch sm_{major}{minor} is older than the oldest supported, {known[0]}")
    return max(fitting, key=lambda arch: int(arch[3:]))


def dtype_name(tensor: torch.Tensor, what: str) -> str:
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"{what} is {tensor.dtype}; Triton kernels take float32, float16 or bfloat16")
    return _DTYPE_NAMES[tensor.dtype]


def empty_output(shape, dtype: torch.dtype, device: torch.device, poison: bool) -> torch.Tensor:
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
