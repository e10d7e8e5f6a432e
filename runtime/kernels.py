"""Loads a bundle's shipped Triton kernels (kernels/, written by codegen/triton/aot.py) and launches them.

On a host whose arch has cubins, and whose triton is the version that built them, a kernel is loaded from its
cubin and triton's metadata JSON through `triton.compiler.CompiledKernel` (the class triton itself builds from
its on-disk cache): `driver.active.utils.load_binary` loads the cubin, and the driver's launcher, generated from
the signature, launches it. Triton's front end and ptxas never run. Otherwise the shipped source is compiled
for the host with `triton.compile` (the JIT fallback), with a warning; a host that can do neither is refused
with a message that says how to rebuild. Only exact arch matches use a cubin: Triton builds sm_90 as sm_90a,
whose cubin runs on 9.0 alone, and each arch gets its own tuning anyway.

The launcher is a small C stub triton compiles once per signature and caches (TRITON_CACHE_DIR); that is the
host's C compiler, not a Triton compilation, and `CompilationCounter` does not count it.

triton is imported only when a kernel is loaded, so that index parsing and the loading plan work on any host.
This module never imports compiler/ or passes/.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from llmc.common.errors import LlmcError
from llmc.common.targets import targets_with_capability
from llmc.runtime.bundle import HostInfo, detect_host

INDEX_FORMAT = "llmc-kernels"
INDEX_VERSION = 1
INDEX = "index.json"
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
ELFABIVERSION_CUDA_V1 = 7  # up to sm_90: SM number in e_flags bits 0-7; from V2 (8, Blackwell) in bits 8-15
REBUILD = "rebuild the bundle with llmc compile"


class KernelError(LlmcError):
    pass


class KernelFallbackWarning(UserWarning):
    pass


def arch_of(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def cubin_arch(data: bytes) -> str:
    """The SM a cubin was built for, from its ELF header (LLVM's ELFObjectFileBase::getNVPTXCPUName reads it
    the same way): "sm_80"; "sm_90a" when the arch-specific feature flag is set."""
    if len(data) < 52 or data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise KernelError("not a 64-bit little-endian ELF file, so not a cubin")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != EM_CUDA:
        raise KernelError(f"ELF machine {machine}, not EM_CUDA ({EM_CUDA}): not a cubin")
    (flags,) = struct.unpack_from("<I", data, 48)
    if data[8] == ELFABIVERSION_CUDA_V1:
        return f"sm_{flags & 0xFF}{'a' if flags & 0x800 else ''}"
    return f"sm_{(flags >> 8) & 0xFF}{'a' if flags & 0x8 else ''}"


@dataclass(frozen=True)
class KernelRecord:
    """One index entry: a distinct kernel, its launch spec and the files of each arch it was built for."""

    key: str
    name: str
    ops: tuple[str, ...]
    signature: dict[str, str]
    constexprs: dict
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...]
    launches: int
    source: str | None  # relative to kernels/
    cubins: dict[str, tuple[str, str]]  # arch -> (cubin, metadata JSON), relative to kernels/

    @property
    def runtime_params(self) -> list[str]:
        return [name for name, kind in self.signature.items() if kind != "constexpr"]


@dataclass(frozen=True)
class KernelIndex:
    directory: Path
    triton_version: str
    archs: tuple[str, ...]
    kernels: dict[str, KernelRecord]


def read_index(directory: str | Path) -> KernelIndex:
    directory = Path(directory)
    path = directory / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KernelError(f"{path} is missing; {REBUILD}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KernelError(f"{path} is not valid JSON ({e}); {REBUILD}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise KernelError(f"{path} is not an llmc kernel index; {REBUILD}")
    if index.get("version") != INDEX_VERSION:
        raise KernelError(f"{path}: kernel index v{index.get('version')}, this llmc reads v{INDEX_VERSION}; "
                          f"{REBUILD}")
    try:
        kernels = {key: _record(key, entry) for key, entry in index["kernels"].items()}
        archs = tuple(index["archs"])
        triton_version = str(index["triton_version"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise KernelError(f"{path}: malformed entry ({type(e).__name__}: {e}); {REBUILD}") from None
    for record in kernels.values():
        for relative in [record.source, *(f for pair in record.cubins.values() for f in pair)]:
            if relative is not None and not _inside(relative):
                raise KernelError(f"{path}: kernel {record.key} names {relative!r}, not a file inside kernels/; "
                                  f"{REBUILD}")
    return KernelIndex(directory, triton_version, archs, kernels)


def _record(key: str, entry: dict) -> KernelRecord:
    signature = {str(name): str(kind) for name, kind in entry["signature"]}  # [name, type] pairs, in order
    constexprs = dict(entry["constexprs"])
    if {n for n, kind in signature.items() if kind == "constexpr"} != set(constexprs):
        raise ValueError(f"kernel {key}: constexpr values do not match the signature")
    return KernelRecord(
        key=key, name=str(entry["name"]), ops=tuple(entry.get("ops", ())), signature=signature,
        constexprs=constexprs, num_warps=int(entry["num_warps"]), num_stages=int(entry["num_stages"]),
        aligned=tuple(entry.get("aligned", ())), launches=int(entry.get("launches", 1)), source=entry.get("source"),
        cubins={arch: (files["cubin"], files["metadata"]) for arch, files in entry["archs"].items()})


def _inside(relative: str) -> bool:
    pure = PurePosixPath(relative)
    return bool(pure.parts) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in relative


@dataclass(frozen=True)
class LoadPlan:
    arch: str
    use_cubins: bool
    reason: str | None  # why the JIT fallback, None with cubins


def host_triton_version() -> str | None:
    """The importable triton's own version: distributions such as pytorch-triton install it under another
    package name, so the package metadata would miss it."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def plan_loading(index: KernelIndex, host: HostInfo, triton_version: str | None, allow_jit: bool = True) -> LoadPlan:
    """Cubins when the host's arch has them and its triton built them; else the JIT fallback; else refusal."""
    if host.device != "cuda" or host.capability is None:
        raise KernelError(f"the bundle's Triton kernels need a CUDA GPU and this host has none ({host.name}); "
                          "run it on a GPU host, or compile with --target cpu")
    arch = arch_of(tuple(host.capability))
    if triton_version is None:
        raise KernelError("the bundle's kernels are launched through triton, which is not installed here: "
                          "pip install 'llmc[gpu]'")
    missing = [record.name for record in index.kernels.values() if arch not in record.cubins]
    if not missing and triton_version == index.triton_version:
        return LoadPlan(arch, True, None)
    built = ", ".join(index.archs) or "no arch"
    if missing:
        reason = f"the bundle has cubins for {built}, not for this host's {arch} ({host.name})"
    else:
        reason = f"the cubins were built with triton {index.triton_version}, this host has triton {triton_version}"
    rebuild = _rebuild_hint(tuple(host.capability))
    unsourced = [record.name for record in index.kernels.values() if record.source is None]
    if not allow_jit or unsourced:
        why = "JIT compilation is off" if not allow_jit else f"kernel {unsourced[0]} ships no source to compile"
        raise KernelError(f"{reason}, and {why}: {rebuild}")
    return LoadPlan(arch, False, f"{reason}; compiling the shipped Triton source instead ({rebuild} to skip this)")


def _rebuild_hint(capability: tuple[int, int]) -> str:
    names = [target.name for target in targets_with_capability(capability)]
    return f"rebuild with llmc compile --target {names[0]}" if names else f"rebuild for {arch_of(capability)}"


class CompilationCounter:
    """Counts triton.compile runs while active (JIT launches included: they go through triton.compile),
    through triton's compilation listener; a listener already installed keeps being called."""

    def __init__(self):
        self.compiled = 0
        self.cache_hits = 0
        self.names: list[str] = []

    def __enter__(self) -> CompilationCounter:
        from triton import knobs

        self._previous = knobs.compilation.listener
        knobs.compilation.listener = self._listen
        return self

    def __exit__(self, *exc) -> None:
        from triton import knobs

        knobs.compilation.listener = self._previous

    def _listen(self, *, src, metadata, metadata_group, times, cache_hit) -> None:
        if cache_hit:
            self.cache_hits += 1
        else:
            self.compiled += 1
        self.names.append(metadata.get("name", "?"))
        if self._previous is not None:
            self._previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times,
                           cache_hit=cache_hit)


@dataclass
class _LaunchSource:
    """What triton's CudaLauncher reads from a source object: the signature and constexprs keyed by index."""

    signature: dict[str, str]
    constants: dict[tuple[int], object]


class LoadedKernel:
    """A launchable kernel: `kernel(grid, *runtime_args)`, constexprs filled in from the index."""

    def __init__(self, record: KernelRecord, compiled, from_cubin: bool):
        self.record = record
        self.compiled = compiled
        self.from_cubin = from_cubin
        self._params = record.runtime_params
        self._aligned = [self._params.index(name) for name in record.aligned]

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        if len(args) != len(self._params):
            raise TypeError(f"kernel {self.record.name} takes {len(self._params)} arguments "
                            f"({', '.join(self._params)}), got {len(args)}")
        for i in self._aligned:
            value = args[i].data_ptr() if isinstance(args[i], torch.Tensor) else args[i]
            if value % 16:
                raise ValueError(f"kernel {self.record.name} was compiled assuming {self._params[i]} is a multiple "
                                 f"of 16 (16-byte aligned), got {value}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        values = iter(args)
        full = [self.record.constexprs[name] if kind == "constexpr" else next(values)
                for name, kind in self.record.signature.items()]
        self.compiled[grid](*full)


class KernelLibrary:
    """The kernels of one bundle on this host. `load_all()` loads every kernel up front (at bundle load, so
    the first decode step pays nothing); `kernel(key)` loads one on first use."""

    def __init__(self, directory: str | Path, host: HostInfo | None = None, allow_jit: bool = True):
        self.index = read_index(directory)
        host = host if host is not None else detect_host()
        triton_version = host_triton_version() if host.device == "cuda" else None
        self.plan = plan_loading(self.index, host, triton_version, allow_jit)
        if not self.plan.use_cubins:
            warnings.warn(self.plan.reason, KernelFallbackWarning, stacklevel=2)
        self._loaded: dict[str, LoadedKernel] = {}

    def load_all(self) -> dict[str, LoadedKernel]:
        for key in self.index.kernels:
            self.kernel(key)
        return dict(self._loaded)

    def kernel(self, key: str) -> LoadedKernel:
        loaded = self._loaded.get(key)
        if loaded is None:
            record = self.index.kernels.get(key)
            if record is None:
                raise KernelError(f"the bundle has no kernel {key}; {REBUILD}")
            loader = self._from_cubin if self.plan.use_cubins else self._from_source
            loaded = self._loaded[key] = LoadedKernel(record, loader(record), self.plan.use_cubins)
        return loaded

    def _from_cubin(self, record: KernelRecord):
        from triton.compiler import CompiledKernel

        cubin, metadata = (self.index.directory / name for name in record.cubins[self.plan.arch])
        found = cubin_arch(cubin.read_bytes())
        if found.rstrip("a") != self.plan.arch:
            raise KernelError(f"{cubin} is a {found} cubin filed under {self.plan.arch}; {REBUILD}")
        constants = {(list(record.signature).index(name),): value for name, value in record.constexprs.items()}
        source = _LaunchSource(dict(record.signature), constants)
        # CompiledKernel takes triton's cache "metadata group": file name -> path, the .json first.
        group = {f"{record.name}.json": str(metadata), f"{record.name}.cubin": str(cubin)}
        return CompiledKernel(source, group, record.key)

    def _from_source(self, record: KernelRecord):
        import triton
        from triton.compiler import ASTSource
        from triton.runtime.driver import driver

        fn = _import_kernel(self.index.directory / record.source, record.name)
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in record.aligned}
        source = ASTSource(fn, dict(record.signature), dict(record.constexprs), attrs)
        return triton.compile(source, target=driver.active.get_current_target(),
                              options={"num_warps": record.num_warps, "num_stages": record.num_stages})


def _import_kernel(path: Path, name: str):
    from triton import knobs
    from triton.runtime import JITFunction

    text = path.read_bytes()
    spec = importlib.util.spec_from_file_location(f"llmc_kernel_{hashlib.sha256(text).hexdigest()[:16]}", path)
    module = importlib.util.module_from_spec(spec)
    with knobs.runtime.scope():  # a compiled JITFunction even under TRITON_INTERPRET=1
        knobs.runtime.interpret = False
        spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not isinstance(fn, JITFunction):
        raise KernelError(f"{path} defines no @triton.jit function {name!r}; {REBUILD}")
    return fn
