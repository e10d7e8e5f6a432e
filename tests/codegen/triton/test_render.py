import os
import subprocess
import sys

import pytest

from llmc.codegen.triton import render as render_module
from llmc.codegen.triton.render import cache_dir, load, render

GEMM_SPEC = dict(dtype="bfloat16", n=4096, k=4096, norm="rms", epilogue="swiglu", has_bias=False, block_m=128,
                 block_n=64, block_k=64, num_warps=8, num_stages=3)
ROW_SPEC = dict(dtype="float16", weight_dtype="float32", out_dtype="float32", n=1000, block_n=1024, num_warps=4)


def test_source_is_deterministic_and_named_by_its_hash():
    source, name = render("norm_linear", **GEMM_SPEC)
    again, same_name = render("norm_linear", **dict(reversed(GEMM_SPEC.items())))
    assert source == again and name == same_name
    assert name.startswith("llmc_norm_linear_") and f"def {name}(" in source
    other_source, other_name = render("norm_linear", **(GEMM_SPEC | {"block_k": 32}))
    assert other_name != name and other_source != source


def test_spec_is_baked_into_the_source():
    source, _ = render("norm_linear", **GEMM_SPEC)
    assert "tl.arange(0, 128)" in source and "range(0, 4096, 64)" in source
    assert "accumulator_up" in source and "tl.bfloat16" in source
    assert '"num_warps": 8, "num_stages": 3' in source
    plain, _ = render("norm_linear", **(GEMM_SPEC | {"epilogue": "none", "norm": "none"}))
    assert "accumulator_up" not in plain and "square_sum" not in plain


def test_add_templates_extend_their_base():
    fused, _ = render("add_rms_norm", **ROW_SPEC)
    plain, _ = render("rms_norm", **ROW_SPEC)
    assert "residual_ptr" in fused and "residual_ptr" not in plain
    fused_gemm, _ = render("add_norm_linear", **GEMM_SPEC)
    assert "sum_ptr" in fused_gemm and "pid_n == 0" in fused_gemm


def test_rope_write_kv_is_the_rope_kernel_plus_the_cache_stores():
    spec = dict(dtype="bfloat16", out_dtype="bfloat16", heads=8, head_dim=128, has_norm=True, block_h=4, num_warps=4)
    rope, _ = render("rope", **spec)
    fused, name = render("rope_write_kv", **spec)
    assert "k_cache_ptr" in fused and "slots_ptr" in fused and "k_cache_ptr" not in rope
    # rope's body unchanged: the fused kernel only adds parameters and, after rope's last store, the cache stores.
    marker = "    token = tl.program_id(0)"
    assert fused[fused.index(marker):].startswith(rope[rope.index(marker):])
    compile(fused, f"{name}.py", "exec")


def test_source_compiles_as_python():
    for op, spec in [("rms_norm", ROW_SPEC), ("norm_linear", GEMM_SPEC),
                     ("rope", dict(dtype="bfloat16", out_dtype="float32", heads=32, head_dim=128, has_norm=True,
                                   block_h=4, num_warps=4))]:
        source, name = render(op, **spec)
        compile(source, f"{name}.py", "exec")


@pytest.mark.parametrize("spec,message", [
    (GEMM_SPEC | {"dtype": "float64"}, "dtype='float64'"),
    ({key: value for key, value in GEMM_SPEC.items() if key != "block_k"}, "lacks block_k"),
    (GEMM_SPEC | {"n": 4096.0}, "must be a str, int or bool"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        render("norm_linear", **spec)


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="no Triton template for op 'gelu'"):
        render("gelu")


def test_load_writes_the_cache_file_once_and_memoises(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path))
    spec = ROW_SPEC | {"n": 96, "block_n": 128}
    kernel = load("rms_norm", **spec)
    source, name = render("rms_norm", **spec)
    path = tmp_path / "kernels" / f"{name}.py"
    assert cache_dir() == tmp_path / "kernels" and path.read_text() == source
    assert load("rms_norm", **spec) is kernel
    assert render_module._load.cache_info().hits >= 1


CROSS_COMPILE = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
path, name = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(name, path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kernel = getattr(module, name)
types = {"eps": "fp32", "M": "i32", "x_row_stride": "i32", "residual_row_stride": "i32"}
signature = {arg: types.get(arg, "*bf16") for arg in kernel.arg_names}
compiled = triton.compile(triton.compiler.ASTSource(kernel, signature=signature, constexprs={}),
                          target=GPUTarget("cuda", 90, 32), options=module.LAUNCH_OPTIONS)
assert compiled.asm["cubin"]
print("shared", compiled.metadata.shared)
"""


def test_rendered_gemm_cross_compiles_for_a_gpu_arch(tmp_path):
    # The interpreter accepts what a GPU compiler may not (tile shapes, dot layouts): build a real sm_90 cubin.
    # In a fresh process: this one's triton.language may be the interpreter's.
    source, name = render("add_norm_linear", **(GEMM_SPEC | {"block_m": 16, "block_n": 32, "block_k": 128}))
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    result = subprocess.run([sys.executable, "-c", CROSS_COMPILE, str(path), name], capture_output=True, text=True,
                            env=os.environ | {"TRITON_INTERPRET": "0"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0


ATTENTION_SPEC = dict(dtype="bfloat16", heads=8, kv_heads=2, head_dim=80, paged=True, windowed=False,
                      cache_block_size=16, block_m=64, block_n=32, num_warps=4, num_stages=2)


def test_attention_specs_are_baked_into_the_sources():
    source, name = render("attention_prefill", **ATTENTION_SPEC)
    compile(source, f"{name}.py", "exec")
    assert "tl.arange(0, 64)" in source and "tl.arange(0, 128)" in source and "dims < 80" in source
    assert "block_table_ptr" in source and "// 16" in source and "< window" not in source
    plain, _ = render("attention_prefill", **(ATTENTION_SPEC | {"paged": False, "windowed": True}))
    assert "block_table_ptr" not in plain and "< window" in plain
    decode, name = render("attention_decode", **{key: value for key, value in ATTENTION_SPEC.items()
                                                 if key not in ("paged", "block_m")}, block_h=16)
    compile(decode, f"{name}.py", "exec")
    assert "tl.dot(q, tl.trans(k))" in decode and "tl.num_programs(2)" in decode
    unique_heads, _ = render("attention_decode", **{key: value for key, value in ATTENTION_SPEC.items()
                                                    if key not in ("paged", "block_m")} | {"kv_heads": 8}, block_h=1)
    assert "tl.dot" not in unique_heads, "one query head per kv head: a row reduction, no padded 16-row dot"
    combine, name = render("attention_combine", dtype="float16", head_dim=80, block_s=16, num_warps=1)
    compile(combine, f"{name}.py", "exec")
