"""Cross-compilation of Triton kernels to cubins on a CPU-only machine, and the kernels/ layout.

How a cubin names its arch: an ELF64 file with e_machine EM_CUDA (190). Under ELFABIVERSION_CUDA_V1 (7, every
arch up to sm_90) the SM number is e_flags & 0xff (EF_CUDA_SM) and EF_CUDA_ACCELERATORS_V1 (0x800) marks an
"a" arch; under ELFABIVERSION_CUDA_V2 (8, Blackwell on) it is (e_flags & 0xff00) >> 8. Source: LLVM,
llvm/include/llvm/BinaryFormat/ELF.h (EF_CUDA_*) and llvm/lib/Object/ELFObjectFile.cpp
(ELFObjectFileBase::getNVPTXCPUName). Checked against what triton 3.6's ptxas (CUDA 12.8) writes: sm_80 ->
0x500550 (SM 0x50 | virtual SM 0x50 << 16 | 64-bit 0x400 | unified texmode 0x100), sm_90 -> 0x5a0d5a (sm_90a),
and against NVIDIA's cuobjdump shipped in the triton wheel (test_cuobjdump_agrees).
"""
import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest
import triton
from triton import knobs

from llmc.codegen.triton.aot import (KernelCompileError, KernelSpec, KernelSpecError, compile_all, compile_kernel,
                                     kernel_files, parse_arch, write_kernels)
from tests.conftest import SCALED_ADD_SIGNATURE, TEST_KERNEL_SOURCE

ARCHS = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
EM_CUDA = 190

SQUARE_SIGNATURE = {"x_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}


def add_spec(source, block=128, **kwargs):
    return KernelSpec(source, "scaled_add", SCALED_ADD_SIGNATURE, {"BLOCK": block},
                      aligned=("x_ptr", "y_ptr", "out_ptr"), op="scaled_add", **kwargs)


def square_spec(source, **kwargs):
    return KernelSpec(source, "square", SQUARE_SIGNATURE, {"BLOCK": 256}, num_warps=2, op="square", **kwargs)


@pytest.fixture
def fresh_triton_cache(tmp_path, monkeypatch):
    """Every compile in the test misses triton's on-disk cache, so its timings are real compilations."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


class CompileCalls:
    def __init__(self):
        self.calls = []

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit):
        self.calls.append((metadata["name"], metadata["target"].arch, cache_hit))


@pytest.fixture
def compile_calls():
    calls = CompileCalls()
    previous, knobs.compilation.listener = knobs.compilation.listener, calls
    yield calls
    knobs.compilation.listener = previous


@pytest.fixture(scope="module")
def every_arch(kernel_source, tmp_path_factory):
    cache = tmp_path_factory.mktemp("triton-cache")
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    try:
        return compile_all([add_spec(kernel_source)], ARCHS)
    finally:
        if saved is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


def elf_header(cubin: bytes) -> dict:
    assert cubin[:4] == b"\x7fELF"
    assert cubin[4] == 2 and cubin[5] == 1, "64-bit little-endian"
    (machine,) = struct.unpack_from("<H", cubin, 18)
    (flags,) = struct.unpack_from("<I", cubin, 48)
    return {"abi_version": cubin[8], "machine": machine, "flags": flags}


def sm_from_flags(header: dict) -> tuple[int, bool]:
    flags = header["flags"]
    if header["abi_version"] == 7:
        return flags & 0xFF, bool(flags & 0x800)
    return (flags >> 8) & 0xFF, bool(flags & 0x8)


@pytest.mark.parametrize("arch", ARCHS)
def test_cubin_is_a_cuda_elf_for_its_arch(every_arch, arch):
    (entry,) = every_arch.kernels.values()
    artifact = entry.artifacts[arch]
    header = elf_header(artifact.cubin)
    assert header["machine"] == EM_CUDA
    assert header["abi_version"] in (7, 8)  # 8 from the ptxas of triton 3.9, same flags layout
    sm, arch_specific = sm_from_flags(header)
    assert f"sm_{sm}" == arch
    if header["abi_version"] == 7:  # ABI 8 (CUDA 13's ptxas) does not keep the virtual SM there
        assert (header["flags"] >> 16) & 0xFF == sm, "the virtual SM (PTX target) is the same arch"
    # Triton <= 3.8 targets sm_90a on Hopper (wgmma, TMA), 3.9 plain sm_90; never arch-specific elsewhere.
    assert not arch_specific or arch == "sm_90"
    assert artifact.metadata["name"] == "scaled_add"
    assert artifact.metadata["target"] == {"backend": "cuda", "arch": parse_arch(arch), "warp_size": 32}
    assert artifact.metadata["num_warps"] == 4 and artifact.metadata["shared"] >= 0
    assert artifact.ptx is None
    print(f"{arch}: {artifact.seconds * 1000:.0f} ms, cubin {len(artifact.cubin)} bytes")


def test_cuobjdump_agrees(every_arch):
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    if not cuobjdump.is_file():
        pytest.skip("this triton wheel ships no cuobjdump")
    (entry,) = every_arch.kernels.values()
    for arch, artifact in entry.artifacts.items():
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmc-test-{os.getpid()}-{arch}.cubin"
        path.write_bytes(artifact.cubin)
        try:
            listing = subprocess.run([str(cuobjdump), "-elf", str(path)], capture_output=True, text=True,
                                     check=True).stdout
        finally:
            path.unlink()
        (reported,) = set(re.findall(r"\bsm=(\d+a?)\b", listing))
        assert f"sm_{reported}" == (arch + "a" if arch == "sm_90" else arch)


def test_cubins_differ_per_arch(every_arch):
    (entry,) = every_arch.kernels.values()
    assert len({artifact.cubin for artifact in entry.artifacts.values()}) == len(ARCHS)


def test_duplicates_compile_once(kernel_source, fresh_triton_cache):
    specs = [add_spec(kernel_source), square_spec(kernel_source), add_spec(kernel_source),
             add_spec(kernel_source, launches=3), square_spec(kernel_source, launches=2)]
    start = time.perf_counter()
    result = compile_all(specs, ["sm_80", "sm_89"], workers=2)
    elapsed = time.perf_counter() - start

    assert len(result.kernels) == 2
    assert result.kernels_compiled == 4
    # Workers are separate processes: count what they compiled by the cubins they left in the fresh cache.
    cubins = sorted(p.name.split(".")[0] for p in Path(os.environ["TRITON_CACHE_DIR"]).rglob("*.cubin"))
    assert cubins == ["scaled_add", "scaled_add", "square", "square"]
    built = sorted((entry.spec.name, arch) for entry in result.kernels.values() for arch in entry.artifacts)
    assert built == [("scaled_add", "sm_80"), ("scaled_add", "sm_89"), ("square", "sm_80"), ("square", "sm_89")]
    launches = {entry.spec.name: entry.launches for entry in result.kernels.values()}
    assert launches == {"scaled_add": 5, "square": 3}
    assert result.launches_served == 8
    report = result.report()
    assert report["distinct_kernels"] == 2 and report["kernels_compiled"] == 4 and report["launches_served"] == 8
    assert 0 < result.seconds <= elapsed
    assert result.compile_seconds == pytest.approx(
        sum(a.seconds for entry in result.kernels.values() for a in entry.artifacts.values()))
    per_kernel = result.compile_seconds / result.kernels_compiled
    print(f"4 kernels in {result.seconds:.2f} s wall, {per_kernel * 1000:.0f} ms per kernel")


def test_key_follows_what_changes_the_cubin(kernel_source, tmp_path):
    copy = tmp_path / "elsewhere.py"
    copy.write_text(TEST_KERNEL_SOURCE)
    key = add_spec(kernel_source).key()
    assert add_spec(copy).key() == key, "the content, not the path, names a kernel"
    assert add_spec(kernel_source, launches=7).key() == key
    assert KernelSpec(kernel_source, "scaled_add", SCALED_ADD_SIGNATURE, {"BLOCK": 128},
                      aligned=("x_ptr", "y_ptr", "out_ptr"), op="another_op").key() == key
    changed = [add_spec(kernel_source, block=256), add_spec(kernel_source, num_warps=8),
               add_spec(kernel_source, num_stages=2),
               KernelSpec(kernel_source, "scaled_add", SCALED_ADD_SIGNATURE, {"BLOCK": 128})]
    reordered = dict(reversed(list(SCALED_ADD_SIGNATURE.items())))
    changed.append(KernelSpec(kernel_source, "scaled_add", reordered, {"BLOCK": 128}))
    copy.write_text(TEST_KERNEL_SOURCE.replace("x * alpha + y", "x * alpha - y"))
    changed.append(add_spec(copy))
    keys = {spec.key() for spec in changed}
    assert key not in keys and len(keys) == len(changed)


def test_write_kernels_layout(kernel_source, fresh_triton_cache, tmp_path):
    result = compile_all([add_spec(kernel_source, launches=2), square_spec(kernel_source)], ["sm_80", "sm_90"],
                         keep_ptx=True)
    directory = write_kernels(result, tmp_path / "kernels")
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    assert files == sorted(kernel_files(result))

    index = json.loads((directory / "index.json").read_text())
    assert (index["format"], index["version"], index["triton_version"]) == ("llmc-kernels", 1, triton.__version__)
    assert index["archs"] == ["sm_80", "sm_90"]
    assert sorted(index["kernels"]) == sorted(result.kernels)
    for key, entry in index["kernels"].items():
        spec = result.kernels[key].spec
        assert entry["name"] == spec.name and entry["signature"] == [list(p) for p in spec.signature.items()]
        assert entry["constexprs"] == spec.constexprs and entry["aligned"] == list(spec.aligned)
        assert (entry["num_warps"], entry["num_stages"]) == (spec.num_warps, spec.num_stages)
        assert entry["ops"] == [spec.op]
        assert (directory / entry["source"]).read_text() == TEST_KERNEL_SOURCE
        for arch in ("sm_80", "sm_90"):
            files = entry["archs"][arch]
            cubin = (directory / files["cubin"]).read_bytes()
            assert cubin == result.kernels[key].artifacts[arch].cubin
            assert files["cubin"] == f"{arch}/{key}.cubin" and files["metadata"] == f"{arch}/{key}.json"
            metadata = json.loads((directory / files["metadata"]).read_text())
            assert metadata["name"] == spec.name and metadata["num_warps"] == spec.num_warps
            assert metadata["shared"] == files["shared"]
            assert f".target sm_{parse_arch(arch)}" in (directory / f"{arch}/{key}.ptx").read_text()
    assert {e["name"]: e["launches"] for e in index["kernels"].values()} == {"scaled_add": 2, "square": 1}


def test_spec_errors_say_what_to_fix(kernel_source, tmp_path):
    with pytest.raises(KernelSpecError, match="must name the same parameters"):
        KernelSpec(kernel_source, "square", SQUARE_SIGNATURE, {})
    with pytest.raises(KernelSpecError, match="not runtime parameters"):
        KernelSpec(kernel_source, "square", SQUARE_SIGNATURE, {"BLOCK": 64}, aligned=("BLOCK",))
    with pytest.raises(KernelSpecError, match="give a bool, int, float or str"):
        KernelSpec(kernel_source, "square", SQUARE_SIGNATURE, {"BLOCK": [64]})
    with pytest.raises(KernelSpecError, match="power of two"):
        KernelSpec(kernel_source, "square", SQUARE_SIGNATURE, {"BLOCK": 64}, num_warps=3)
    with pytest.raises(KernelSpecError, match="unknown GPU arch 'ampere'"):
        compile_all([square_spec(kernel_source)], ["ampere"])
    reordered = dict(reversed(list(SQUARE_SIGNATURE.items())))
    with pytest.raises(KernelSpecError, match="list every parameter in order"):
        compile_kernel(KernelSpec(kernel_source, "square", reordered, {"BLOCK": 64}), "sm_80")
    with pytest.raises(KernelSpecError, match="no @triton.jit function named 'cube'"):
        compile_kernel(KernelSpec(kernel_source, "cube", SQUARE_SIGNATURE, {"BLOCK": 64}), "sm_80")
    with pytest.raises(KernelSpecError, match="cannot read its source"):
        compile_kernel(square_spec(tmp_path / "missing.py"), "sm_80")


def test_compile_failure_names_kernel_and_arch(tmp_path, fresh_triton_cache):
    source = tmp_path / "broken.py"
    # Not a power of two: tl.arange refuses it while Triton lowers the kernel, not at import.
    source.write_text(TEST_KERNEL_SOURCE)
    with pytest.raises(KernelCompileError, match=r"kernel square \(.*broken.py\) failed to compile for sm_80"):
        compile_kernel(KernelSpec(source, "square", SQUARE_SIGNATURE, {"BLOCK": 100}), "sm_80")
