"""Planning a graph's Triton kernels on meta tensors for a target arch (codegen/triton/plan.py), the recording
hook it runs the launchers under, and the shipped-kernel lookup that finds the planned cubin at run time
(codegen/triton/record.py)."""
import pytest
import torch

from llmc.codegen import (
    ops,  # noqa: F401  (registers the llmc ops the test graphs call)
    quant,
)
from llmc.codegen.triton import configs, hooks, launch, plan, render
from llmc.codegen.triton.record import LibraryKernel, ShippedKernels, argument_type
from llmc.common.targets import get_target
from llmc.compiler import pipeline
from llmc.compiler.trace import trace
from llmc.models import ModelConfig, Transformer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 96


def traced(family: str, layers: int, dtype=torch.bfloat16) -> dict:
    """Our model on the meta device, traced and run through the full default pipeline: {name: GraphModule}."""
    config = ModelConfig(family=family, vocab_size=97, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=layers,
                         num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=128,
                         qk_norm=family == "qwen3", dtype="float32")
    with torch.device("meta"):
        model = Transformer(config).to(dtype).eval()
    ctx = pipeline.PassContext(target=get_target("a100"), dtype=str(dtype).removeprefix("torch."))
    graphs = {}
    for t in trace(model, 16):
        pipeline.run_pipeline(t.gm, ctx, pipeline.resolve_passes(None), graph_name=t.name)
        graphs[t.name] = t.gm
    return graphs


@pytest.fixture(scope="module")
def qwen3_graphs():
    return {layers: traced("qwen3", layers) for layers in (2, 3)}


def llmc_calls(gm) -> list:
    return [node for node in gm.graph.nodes if plan.llmc_op(node) in launch.LAUNCHERS]


def by_name(specs) -> dict:
    return {(spec.name, tuple(spec.signature.items())): spec for spec in specs}


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_layers_share_their_kernels(qwen3_graphs, graph):
    two = by_name(plan.kernel_specs(qwen3_graphs[2][graph], "sm_80"))
    three = by_name(plan.kernel_specs(qwen3_graphs[3][graph], "sm_80"))
    assert two.keys() == three.keys(), "more layers add launches, never kernels"
    assert len({spec.name for spec in three.values()}) == len(three)
    per_layer = 0
    for identity, spec in three.items():
        # launches = a * layers + b: a kernel each layer launches a times; b = -1 where the first layer uses
        # another kernel (its q/k/v GEMM has no residual to add), +1 for the LM head's.
        a = spec.launches - two[identity].launches
        b = spec.launches - 3 * a
        assert a >= 0 and b in (-1, 0, 1) and spec.launches >= 1, (identity, a, b)
        per_layer += a > 0
    assert per_layer >= 2
    kernels_planned = {spec.op for spec in three.values()}
    ops_called = {plan.llmc_op(node) for node in llmc_calls(qwen3_graphs[3][graph])}
    assert kernels_planned <= {kernel for op in ops_called for kernel in launch.KERNELS[op]}
    assert all(kernels_planned & set(launch.KERNELS[op]) for op in ops_called)


def test_each_call_is_one_launch_per_shape_class(qwen3_graphs, monkeypatch):
    gm = qwen3_graphs[3]["decode"]
    calls = llmc_calls(gm)
    assert len(calls) >= 3 * 3
    paged = sum(plan.llmc_op(node) == "paged_attention" for node in calls)
    monkeypatch.setattr(configs, "attention_plan_sizes", lambda: {})  # one size at a time for attention too
    for shape_class, size in plan.CLASS_DIM_SIZE.items():
        monkeypatch.setattr(plan, "CLASS_DIM_SIZE", {shape_class: size})
        # A paged attention call at S = 1 launches the split-K kernel and its combine, every other call one kernel.
        launches = len(calls) + (paged if size == 1 else 0)
        assert sum(spec.launches for spec in plan.kernel_specs(gm, "sm_80")) == launches


@pytest.mark.parametrize("shape_class,tokens", [("decode", 1), ("prefill", 300)])
def test_a_gemm_gets_its_classes_block_configuration(qwen3_graphs, shape_class, tokens):
    gm = qwen3_graphs[2]["prefill"]
    gemm = next(node for node in llmc_calls(gm) if plan.llmc_op(node) == "norm_linear")
    x, weight, bias, eps, norm, epilogue = gemm.args
    n = weight.meta["val"].shape[0] // (2 if epilogue == "swiglu" else 1)
    k = weight.meta["val"].shape[1]
    config = configs.fit_shared_memory(configs.pick("norm_linear", "sm_80", tokens, n, k, epilogue), "sm_80", 2,
                                       2 if epilogue == "swiglu" else 1)
    _, expected = render.render("norm_linear", dtype="bfloat16", n=n, k=k, norm=norm, epilogue=epilogue,
                                has_bias=bias is not None, block_m=config.block_m, block_n=config.block_n,
                                block_k=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    specs = {spec.name: spec for spec in plan.kernel_specs(gm, "sm_80")}
    assert expected in specs
    spec = specs[expected]
    assert (spec.num_warps, spec.num_stages) == (config.num_warps, config.num_stages)
    assert spec.signature["x_ptr"] == "*bf16" and spec.signature["M"] == "i32" and spec.signature["eps"] == "fp32"
    assert spec.source.read_text() == render.render("norm_linear", **dict(
        dtype="bfloat16", n=n, k=k, norm=norm, epilogue=epilogue, has_bias=bias is not None,
        block_m=config.block_m, block_n=config.block_n, block_k=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages))[0]


class EveryOp(torch.nn.Module):
    """One call of each llmc op, with a bias and swiglu, as the fusion passes leave them; attention over the
    rope's heads (k and v views of them) and one layer's slice of a paged cache."""

    def __init__(self, dtype):
        super().__init__()

        def weight(*shape):
            return torch.nn.Parameter(torch.randn(*shape).to(dtype))

        self.norm, self.head_norm = weight(HIDDEN), weight(HEAD_DIM)
        self.gate_up, self.bias, self.down = weight(2 * FFN, HIDDEN), weight(2 * FFN), weight(HIDDEN, FFN)
        angles = torch.rand(128, HEAD_DIM) * 6.28  # the tables stay float32, as the rope op requires
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        # quant_linear: a weight-only scheme (one GEMM) and an a8 one (row quantizer, then the GEMM)
        for scheme in ("int4_w4a16", "int8_w8a8"):
            quantized = quant.quantize_weight(torch.randn(HIDDEN, HIDDEN), scheme, 32)
            self.register_buffer(f"{scheme}_q", quantized.qweight)
            self.register_buffer(f"{scheme}_scale", quantized.scale)
            if quantized.zero is not None:
                self.register_buffer(f"{scheme}_zero", quantized.zero)

    def forward(self, x, positions, k_cache, v_cache, block_table, past_lens):
        llmc = torch.ops.llmc
        h = llmc.rms_norm(x, self.norm, 1e-6)
        total, h = llmc.add_rms_norm(h, x, self.norm, 1e-6)
        up = llmc.norm_linear(h, self.gate_up, self.bias, 1e-6, "rms", "swiglu")
        total, out = llmc.add_norm_linear(up, up, self.down, None, 1e-6, "none", "none")
        out = llmc.quant_linear(out, self.int4_w4a16_q, self.int4_w4a16_scale, self.int4_w4a16_zero, None, None,
                                1e-6, "rms", "none", "int4_w4a16", 32)
        out = llmc.quant_linear(out, self.int8_w8a8_q, self.int8_w8a8_scale, None, None, None, 1e-6, "none", "none",
                                "int8_w8a8", 32)
        heads = out.view(out.shape[0], out.shape[1], HEADS, HEAD_DIM)
        q = llmc.rope(heads, positions, self.cos, self.sin, self.head_norm, 1e-6)
        k, v = q[:, :, :KV_HEADS], q[:, :, KV_HEADS:]
        causal = llmc.causal_attention(q, k, v, 0.25, 0)
        paged = llmc.paged_attention(q, k, v, k_cache[1], v_cache[1], block_table, past_lens, 0.25, 3)
        sparse = llmc.sparse_paged_attention(q, k, v, k_cache[1], v_cache[1], block_table, past_lens, 0.25, 3, 0.2, 8)
        return causal + paged + sparse, total


@pytest.fixture(scope="module")
def every_op_graph():
    model = EveryOp(torch.float16)
    x = torch.randn(2, 5, HIDDEN).half()
    positions = torch.randint(0, 128, (2, 5))
    cache = torch.randn(2, 7, 4, KV_HEADS, HEAD_DIM).half()
    block_table, past_lens = torch.randint(0, 7, (2, 3)), torch.tensor([4, 0])
    batch, seq, blocks = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("blocks")
    table_width = torch.export.Dim("table_width")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {1: blocks}, {1: blocks}, {0: batch, 1: table_width},
              {0: batch})
    inputs = (x, positions, cache, cache.clone(), block_table, past_lens)
    gm = torch.export.export(model, inputs, dynamic_shapes=shapes).run_decompositions({}).module()
    # rope_write_kv mutates the caches, which export would functionalize: like the fuse_kv_write pass, insert it
    # into the exported graph, on the paged attention's k and v (positions stand in for the [B, S] int64 slots).
    nodes = {n.name: n for n in gm.graph.nodes}
    rope = next(n for n in gm.graph.nodes if n.target == torch.ops.llmc.rope.default)
    paged = next(n for n in gm.graph.nodes if n.target == torch.ops.llmc.paged_attention.default)
    k, v = paged.args[1:3]
    with gm.graph.inserting_before(paged):
        gm.graph.call_function(torch.ops.llmc.rope_write_kv.default,
                               (k, v, *rope.args[1:], nodes["k_cache"], nodes["v_cache"], 1, nodes["positions"]))
    gm.recompile()
    return gm


@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_every_launcher_is_planned(every_op_graph, arch):
    specs = plan.kernel_specs(every_op_graph, arch)
    assert {spec.op for spec in specs} == {kernel for kernels in launch.KERNELS.values() for kernel in kernels}
    # The dense and the sparse decode attention share the split-K combine kernel; every other kernel runs once.
    assert {spec.op: spec.launches for spec in specs if spec.launches != 1} == {"attention_combine": 2}
    for spec in specs:
        assert list(spec.signature) == [n for n in _parameters(spec)]
        pointers = [name for name, kind in spec.signature.items() if kind.startswith("*")]
        assert set(spec.aligned) == set(pointers), "fresh tensors are 16-byte aligned"
    rope = [spec for spec in specs if spec.op == "rope"]
    assert rope and all(s.signature["positions_ptr"] == "*i64" and s.signature["cos_ptr"] == "*fp32"
                        and s.signature["x_ptr"] == "*fp16" and s.signature["seq_len"] == "i32" for s in rope)
    gemms = [spec for spec in specs if spec.op == "norm_linear"]
    # The decode and prefill classes of the GEMM have different tiles on every GPU arch.
    assert len(gemms) == 2 and len({s.name for s in gemms}) == 2
    # Attention: the prefill kernel per sequence-length bucket whose tiles differ, for each op (paged or not);
    # the paged call at S = 1 the split-K decode and its combine.
    head_dim = configs.HEAD_DIM_BUCKETS[0]
    buckets = {configs.pick_attention("prefill", arch, head_dim, size) for size in
               configs.attention_plan_sizes().values()}
    prefill = [spec for spec in specs if spec.op == "attention_prefill"]
    assert len(prefill) == 2 * len(buckets)
    assert {(s.constexprs.get("past_lens_ptr"), s.signature.get("past_lens_ptr")) for s in prefill} == {
        (None, None), (None, "*i64")}
    decode = [spec for spec in specs if spec.op in ("attention_decode", "attention_combine")]
    assert len(decode) == 2 and all(s.signature.get("block_table_ptr", "*i64") == "*i64" for s in decode)


def _parameters(spec) -> list[str]:
    import ast

    tree = ast.parse(spec.source.read_text())
    function = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == spec.name)
    return [arg.arg for arg in function.args.args]


def test_recording_launches_nothing_and_restores():
    x = torch.randn(3, HIDDEN, dtype=torch.bfloat16, device="meta")
    weight = torch.randn(FFN, HIDDEN, dtype=torch.bfloat16, device="meta")
    with launch.recording("sm_86") as outer:
        assert launch.current_arch(torch.device("meta")) == "sm_86"
        with launch.recording("sm_90") as inner:
            assert launch.current_arch(torch.device("meta")) == "sm_90"
            out = launch.launch_norm_linear(x, weight, None, 1e-5, "rms", "none")
        launch.launch_norm_linear(x, weight, None, 1e-5, "rms", "none")
    assert out.device.type == "meta" and out.shape == (3, FFN)
    assert len(inner.specs) == len(outer.specs) == 1
    for recorder, arch in ((inner, "sm_90"), (outer, "sm_86")):
        config = configs.pick("norm_linear", arch, 3, FFN, HIDDEN)
        assert recorder.specs[0].num_stages == config.num_stages
        assert f"{config.block_m} x {config.block_n} output tile" in recorder.specs[0].source.read_text()
    with pytest.raises(ValueError, match="no kernel configurations"):
        with launch.recording("sm_70"):
            pass
    assert hooks.active_recorder() is None


def test_argument_types_follow_triton():
    assert [argument_type(v) for v in (True, 7, -2**31, 2**31, 2**63, 0.5)] == ["i1", "i32", "i32", "i64", "u64",
                                                                                  "fp32"]
    assert argument_type(torch.empty(1, dtype=torch.bfloat16, device="meta")) == "*bf16"


def test_a_misaligned_view_is_another_kernel():
    weight = torch.randn(HIDDEN, dtype=torch.float16, device="meta")
    base = torch.empty(4 * HIDDEN + 1, dtype=torch.float16, device="meta")
    aligned, shifted = base[: 4 * HIDDEN].view(4, HIDDEN), base[1:].view(4, HIDDEN)
    with launch.recording("sm_80") as recorder:
        launch.launch_rms_norm(aligned, weight, 1e-6)
        launch.launch_rms_norm(shifted, weight, 1e-6)
    first, second = recorder.specs
    assert "x_ptr" in first.aligned and "x_ptr" not in second.aligned
    assert first.key() != second.key()


class FakeLibrary:
    """A KernelLibrary stand-in (a real one needs a GPU): holds given keys; its kernels record their launches."""

    def __init__(self, keys):
        self.index = type("Index", (), {"kernels": dict.fromkeys(keys)})()
        self.launches = []

    def kernel(self, key):
        return lambda grid, *args: self.launches.append((key, grid, args))


class JitKernel:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_a_runtime_launch_finds_the_planned_cubin():
    x, weight = torch.randn(5, HIDDEN), torch.randn(HIDDEN)
    spec = dict(dtype="float32", weight_dtype="float32", out_dtype="float32", n=HIDDEN, block_n=HIDDEN, num_warps=1)
    out = torch.empty_like(x)
    args = (x, weight, out, x.stride(0), 1e-6)
    with launch.recording("sm_80") as recorder:
        launch.load("rms_norm", **spec)[(5,)](*args, num_warps=1)
    (planned,) = recorder.specs
    library, jit = FakeLibrary([planned.key()]), JitKernel()
    LibraryKernel(ShippedKernels(library), "rms_norm", spec, jit)[(5,)](*args, num_warps=1)
    assert library.launches == [(planned.key(), (5,), args)] and jit.launches == []
    # Another block size is another kernel: not in the bundle, so it is JIT-compiled.
    other = dict(spec, block_n=2 * HIDDEN)
    LibraryKernel(ShippedKernels(library), "rms_norm", other, jit)[(5,)](*args, num_warps=1)
    assert len(library.launches) == 1 and jit.launches == [((5,), args, {"num_warps": 1})]
