"""Before/After tests of lower_cpu: on the cpu target every llmc.paged_attention of our paged steps becomes
llmc.paged_attention_cpu with the same arguments, every norm_linear / add_norm_linear / quant_linear with a CPU
kernel its _cpu twin (bf16 aten.linear of a stored weight: norm_linear_cpu with no norm), and the graph's outputs
stay the reference's (within the summation-order tolerance); on a GPU target, or without a target, nothing
changes."""
import pytest
import torch

from llmc.common.targets import get_target
from llmc.passes import (block_attention, fold_rope, fuse_add_norm, fuse_kv_write, fuse_norm_linear, fuse_rms_norm,
                         lower_cpu, merge_projections, quantize)
from llmc.passes.pattern import PassContext
from llmc.passes.quant_config import Int4WeightOnlyConfig, Int8WeightOnlyConfig
from llmc.passes.options import CompileOptions

llmc = torch.ops.llmc
aten = torch.ops.aten
PAGED, PAGED_CPU = llmc.paged_attention.default, llmc.paged_attention_cpu.default
ROPES = {llmc.rope.default: llmc.rope_cpu.default, llmc.rope_write_kv.default: llmc.rope_write_kv_cpu.default}
TWINS = {llmc.norm_linear.default: llmc.norm_linear_cpu.default,
         llmc.add_norm_linear.default: llmc.add_norm_linear_cpu.default,
         llmc.quant_linear.default: llmc.quant_linear_cpu.default}
MAX_LEN = 4096  # our configs' max_position_embeddings


def run(gm, *passes, target=None, quant=None) -> list[int]:
    """The passes in order as the pipeline runs them (dead-code elimination, lint, recompile after each)."""
    ctx, counts = PassContext(target=target, max_seq_len=MAX_LEN, options=CompileOptions(quant=quant)), []
    for p in passes:
        counts.append(p.run(gm, ctx))
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return counts


def cloned(inputs: tuple) -> tuple:
    return tuple(x.clone() for x in inputs)


@pytest.mark.parametrize("family,dtype,write", [("qwen3", torch.float32, True), ("llama", torch.float32, False),
                                                ("qwen3", torch.bfloat16, True)],
                         ids=["qwen3-fp32", "llama-fp32-no-kv-write", "qwen3-bf16"])
def test_every_paged_attention_is_lowered_on_cpu(fusion, family, dtype, write):
    layers = fusion.LAYERS
    for name, gm, inputs in fusion.graphs("llmc", family, dtype):
        run(gm, fold_rope, block_attention, *([fuse_kv_write] if write else []))
        before = fusion.census(gm)
        assert (before[PAGED], before.get(PAGED_CPU, 0)) == (layers, 0)
        calls = [literals(n) for n in gm.graph.nodes if n.target == PAGED]
        expected = fusion.outputs(gm, cloned(inputs))

        # Unfused here: bf16 projections are plain aten.linear of stored weights, lowered too; so are the ropes.
        linears = before[aten.linear.default] if dtype == torch.bfloat16 else 0
        ropes = sum(before.get(t, 0) for t in ROPES)
        assert ropes >= layers
        assert run(gm, lower_cpu, target=get_target("cpu")) == [layers + linears + ropes]
        after = fusion.census(gm)
        assert (after.get(PAGED, 0), after[PAGED_CPU]) == (0, layers)
        assert after.get(llmc.norm_linear_cpu.default, 0) == linears
        assert after.get(aten.linear.default, 0) == before[aten.linear.default] - linears
        assert all(after.get(t, 0) == 0 and after.get(cpu, 0) == before.get(t, 0) for t, cpu in ROPES.items())
        lowered_targets = (PAGED_CPU, llmc.norm_linear_cpu.default, aten.linear.default, *ROPES.values())
        assert ({t: c for t, c in after.items() if t not in lowered_targets}
                == {t: c for t, c in before.items() if t not in (PAGED, aten.linear.default, *ROPES)})
        lowered = [n for n in gm.graph.nodes if n.target == PAGED_CPU]
        assert [literals(n) for n in lowered] == calls  # the same options, in the same order
        assert all(n.meta["val"].shape == n.args[0].meta["val"].shape for n in lowered)
        # fp32 within 1e-4 (summation order); bf16 logits by the whole-model cosine (conftest says why).
        fusion.assert_model_outputs_close(fusion.outputs(gm, cloned(inputs)), expected, dtype)


@pytest.mark.parametrize("target", ["h100", "t4", None])
def test_gpu_targets_and_no_target_are_left_alone(fusion, target):
    for _, gm, _ in fusion.graphs("llmc", "qwen3", torch.float32):
        run(gm, fold_rope, block_attention, fuse_kv_write)
        before = fusion.census(gm)
        assert run(gm, lower_cpu, target=get_target(target) if target else None) == [0]
        assert fusion.census(gm) == before


def test_a_graph_without_paged_attention_counts_nothing(fusion):
    for _, gm, _ in fusion.graphs("hf", "qwen3", torch.float32):  # transformers' logits: no paged cache
        before = fusion.census(gm)
        assert run(gm, lower_cpu, target=get_target("cpu")) == [0]
        assert fusion.census(gm) == before


def literals(node) -> tuple:
    """A call's arguments other than nodes (its inputs may themselves have been lowered)."""
    return tuple(a if not isinstance(a, torch.fx.Node) else None for a in node.args)


FUSIONS = (fuse_rms_norm, fold_rope, merge_projections, fuse_add_norm, fuse_norm_linear, block_attention,
           fuse_kv_write)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# The fusion models' GEMMs have K = 48 and 80: int4 groups of 16 fit, and ATen's packed int4 kernel takes 32..256
# only, so those stay the reference (llmc-tiny's int4 bundles, tests/runtime/test_evaluate.py, take the kernel).
@pytest.mark.parametrize("quant", [None, Int4WeightOnlyConfig(group_size=16), Int8WeightOnlyConfig()],
                         ids=["float", "int4-g16-no-kernel", "int8-w8a16"])
def test_every_gemm_with_a_cpu_kernel_is_lowered(fusion, dtype, quant):
    for name, gm, inputs in fusion.graphs("llmc", "qwen3", dtype):
        run(gm, *FUSIONS, *([quantize] if quant else []), target=get_target("cpu"), quant=quant)
        before = fusion.census(gm)
        gemms = {t: before.get(t, 0) for t in TWINS}
        # float32 norm GEMMs keep the reference (it is F.linear); quant_linear goes where ATen has its kernel
        kernel = quant is None or type(quant) is Int8WeightOnlyConfig
        lowered = {t: c if (t is llmc.quant_linear.default and kernel) or (t is not llmc.quant_linear.default
                                                                          and dtype == torch.bfloat16) else 0
                   for t, c in gemms.items()}
        assert sum(gemms.values()) >= 2 * fusion.LAYERS  # the norm-fused ones: qkv and gate-up per layer
        if quant is not None:
            assert gemms[llmc.quant_linear.default] >= 2 * fusion.LAYERS
        plain = before.get(aten.linear.default, 0) if dtype == torch.bfloat16 else 0
        calls = {t: [literals(n) for n in gm.graph.nodes if n.target == t] for t in TWINS}
        expected = fusion.outputs(gm, cloned(inputs))

        ropes = sum(before.get(t, 0) for t in ROPES)
        assert run(gm, lower_cpu, target=get_target("cpu")) == [fusion.LAYERS + sum(lowered.values()) + plain + ropes]
        after = fusion.census(gm)
        for reference, twin in TWINS.items():
            assert after.get(reference, 0) == gemms[reference] - lowered[reference]
            if not lowered[reference]:
                continue
            twins = [literals(n) for n in gm.graph.nodes if n.target == twin]
            if reference is llmc.norm_linear.default:  # with the plain bf16 linears, in graph order
                assert len(twins) == len(calls[reference]) + plain
                assert all(c in twins for c in calls[reference])
            else:
                assert twins == calls[reference]  # the same options, in the same order
        # fp32 within 1e-4; bf16 (where weight-only kernels round their scales once, the reference its weights
        # once: codegen/cpu/linear.py) by the whole-model cosine.
        fusion.assert_model_outputs_close(fusion.outputs(gm, cloned(inputs)), expected, dtype)
