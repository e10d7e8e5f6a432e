"""Compile targets: the hardware a bundle is built for, and what each one can legally compute in.

A leaf module (the standard library and llmc.common.errors only) so that compiler/, passes/ and runtime/ can all ask it what is legal
without importing one another. Memory is the nominal board memory in GB; SM counts are those of the
shipping SKU (A100 80 GB SXM, H100 SXM, H200 SXM).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmc.common.errors import LlmcError, UsageError

KNOWN_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn")

# Spellings users type on the command line; the canonical names are torch's.
DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn", "float8": "float8_e4m3fn", "e4m3": "float8_e4m3fn",
}

# CPU instruction sets a bundle may require, weakest first: a host runs the bundles of its own level and below.
# "baseline" asks for nothing (any x86-64 or Arm host), avx512 means AVX-512 F/BW/VL, amx AMX-BF16 tiles beside
# avx512_bf16.
CPU_ISAS = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")

# fp8 tensor-core GEMMs arrive with Ada (sm_89); Turing (sm_75) has no bf16 arithmetic.
FP8_MIN_CAPABILITY = (8, 9)
BF16_MIN_CAPABILITY = (8, 0)


class UnknownTargetError(LlmcError, ValueError):
    pass


@dataclass(frozen=True)
class Target:
    name: str
    arch: str  # "cpu" or "sm_XY"
    capability: tuple[int, int] | None  # CUDA compute capability; None for cpu
    memory_gb: int | None  # None for cpu: the host's RAM is not a property of the target
    sm_count: int | None
    dtypes: tuple[str, ...]
    default_dtype: str
    isa: str | None = None  # cpu: the instruction set the bundle requires (CPU_ISAS); None for GPUs

    def __post_init__(self):
        unknown = [d for d in self.dtypes if d not in KNOWN_DTYPES]
        if unknown:
            raise ValueError(f"target {self.name}: unknown dtype {unknown[0]!r}; known: {', '.join(KNOWN_DTYPES)}")
        if self.default_dtype not in self.dtypes:
            raise ValueError(f"target {self.name}: default dtype {self.default_dtype} is not among its dtypes")
        if (self.arch == "cpu") != (self.capability is None):
            raise ValueError(f"target {self.name}: a cpu arch has no capability and a GPU arch needs one")
        if (self.arch == "cpu") != (self.isa is not None) or (self.isa is not None and self.isa not in CPU_ISAS):
            raise ValueError(f"target {self.name}: a cpu target needs an instruction set of {', '.join(CPU_ISAS)}, "
                             f"a GPU none (got {self.isa!r})")

    @property
    def is_gpu(self) -> bool:
        return self.arch != "cpu"

    def supports(self, dtype: str) -> bool:
        return dtype in self.dtypes

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "capability": list(self.capability) if self.capability is not None else None,
            "memory_gb": self.memory_gb,
            "sm_count": self.sm_count,
            "dtypes": list(self.dtypes),
            "default_dtype": self.default_dtype,
            "isa": self.isa,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        """Inverse of to_dict (JSON turns tuples into lists; this turns them back)."""
        try:
            capability = d["capability"]
            return cls(
                name=d["name"],
                arch=d["arch"],
                capability=tuple(capability) if capability is not None else None,
                memory_gb=d["memory_gb"],
                sm_count=d["sm_count"],
                dtypes=tuple(d["dtypes"]),
                default_dtype=d["default_dtype"],
                # Bundles written before the ISA was recorded ask for nothing beyond the baseline.
                isa=d.get("isa") or ("baseline" if d["arch"] == "cpu" else None),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed target description {d!r}: {e}") from None


def _gpu(name: str, major: int, minor: int, memory_gb: int, sm_count: int) -> Target:
    capability = (major, minor)
    dtypes = ["bfloat16", "float16", "float32"] if capability >= BF16_MIN_CAPABILITY else ["float16", "float32"]
    if capability >= FP8_MIN_CAPABILITY:
        dtypes.append("float8_e4m3fn")
    return Target(name, f"sm_{major}{minor}", capability, memory_gb, sm_count, tuple(dtypes), dtypes[0])


def cpu_flags() -> set[str]:
    """The feature flags of this machine's CPU as Linux names them (/proc/cpuinfo); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def host_isa(flags: set[str] | None = None) -> str:
    """The strongest of CPU_ISAS that a CPU with these flags (default: this machine's) runs."""
    flags = cpu_flags() if flags is None else flags
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
    if avx512 and {"avx512_bf16", "amx_bf16", "amx_tile"} <= flags:
        return "amx"
    if avx512 and "avx512_bf16" in flags:
        return "avx512_bf16"
    if avx512:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "baseline"


def isa_at_least(have: str, need: str) -> bool:
    return CPU_ISAS.index(have) >= CPU_ISAS.index(need)


# CPUs with native bf16 arithmetic: there bf16 bundles decode and prefill faster than fp32 ones (oneDNN's bf16
# GEMMs with prepacked weights, half the bytes per step; bench/results/<device>/smollm2.md), so bf16 is the default.
NATIVE_BF16_ISAS = ("avx512_bf16", "amx")


def _cpu(name: str, isa: str) -> Target:
    default = "bfloat16" if isa in NATIVE_BF16_ISAS else "float32"
    return Target(name, "cpu", None, None, None, ("float32", "bfloat16", "float16"), default, isa)


TARGETS: dict[str, Target] = {t.name: t for t in [
    _cpu("cpu", host_isa()),  # the build machine's own instruction set
    *(_cpu(f"cpu-{isa}", isa) for isa in CPU_ISAS),  # cross-compiles for another host
    _gpu("t4", 7, 5, 16, 40),
    _gpu("a10", 8, 6, 24, 72),
    _gpu("rtx3090", 8, 6, 24, 82),
    _gpu("a100", 8, 0, 80, 108),
    _gpu("l4", 8, 9, 24, 58),
    _gpu("rtx4090", 8, 9, 24, 128),
    _gpu("h100", 9, 0, 80, 132),
    _gpu("h200", 9, 0, 141, 132),
]}


def get_target(name: str) -> Target:
    target = TARGETS.get(name.lower())
    if target is None:
        raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return target


def targets_with_capability(capability: tuple[int, int]) -> list[Target]:
    """The registered GPUs of one compute capability (to suggest a --target for the host at hand)."""
    return [t for t in TARGETS.values() if t.capability == tuple(capability)]


def describe(target: Target) -> str:
    """'h100 (sm_90)' for GPUs, 'cpu (avx512_bf16)' for CPUs: how error messages name a target."""
    if target.isa is not None:
        return f"{target.name} ({target.isa})" if target.name == "cpu" else target.name
    return target.name if target.name == target.arch else f"{target.name} ({target.arch})"


def resolve_dtype(target: Target, dtype: str | None) -> str:
    """The dtype to compile in: the target's default when none is asked for; refuses what the target lacks."""
    if dtype is None:
        return target.default_dtype
    canonical = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if canonical not in KNOWN_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; known: {', '.join(KNOWN_DTYPES)}")
    if not target.supports(canonical):
        raise UsageError(f"{describe(target)} has no {canonical}; use --dtype {target.default_dtype} "
                         f"(legal on {target.name}: {', '.join(target.dtypes)})")
    return canonical


def format_targets() -> str:
    """The table `llmc targets` prints; the default dtype of each target comes first, marked with *."""
    header = ("name", "arch", "memory", "SMs", "dtypes")
    rows = [header]
    for t in TARGETS.values():
        dtypes = [f"{d}*" if d == t.default_dtype else d for d in t.dtypes]
        rows.append((
            t.name,
            f"cpu/{t.isa}" if t.isa else t.arch,
            f"{t.memory_gb} GB" if t.memory_gb is not None else "host",
            str(t.sm_count) if t.sm_count is not None else "-",
            ", ".join(dtypes),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in rows]
    lines.append("* default dtype")
    return "\n".join(lines)
