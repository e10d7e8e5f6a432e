"""Before/After tests of fuse_kv_write: on our Qwen3 and Llama paged steps, every layer's keys' rope becomes one
llmc::rope_write_kv, the outputs stay bit for bit what they were, and the caches then hold exactly what the
runtime's PagedKVCache.write would have written; what does not fit is left alone with a note."""
import pytest
import torch

from llmc.passes import block_attention, fold_rope, fuse_kv_write
from llmc.passes.options import CompileOptions
from llmc.passes.pattern import PassContext
from llmc.runtime.engine import slot_mapping
from llmc.runtime.kv_cache import PagedKVCache

llmc = torch.ops.llmc
ROPE, WRITE, PAGED = llmc.rope.default, llmc.rope_write_kv.default, llmc.paged_attention.default
BLOCK = 16  # the block size the fusion graphs are traced with
MAX_LEN = 4096  # our configs' max_position_embeddings: check_inputs' positions stay below it


def run(gm, *passes, **context) -> tuple[list[int], PassContext]:
    """The passes in order as the pipeline runs them (dead-code elimination, lint, recompile after each)."""
    ctx, counts = PassContext(max_seq_len=MAX_LEN, options=CompileOptions(**context)), []
    for p in passes:
        counts.append(p.run(gm, ctx))
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return counts, ctx


def cloned(inputs: tuple) -> tuple:
    return tuple(x.clone() for x in inputs)


def padded_step(fusion, dtype: torch.dtype, seq: int) -> tuple[tuple, list[list[int]], list[int], list[int]]:
    """A step whose rows have different lengths (row 1 right-padded when seq > 2) over distinct random blocks with
    random cache contents, its slots computed as the engine does. Returns (inputs, block tables, starts, lengths)."""
    batch, num_blocks, max_blocks = 3, 13, 3
    lengths = [seq, max(1, seq - 2), seq]
    past = torch.randint(0, (max_blocks - 1) * BLOCK, (batch,))  # + seq <= max_blocks * BLOCK: the blocks hold it
    table = torch.randperm(num_blocks)[: batch * max_blocks].view(batch, max_blocks)
    cache = (fusion.LAYERS, num_blocks, BLOCK, fusion.SHAPE["num_kv_heads"], fusion.SHAPE["head_dim"])
    slots = slot_mapping(table.tolist(), past.tolist(), lengths, seq, BLOCK)
    inputs = (torch.randint(0, fusion.SHAPE["vocab_size"], (batch, seq)), past[:, None] + torch.arange(seq),
              torch.randn(cache).to(dtype), torch.randn(cache).to(dtype), table, past,
              torch.tensor(lengths) - 1, slots)
    return inputs, table.tolist(), past.tolist(), lengths


@pytest.mark.parametrize("family,dtype", [("qwen3", torch.float32), ("llama", torch.float32),
                                          ("qwen3", torch.bfloat16)], ids=["qwen3-fp32", "llama-fp32", "qwen3-bf16"])
def test_every_layer_writes_its_keys_and_values(fusion, family, dtype):
    layers = fusion.LAYERS
    for name, gm, inputs in fusion.graphs("llmc", family, dtype):
        unpassed = fusion.outputs(gm, cloned(inputs))
        assert run(gm, fold_rope, block_attention)[0] == [2 * layers + 1, layers]
        before = fusion.census(gm)
        assert (before[ROPE], before.get(WRITE, 0), before[PAGED]) == (2 * layers, 0, layers)
        expected = fusion.outputs(gm, cloned(inputs))

        (count,), ctx = run(gm, fuse_kv_write)
        assert count == layers and not ctx.notes
        after = fusion.census(gm)
        assert (after[ROPE], after[WRITE], after[PAGED]) == (layers, layers, layers)  # the queries keep theirs
        for attention in (n for n in gm.graph.nodes if n.target == PAGED):
            write = attention.args[1]
            k_layer, v_layer = attention.args[3:5]
            assert write.target == WRITE and write.args[1] is attention.args[2]  # the attention's own v
            assert write.args[9] == k_layer.args[2] == v_layer.args[2]
            assert [a.target for a in (*write.args[7:9], write.args[10])] == ["k_cache", "v_cache", "slot_mapping"]
        got = fusion.outputs(gm, cloned(inputs))
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), name  # rope's result exactly
        fusion.assert_model_outputs_close(got, unpassed, dtype)


@pytest.mark.parametrize("family,dtype", [("qwen3", torch.float32), ("llama", torch.bfloat16)])
def test_the_cache_holds_what_the_runtime_would_have_written(fusion, family, dtype):
    for name, gm, _ in fusion.graphs("llmc", family, dtype):
        seq = 7 if name == "prefill" else 1
        inputs, tables, starts, lengths = padded_step(fusion, dtype, seq)
        unpassed = fusion.outputs(gm, cloned(inputs))
        assert run(gm, fold_rope, block_attention, fuse_kv_write)[0][-1] == fusion.LAYERS
        step = cloned(inputs)
        logits, new_k, new_v = fusion.outputs(gm, step)
        runtime = PagedKVCache(*inputs[2].shape, dtype)
        runtime.k.copy_(inputs[2])
        runtime.v.copy_(inputs[3])
        runtime.write(tables, starts, lengths, new_k, new_v)
        assert torch.equal(step[2], runtime.k) and torch.equal(step[3], runtime.v), name
        assert not torch.equal(step[2], inputs[2])
        fusion.assert_model_outputs_close([logits, new_k, new_v], unpassed, dtype)


def test_block_sparse_attention_writes_the_cache_too(fusion):
    """With attention sparsity the paged steps call llmc.sparse_paged_attention: its keys write the cache as well,
    and the logits stay exactly what the sparse graph computed when the engine wrote the cache."""
    sparse = llmc.sparse_paged_attention.default
    for name, gm, _ in fusion.graphs("llmc", "qwen3", torch.float32):
        seq = 7 if name == "prefill" else 1
        inputs, *_ = padded_step(fusion, torch.float32, seq)
        run(gm, fold_rope, block_attention, attention_keep=0.3, attention_block=8)
        expected = fusion.outputs(gm, cloned(inputs))
        (count,), _ = run(gm, fuse_kv_write)
        census = fusion.census(gm)
        assert count == census[WRITE] == census[sparse] == fusion.LAYERS and PAGED not in census
        got = fusion.outputs(gm, cloned(inputs))
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), name


def test_attention_without_a_rope_or_a_slot_input_is_left_alone(fusion):
    (_, gm, _), (_, other, _) = fusion.graphs("llmc", "llama", torch.float32)
    assert run(gm, block_attention)[0] == [fusion.LAYERS]  # no fold_rope: the keys are rotated by aten ops
    (count,), ctx = run(gm, fuse_kv_write)
    assert count == 0 and len(ctx.notes) == fusion.LAYERS and "not an llmc.rope output" in ctx.notes[0]

    slots = next(n for n in other.graph.nodes if n.target == "slot_mapping")
    other.graph.erase_node(slots)  # a graph traced without the input
    run(other, fold_rope, block_attention)
    (count,), ctx = run(other, fuse_kv_write)
    assert count == 0 and ctx.notes == ["skipped: the graph has no slot_mapping input to write the cache through"]
    assert WRITE not in fusion.census(other)
