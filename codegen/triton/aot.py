"""Ahead-of-time compilation of Triton kernels to cubins, per GPU arch, without a GPU; the bundle's kernels/.

A rendered kernel is a `KernelSpec`: the file holding a @triton.jit function, its name, the full signature
(every parameter in order, constexprs typed "constexpr"), the constexpr values, num_warps and num_stages.
`compile_kernel` runs `triton.compile` on an `ASTSource` for `GPUTarget("cuda", capability, 32)`: Triton's
front end and ptxas run on any machine, so a CPU box builds real cubins. `compile_all` compiles each distinct
spec once per arch (a model's layers share their kernels) on a thread pool: ptxas runs as a subprocess, so
threads overlap it even under the GIL. `kernel_files` / `write_kernels` lay the result out as

    kernels/index.json              format, triton version, archs, key -> name, ops, spec, launches, archs
    kernels/<arch>/<key>.cubin      the binary the runtime loads (runtime/kernels.py)
    kernels/<arch>/<key>.json       the metadata JSON triton wrote next to it (name, num_warps, shared, ...)
    kernels/<arch>/<key>.ptx        only with keep_ptx
    kernels/src/<key>.py            the Triton source, for the JIT fallback on an arch without a cubin

Kernel sources must be self-contained (import triton and the standard library only): the runtime imports the
shipped copy from kernels/src/, where nothing else from the build machine exists. runtime/kernels.py reads this
layout; the two share it by the constants below, and tests/runtime/test_kernels.py keeps them in step.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import threading
import time
import contextlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INDEX_FORMAT = "llmc-kernels"
INDEX_VERSION = 1
INDEX = "index.json"
SOURCE_DIR = "src"
KEY_CHARS = 20  # 80 bits of sha256: no collision among the few hundred kernels of a bundle
ARCH_PATTERN = re.compile(r"sm_(\d+)(\d)a?")
CONSTEXPR_TYPES = (bool, int, float, str)


class KernelSpecError(ValueError):
    pass


class KernelCompileError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelSpec:
    """One rendered kernel. `aligned` names parameters the caller guarantees to be 16-byte aligned pointers or
    multiples of 16 (Triton's tt.divisibility=16): the cubin vectorizes on it, and the runtime checks it at
    each launch. `op` (the llmc op it lowers) and `launches` (how many call sites in the graph use it) are
    bookkeeping for the index and the report; they do not change the cubin, so they are not in the key."""

    source: Path
    name: str
    signature: dict[str, str]
    constexprs: dict[str, bool | int | float | str] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()
    op: str = ""
    launches: int = 1

    def __post_init__(self):
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "aligned", tuple(self.aligned))
        typed_constexpr = {name for name, kind in self.signature.items() if kind == "constexpr"}
        if typed_constexpr != set(self.constexprs):
            raise KernelSpecError(f"kernel {self.name}: the signature's constexpr parameters "
                                  f"{sorted(typed_constexpr)} and the constexpr values given {sorted(self.constexprs)} "
                                  "must name the same parameters")
        for name, value in self.constexprs.items():
            if not isinstance(value, CONSTEXPR_TYPES):
                raise KernelSpecError(f"kernel {self.name}: constexpr {name}={value!r} is a {type(value).__name__}; "
                                      "give a bool, int, float or str")
        unknown = [name for name in self.aligned if name not in self.signature or name in typed_constexpr]
        if unknown:
            raise KernelSpecError(f"kernel {self.name}: aligned names {unknown}, which are not runtime parameters")
        if self.num_warps <= 0 or self.num_warps & (self.num_warps - 1) or self.num_stages <= 0:
            raise KernelSpecError(f"kernel {self.name}: num_warps must be a power of two and num_stages positive, "
                                  f"got {self.num_warps} and {self.num_stages}")
        if self.launches < 1:
            raise KernelSpecError(f"kernel {self.name}: launches must be at least 1, got {self.launches}")

    @property
    def source_text(self) -> str:
        try:
            return self.source.read_text(encoding="utf-8")
        except OSError as e:
            raise KernelSpecError(f"kernel {self.name}: cannot read its source {self.source} ({e.strerror})") from None

    def key(self, source_text: str | None = None) -> str:
        """Names the cubin: the same source, signature, constexprs and options give the same key anywhere."""
        identity = {"source": self.source_text if source_text is None else source_text, **self.spec_dict()}
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:KEY_CHARS]

    def spec_dict(self) -> dict:
        """What the runtime needs to launch (and re-compile) the kernel; the index stores it. The signature is
        a list of [name, type] pairs: parameter order is the calling convention, and JSON objects get sorted."""
        return {"name": self.name, "signature": [[name, kind] for name, kind in self.signature.items()],
                "constexprs": dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages,
                "aligned": list(self.aligned)}


@dataclass
class CompiledArtifact:
    key: str
    arch: str
    cubin: bytes
    metadata: dict  # the JSON triton wrote beside the cubin: name, num_warps, shared, target, triton_version ...
    source: str
    ptx: str | None = None
    seconds: float = 0.0


@dataclass
class CompiledKernelSet:
    """One distinct spec, the ops and launch count it serves, and its artifact per arch."""

    spec: KernelSpec
    source: str
    ops: list[str]
    launches: int
    artifacts: dict[str, CompiledArtifact] = field(default_factory=dict)


@dataclass
class AOTResult:
    kernels: dict[str, CompiledKernelSet]
    archs: list[str]
    seconds: float  # wall clock of compile_all
    compile_seconds: float  # sum over compilations (exceeds `seconds` when the pool overlaps them)

    @property
    def kernels_compiled(self) -> int:
        return sum(len(entry.artifacts) for entry in self.kernels.values())

    @property
    def launches_served(self) -> int:
        return sum(entry.launches for entry in self.kernels.values())

    def report(self) -> dict:
        return {"distinct_kernels": len(self.kernels), "archs": list(self.archs),
                "kernels_compiled": self.kernels_compiled, "launches_served": self.launches_served,
                "seconds": round(self.seconds, 3), "compile_seconds": round(self.compile_seconds, 3)}


def parse_arch(arch: str) -> int:
    """"sm_80" -> 80. Triton compiles sm_90 as sm_90a (the wgmma/TMA features), so a trailing a is accepted."""
    match = ARCH_PATTERN.fullmatch(arch)
    if match is None:
        raise KernelSpecError(f"unknown GPU arch {arch!r}; write it as sm_XY, e.g. sm_80 or sm_90")
    return int(match.group(1)) * 10 + int(match.group(2))


_modules_lock = threading.Lock()
_modules: dict[tuple[str, str], object] = {}


def _jit_function(spec: KernelSpec, source_text: str):
    """Imports the spec's source once per (path, content); the JITFunction reads its own source through it."""
    cache_key = (str(spec.source.resolve()), hashlib.sha256(source_text.encode("utf-8")).hexdigest())
    with _modules_lock:
        module = _modules.get(cache_key)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(f"llmc_kernel_{cache_key[1][:16]}", spec.source)
            module = importlib.util.module_from_spec(module_spec)
            try:
                # @triton.jit builds an interpreter function under TRITON_INTERPRET=1 (the kernel tests set it
                # process-wide); cubins need the compiled kind whatever the environment says.
                with knobs.runtime.scope():
                    knobs.runtime.interpret = False
                    module_spec.loader.exec_module(module)
            except Exception as e:  # the rendered source itself is broken: name the file, keep the cause
                raise KernelSpecError(f"kernel source {spec.source} does not import: {e}") from e
            _modules[cache_key] = module
    fn = getattr(module, spec.name, None)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise KernelSpecError(f"{spec.source} defines no @triton.jit function named {spec.name!r}")
    if list(spec.signature) != fn.arg_names:
        raise KernelSpecError(f"kernel {spec.name}: the signature lists {list(spec.signature)}, the function takes "
                              f"{fn.arg_names}; list every parameter in order")
    return fn


def compile_kernel(spec: KernelSpec, arch: str, keep_ptx: bool = False) -> CompiledArtifact:
    """Compiles `spec` for `arch` ("sm_80") on this machine; no GPU needed. Triton's on-disk cache
    (TRITON_CACHE_DIR) still applies: a spec compiled before comes back without running ptxas again."""
    start = time.perf_counter()
    source_text = spec.source_text
    fn = _jit_function(spec, source_text)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    source = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
    target = GPUTarget("cuda", parse_arch(arch), 32)
    try:
        compiled = triton.compile(source, target=target,
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # Triton raises several unrelated types (CompilationError, ptxas errors, asserts)
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise KernelCompileError(f"kernel {spec.name} ({spec.source}) failed to compile for {arch}: "
                                 f"{first_line}") from e
    metadata_file = next(path for name, path in compiled.metadata_group.items() if name.endswith(".json"))
    return CompiledArtifact(
        key=spec.key(source_text), arch=arch, cubin=bytes(compiled.asm["cubin"]),
        metadata=json.loads(Path(metadata_file).read_text(encoding="utf-8")), source=source_text,
        ptx=compiled.asm.get("ptx") if keep_ptx else None, seconds=time.perf_counter() - start)


@contextlib.contextmanager
def _compiler_env():
    """The environment spawned compile workers inherit: never the interpreter."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def compile_all(specs, archs, keep_ptx: bool = False, workers: int | None = None) -> AOTResult:
    """Compiles each distinct spec once per arch. Duplicates (or `launches` > 1) add to the launch count of
    the one compiled kernel they share."""
    archs = list(dict.fromkeys(archs))
    for arch in archs:
        parse_arch(arch)
    start = time.perf_counter()
    kernels: dict[str, CompiledKernelSet] = {}
    for spec in specs:
        source_text = spec.source_text
        key = spec.key(source_text)
        entry = kernels.get(key)
        if entry is None:
            entry = kernels[key] = CompiledKernelSet(spec, source_text, [], 0)
        entry.launches += spec.launches
        if spec.op and spec.op not in entry.ops:
            entry.ops.append(spec.op)
    tasks = [(key, arch) for key in kernels for arch in archs]
    workers = workers or min(len(tasks), os.cpu_count() or 1) or 1
    # Worker processes, not threads: triton decides once per process whether @triton.jit interprets or compiles,
    # so a process that ran kernels under TRITON_INTERPRET=1 (the CPU tests) cannot build cubins; spawned workers
    # start clean, and ptxas and the LLVM passes run on every core.
    with _compiler_env(), ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {task: pool.submit(compile_kernel, kernels[task[0]].spec, task[1], keep_ptx) for task in tasks}
        for (key, arch), future in futures.items():
            kernels[key].artifacts[arch] = future.result()
    compile_seconds = sum(a.seconds for entry in kernels.values() for a in entry.artifacts.values())
    return AOTResult(kernels, archs, time.perf_counter() - start, compile_seconds)


def kernel_files(result: AOTResult) -> dict[str, bytes]:
    """Relative path under kernels/ -> content: what write_kernels writes and write_bundle(extra_files=) takes."""
    files: dict[str, bytes] = {}
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "triton_version": triton.__version__,
             "archs": list(result.archs), "kernels": {}}
    for key, entry in sorted(result.kernels.items()):
        files[f"{SOURCE_DIR}/{key}.py"] = entry.source.encode("utf-8")
        built = {}
        for arch, artifact in sorted(entry.artifacts.items()):
            files[f"{arch}/{key}.cubin"] = artifact.cubin
            files[f"{arch}/{key}.json"] = json.dumps(artifact.metadata, sort_keys=True).encode("utf-8")
            built[arch] = {"cubin": f"{arch}/{key}.cubin", "metadata": f"{arch}/{key}.json",
                           "shared": artifact.metadata.get("shared", 0)}
            if artifact.ptx is not None:
                files[f"{arch}/{key}.ptx"] = artifact.ptx.encode("utf-8")
        index["kernels"][key] = {**entry.spec.spec_dict(), "ops": list(entry.ops), "launches": entry.launches,
                                 "source": f"{SOURCE_DIR}/{key}.py", "archs": built}
    files[INDEX] = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files


def write_kernels(result: AOTResult, directory: Path) -> Path:
    """Writes the kernels/ layout into `directory` (created; it is the kernels/ folder itself)."""
    directory = Path(directory)
    for relative, content in kernel_files(result).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return directory
