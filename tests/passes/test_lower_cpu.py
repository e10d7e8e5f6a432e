"""Before/After tests of lower_cpu: on the cpu target every llmc.paged_attention of our paged steps becomes
llmc.paged_attention_cpu with the same arguments, and the graph's outputs stay the reference's (within the
summation-order tolerance); on a GPU target, or without a target, nothing changes."""
import pytest
import torch

from llmc.passes import block_attention, fold_rope, fuse_kv_write, lower_cpu
from llmc.passes.pattern import PassContext
from llmc.targets import get_target

llmc = torch.ops.llmc
PAGED, PAGED_CPU = llmc.paged_attention.default, llmc.paged_attention_cpu.default
MAX_LEN = 4096  # our configs' max_position_embeddings


def run(gm, *passes, target=None) -> list[int]:
    """The passes in order as the pipeline runs them (dead-code elimination, lint, recompile after each)."""
    ctx, counts = PassContext(target=target, max_seq_len=MAX_LEN), []
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
        calls = [(n.args, n.kwargs) for n in gm.graph.nodes if n.target == PAGED]
        expected = fusion.outputs(gm, cloned(inputs))

        assert run(gm, lower_cpu, target=get_target("cpu")) == [layers]
        after = fusion.census(gm)
        assert (after.get(PAGED, 0), after[PAGED_CPU]) == (0, layers)
        assert {t: c for t, c in after.items() if t != PAGED_CPU} == {t: c for t, c in before.items() if t != PAGED}
        lowered = [n for n in gm.graph.nodes if n.target == PAGED_CPU]
        assert [(n.args, n.kwargs) for n in lowered] == calls  # the same arguments, in the same order
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
