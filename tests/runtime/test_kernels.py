"""Loading shipped kernels: index parsing, cubin arch, the cubin / JIT / refuse decision, launch argument
assembly, the compilation counter; and on a CUDA host (@pytest.mark.gpu) real launches from cubins with no
Triton compilation, and the JIT fallback."""
import json
import os
import struct
import subprocess
import sys
import warnings

import pytest
import torch

from llmc.codegen.triton.aot import KernelSpec, compile_all, compile_kernel, write_kernels
from llmc.runtime.bundle import HostInfo
from llmc.runtime.kernels import (CompilationCounter, KernelError, KernelFallbackWarning, KernelLibrary,
                                  LoadedKernel, cubin_arch, plan_loading, read_index)
from tests.conftest import SCALED_ADD_SIGNATURE, TEST_KERNEL_SOURCE

BUILT_ARCHS = ["sm_80", "sm_90"]
A100 = HostInfo("cuda", (8, 0), "NVIDIA A100")
A10 = HostInfo("cuda", (8, 6), "NVIDIA A10")
H100 = HostInfo("cuda", (9, 0), "NVIDIA H100")
CPU = HostInfo("cpu", None, "cpu")
TRITON = "3.6.0"


def spec_for(source, block=128):
    return KernelSpec(source, "scaled_add", SCALED_ADD_SIGNATURE, {"BLOCK": block},
                      aligned=("x_ptr", "y_ptr", "out_ptr"), op="scaled_add", launches=2)


@pytest.fixture(scope="module")
def kernels_dir(kernel_source, tmp_path_factory):
    """kernels/ for sm_80 and sm_90, as a bundle ships it."""
    result = compile_all([spec_for(kernel_source)], BUILT_ARCHS)
    return write_kernels(result, tmp_path_factory.mktemp("bundle") / "kernels")


def rewrite_index(directory, edit):
    index = json.loads((directory / "index.json").read_text())
    edit(index)
    (directory / "index.json").write_text(json.dumps(index))


@pytest.fixture
def kernels_copy(kernels_dir, tmp_path):
    copy = tmp_path / "kernels"
    for path in kernels_dir.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(kernels_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return copy


def test_index_round_trip(kernels_dir):
    index = read_index(kernels_dir)
    assert index.archs == tuple(BUILT_ARCHS)
    (record,) = index.kernels.values()
    assert record.name == "scaled_add" and record.ops == ("scaled_add",) and record.launches == 2
    assert record.signature == SCALED_ADD_SIGNATURE and record.constexprs == {"BLOCK": 128}
    assert record.aligned == ("x_ptr", "y_ptr", "out_ptr") and record.num_warps == 4
    assert record.runtime_params == ["x_ptr", "y_ptr", "out_ptr", "n", "alpha"]
    assert sorted(record.cubins) == BUILT_ARCHS
    for arch, (cubin, metadata) in record.cubins.items():
        assert cubin_arch((kernels_dir / cubin).read_bytes()) in (arch, arch + "a")
        assert json.loads((kernels_dir / metadata).read_text())["name"] == "scaled_add"
    assert (kernels_dir / record.source).read_text() == TEST_KERNEL_SOURCE


def test_cubin_arch_reads_both_elf_abis(kernels_dir):
    (record,) = read_index(kernels_dir).kernels.values()
    assert cubin_arch((kernels_dir / record.cubins["sm_80"][0]).read_bytes()) == "sm_80"
    assert cubin_arch((kernels_dir / record.cubins["sm_90"][0]).read_bytes()) in ("sm_90a", "sm_90")  # triton 3.9

    def header(abi_version, flags, machine=190):
        data = bytearray(64)
        data[:6] = b"\x7fELF\x02\x01"
        data[7], data[8] = 51, abi_version
        struct.pack_into("<H", data, 18, machine)
        struct.pack_into("<I", data, 48, flags)
        return bytes(data)

    # Values ptxas 12.8 writes (see tests/codegen/triton/test_aot.py): the Blackwell ABI moves the SM to bits 8-15.
    assert cubin_arch(header(7, 0x590559)) == "sm_89"
    assert cubin_arch(header(8, 0x900640A)) == "sm_100a"
    assert cubin_arch(header(8, 0x6007802)) == "sm_120"
    with pytest.raises(KernelError, match="not EM_CUDA"):
        cubin_arch(header(7, 0x500550, machine=62))
    with pytest.raises(KernelError, match="not a cubin"):
        cubin_arch(b"\x80\x04" + os.urandom(62))


def test_plan_uses_cubins_on_a_built_arch(kernels_dir):
    index = read_index(kernels_dir)
    for host in (A100, H100):
        plan = plan_loading(index, host, index.triton_version)
        assert plan.use_cubins and plan.reason is None and plan.arch in BUILT_ARCHS


def test_plan_falls_back_to_jit_on_another_arch(kernels_dir):
    index = read_index(kernels_dir)
    plan = plan_loading(index, A10, index.triton_version)
    assert not plan.use_cubins and plan.arch == "sm_86"
    assert plan.reason == ("the bundle has cubins for sm_80, sm_90, not for this host's sm_86 (NVIDIA A10); "
                           "compiling the shipped Triton source instead (rebuild with llmc compile --target a10 "
                           "to skip this)")


def test_plan_falls_back_to_jit_under_another_triton(kernels_dir):
    index = read_index(kernels_dir)
    plan = plan_loading(index, A100, "3.5.1")
    assert not plan.use_cubins
    assert plan.reason.startswith(f"the cubins were built with triton {index.triton_version}, this host has "
                                  "triton 3.5.1")


def test_plan_refusals_say_how_to_rebuild(kernels_dir, kernels_copy):
    index = read_index(kernels_dir)
    with pytest.raises(KernelError, match=r"need a CUDA GPU and this host has none \(cpu\); .*--target cpu"):
        plan_loading(index, CPU, TRITON)
    with pytest.raises(KernelError, match=r"triton, which is not installed here: pip install 'llmc\[gpu\]'"):
        plan_loading(index, A100, None)
    with pytest.raises(KernelError, match="not for this host's sm_86 .*JIT compilation is off: rebuild with llmc "
                                          "compile --target a10"):
        plan_loading(index, A10, index.triton_version, allow_jit=False)
    rewrite_index(kernels_copy, lambda ix: [e.pop("source") for e in ix["kernels"].values()])
    with pytest.raises(KernelError, match=r"not for this host's sm_75 \(Tesla T4\), and kernel scaled_add ships no "
                                          "source to compile: rebuild with llmc compile --target t4"):
        plan_loading(read_index(kernels_copy), HostInfo("cuda", (7, 5), "Tesla T4"), TRITON)


def test_library_refuses_a_cpu_host(kernels_dir):
    with pytest.raises(KernelError, match="need a CUDA GPU"):
        KernelLibrary(kernels_dir, host=CPU)


@pytest.mark.parametrize("edit, message", [
    (lambda ix: ix.update(version=2), "kernel index v2, this llmc reads v1"),
    (lambda ix: ix.update(format="other"), "not an llmc kernel index"),
    (lambda ix: ix.pop("triton_version"), "malformed entry"),
    (lambda ix: [e.update(constexprs={}) for e in ix["kernels"].values()], "malformed entry"),
    (lambda ix: [e.update(source="../../evil.py") for e in ix["kernels"].values()], "not a file inside kernels/"),
    (lambda ix: [e["archs"]["sm_80"].update(cubin="/etc/passwd") for e in ix["kernels"].values()],
     "not a file inside kernels/"),
])
def test_malformed_index_is_refused(kernels_copy, edit, message):
    rewrite_index(kernels_copy, edit)
    with pytest.raises(KernelError, match=message):
        read_index(kernels_copy)


def test_missing_or_broken_index(tmp_path):
    with pytest.raises(KernelError, match="index.json is missing; rebuild the bundle"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(KernelError, match="not valid JSON"):
        read_index(tmp_path)


class RecordingLaunch:
    """Stands in for triton's CompiledKernel: `compiled[grid](*args)`, remembering what it was given."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


def test_launch_fills_constexprs_and_checks_alignment(kernels_dir):
    (record,) = read_index(kernels_dir).kernels.values()
    compiled = RecordingLaunch()
    kernel = LoadedKernel(record, compiled, from_cubin=True)
    x, y, out = torch.randn(3, 300).unbind(0)
    alpha = torch.randn(()).item()
    kernel((3,), x, y, out, 300, alpha)
    assert compiled.launches == [((3, 1, 1), (x, y, out, 300, alpha, 128))]

    with pytest.raises(TypeError, match=r"takes 5 arguments \(x_ptr, y_ptr, out_ptr, n, alpha\), got 4"):
        kernel((3,), x, y, out, 300)
    misaligned = torch.randn(301)[1:]
    with pytest.raises(ValueError, match="assuming y_ptr is a multiple of 16"):
        kernel((3,), x, misaligned, out, 300, alpha)
    assert len(compiled.launches) == 1


def test_cubin_loads_into_triton_without_compiling(kernels_dir):
    """Everything short of the driver: the shipped cubin and metadata become triton's CompiledKernel, and the
    launcher triton would build from our source shim takes the runtime arguments in signature order."""
    with CompilationCounter() as counter:
        library = KernelLibrary(kernels_dir, host=A100)
        (kernel,) = library.load_all().values()
    assert (counter.compiled, counter.cache_hits) == (0, 0)
    assert library.plan.use_cubins and kernel.from_cubin
    compiled = kernel.compiled
    (cubin, _) = kernel.record.cubins["sm_80"]
    assert compiled.kernel == (kernels_dir / cubin).read_bytes()
    assert compiled.name == "scaled_add" and compiled.metadata.target.arch == 80
    assert compiled.packed_metadata == (4, 1, compiled.metadata.shared)
    from triton.backends.nvidia import driver

    if hasattr(driver, "make_launcher"):  # triton <= 3.6 generates the launcher's C source
        launcher = driver.make_launcher(compiled.src.constants, compiled.src.signature,
                                        compiled.metadata.tensordesc_meta)
        assert ("CUdeviceptr arg0, CUdeviceptr arg1, CUdeviceptr arg2, int32_t arg3, uint32_t arg4)" in launcher)
    else:  # 3.7+: one compiled launcher (built on a CUDA host) flattens the signature in this order
        assert compiled.src.signature == {**kernel.record.signature, "BLOCK": "constexpr"}


COUNTER_SCRIPT = """
import json, sys
from pathlib import Path
from triton import knobs
from llmc.codegen.triton.aot import KernelSpec, compile_kernel
from llmc.runtime.kernels import CompilationCounter

source, signature = Path(sys.argv[1]), json.loads(sys.argv[2])

def spec(block):
    return KernelSpec(source, "scaled_add", signature, {"BLOCK": block}, aligned=("x_ptr", "y_ptr", "out_ptr"))

outer = []
knobs.compilation.listener = lambda **event: outer.append(event["cache_hit"])
with CompilationCounter() as counter:
    compile_kernel(spec(64), "sm_86")
    compile_kernel(spec(64), "sm_86")  # triton's disk cache answers
    inside = [counter.compiled, counter.cache_hits, counter.names, list(outer)]
compile_kernel(spec(32), "sm_86")
print(json.dumps({"inside": inside, "after": counter.compiled, "outer": outer}))
"""


def test_counter_counts_compilations_and_chains(kernel_source, tmp_path):
    # A fresh process: triton fixes per process whether @triton.jit interprets or compiles, and the kernel tests
    # run the interpreter in this one.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", COUNTER_SCRIPT, str(kernel_source),
                           json.dumps(SCALED_ADD_SIGNATURE)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["inside"] == [1, 1, ["scaled_add", "scaled_add"], [False, True]]
    assert result["after"] == 1 and result["outer"] == [False, True, False]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def host_arch():
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def run_scaled_add(library):
    (kernel,) = library.load_all().values()
    n = 1000
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = torch.full((n,), float("nan"), device="cuda")
    alpha = torch.randn(()).item()
    kernel(((n + 127) // 128,), x, y, out, n, alpha)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x * alpha + y, rtol=1.3e-6, atol=1e-5)
    return kernel


@pytest.mark.gpu
@gpu
def test_gpu_launches_from_the_cubin_without_compiling(kernel_source, tmp_path, monkeypatch):
    # A fresh triton cache on the "inference host": a compilation would be a miss, and show in the counter.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "build-cache"))
    directory = write_kernels(compile_all([spec_for(kernel_source)], [host_arch()]), tmp_path / "k")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "host-cache"))
    with CompilationCounter() as counter, warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        library = KernelLibrary(directory)
        kernel = run_scaled_add(library)
    assert kernel.from_cubin and library.plan.use_cubins
    assert (counter.compiled, counter.cache_hits) == (0, 0)


@pytest.mark.gpu
@gpu
def test_gpu_jit_fallback_when_the_arch_has_no_cubin(kernel_source, tmp_path):
    other = "sm_80" if host_arch() != "sm_80" else "sm_90"
    directory = write_kernels(compile_all([spec_for(kernel_source)], [other]), tmp_path / "k")
    with CompilationCounter() as counter, pytest.warns(KernelFallbackWarning, match="not for this host's"):
        library = KernelLibrary(directory)
        kernel = run_scaled_add(library)
    assert not kernel.from_cubin
    assert counter.compiled + counter.cache_hits == 1
