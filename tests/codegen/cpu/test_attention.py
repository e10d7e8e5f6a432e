"""llmc::paged_attention_cpu (codegen/cpu/attention.py) against its reference, llmc::paged_attention, and against
the float64 reading of the contract: batched decode over mixed past lengths (0, on and off block boundaries),
chunked prefill, GQA, sliding windows, fp32, fp16 and bf16. Every cache slot that holds no cached key of its
sequence (spare blocks, the table's padding entries, the tail of a sequence's last block) is NaN, so a read shows.
Each test runs with every row alone, with groups of rows mixed with lone ones, and with the batch as one group
(the op's two gathers and its masks)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)
from llmc.codegen import graph_io
from llmc.codegen.cpu import attention
from tests.conftest import dense_attention_float64, paged_step_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against float64 and against the reference (another summation order); DESIGN.md's tolerances.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
CPU_OP, REFERENCE = torch.ops.llmc.paged_attention_cpu, torch.ops.llmc.paged_attention


@pytest.fixture(autouse=True, params=[0, 3000, 1 << 40], ids=["rows-alone", "mixed-groups", "one-group"])
def group_bytes(request, monkeypatch):
    """GROUP_BYTES 0 puts every row in a group of its own; 3000 bytes of keys groups a few short rows (head_dim
    16, 2 kv heads: about 23 fp32 positions) and leaves the longer ones alone."""
    monkeypatch.setattr(attention, "GROUP_BYTES", request.param)
    return request.param


def step_inputs(dtype, past_lens, seq, **shape) -> list:
    """paged_step_inputs with every slot at or past a sequence's past length NaN too (not only spare blocks)."""
    inputs = paged_step_inputs(dtype, past_lens, seq, **shape)
    k_cache, v_cache, table = inputs[3], inputs[4], inputs[5]
    block_size = k_cache.shape[1]
    for b, past in enumerate(past_lens):
        for position in range(past, table.shape[1] * block_size):
            block, slot = table[b, position // block_size], position % block_size
            k_cache[block, slot], v_cache[block, slot] = float("nan"), float("nan")
    return inputs


def paged_float64(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window):
    """The contract read literally: sequence b's cached key t is slot t % BS of block block_table[b, t // BS]."""
    block_size, seq = k_cache.shape[1], q.shape[1]
    outs = []
    for b, past in enumerate(past_lens.tolist()):
        blocks, slots = block_table[b, torch.arange(past) // block_size], torch.arange(past) % block_size
        keys, values = torch.cat([k_cache[blocks, slots], k[b]]), torch.cat([v_cache[blocks, slots], v[b]])
        outs.append(dense_attention_float64(q[b], keys, values, scale, past + torch.arange(seq),
                                            torch.arange(past + seq), window))
    return torch.stack(outs)


def check(inputs, window, dtype):
    """The CPU op's output: finite, contiguous, q's shape and dtype, close to float64 and to the reference."""
    out = CPU_OP(*inputs, window)
    assert out.shape == inputs[0].shape and out.dtype == dtype and out.is_contiguous() and out.isfinite().all()
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), paged_float64(*inputs, window), rtol=rtol, atol=atol)
    torch.testing.assert_close(out, REFERENCE(*inputs, window), rtol=rtol, atol=atol)
    return out


# Block size 4: 0 (no past), 3 / 5 (inside a block), 4 / 16 (on a boundary), 17 (one past it).
MIXED_PASTS = [0, 3, 16, 5, 17, 4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 1, 5, 16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (6, 3, 10), (3, 3, 24), (8, 1, 80)])
def test_decode_matches_reference_and_float64(dtype, window, heads, kv_heads, head_dim):
    inputs = step_inputs(dtype, MIXED_PASTS, 1, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    check(inputs, window, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("past_lens", [[0], [13], [0, 0, 0], [8, 8], [31, 1, 0, 20, 12]])
def test_decode_batch_shapes(dtype, past_lens):
    """One sequence, a batch with no past at all (the step's own key is all there is), equal and ragged pasts."""
    check(step_inputs(dtype, past_lens, 1, heads=6, kv_heads=2, head_dim=12), 0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [2, 7])
@pytest.mark.parametrize("window", [0, 3, 9])
def test_prefill_matches_reference_and_float64(dtype, seq, window):
    check(step_inputs(dtype, [0, 8, 13, 5], seq, heads=6, kv_heads=2, head_dim=20), window, dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 3, 10), (8, 1, 80)])
def test_prefill_heads(heads, kv_heads, head_dim):
    check(step_inputs(torch.bfloat16, [11, 0], 5, heads=heads, kv_heads=kv_heads, head_dim=head_dim), 7,
          torch.bfloat16)


def test_prefill_right_padded_rows():
    """Right-padded rows (sequence 0 has 2 real tokens of 5) come out finite; real rows exact. A padded row is a
    query like any other to the op, so the whole output matches."""
    inputs = step_inputs(torch.float32, [9, 4], 5)
    inputs[0][0, 2:] = 0.0  # what the step's padding tokens might produce: any finite value
    check(inputs, 0, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 4])
def test_chunked_prefill_equals_one_shot(dtype, window):
    """A 13-token prompt as one call without a past, and as chunks of 5, 4, 4 (then one decode step's worth, 1),
    each chunk's keys and values written into the cache before the next: the same outputs."""
    block_size, heads, kv_heads, head_dim, total = 4, 4, 2, 16, 14
    q = torch.randn(1, total, heads, head_dim).to(dtype)
    k, v = (torch.randn(1, total, kv_heads, head_dim).to(dtype) for _ in range(2))
    k_cache = torch.full((6, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    block_table = torch.tensor([[5, 2, 0, 3]])
    one_shot = CPU_OP(q, k, v, k_cache, v_cache, block_table, torch.tensor([0]), 0.25, window)
    chunks, past = [], 0
    for length in (5, 4, 4, 1):
        new = slice(past, past + length)
        chunks.append(CPU_OP(q[:, new], k[:, new], v[:, new], k_cache, v_cache, block_table, torch.tensor([past]),
                             0.25, window))
        positions = torch.arange(past, past + length)
        blocks, slots = block_table[0, positions // block_size], positions % block_size
        k_cache[blocks, slots], v_cache[blocks, slots] = k[0, new], v[0, new]
        past += length
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(torch.cat(chunks, 1), one_shot, rtol=rtol, atol=atol)
    torch.testing.assert_close(one_shot, torch.ops.llmc.causal_attention(q, k, v, 0.25, window), rtol=rtol,
                               atol=atol)


def test_groups_are_consecutive_rows_within_the_budget(monkeypatch):
    monkeypatch.setattr(attention, "GROUP_BYTES", 1000)
    # 10 bytes per key: (rows in the group) * (its longest row + S) * 10 <= 1000, a too-large row alone.
    assert attention._groups([3, 40, 0, 5, 200, 1, 1], 1, 10) == [range(0, 2), range(2, 4), range(4, 5),
                                                                  range(5, 7)]
    assert attention._groups([0], 7, 10) == [range(0, 1)]
    monkeypatch.setattr(attention, "GROUP_BYTES", 0)
    assert attention._groups([2, 2, 2], 1, 10) == [range(0, 1), range(1, 2), range(2, 3)]


def test_schema_is_the_references():
    ours, reference = CPU_OP.default._schema, REFERENCE.default._schema
    assert [(a.name, str(a.type)) for a in ours.arguments] == [(a.name, str(a.type)) for a in reference.arguments]
    assert [str(r.type) for r in ours.returns] == [str(r.type) for r in reference.returns]
    assert not ours.is_mutable
    assert graph_io.resolve_target(graph_io.target_name(CPU_OP.default)) is CPU_OP.default  # graph.json names it


@pytest.mark.parametrize("seq", [1, 3])
def test_fake_impl_and_opcheck(seq):
    inputs = step_inputs(torch.bfloat16, [6, 0, 9], seq)
    torch.library.opcheck(CPU_OP.default, (*inputs, 3))
    with FakeTensorMode() as mode:
        fake = CPU_OP(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in inputs), 3)
    assert fake.shape == inputs[0].shape and fake.dtype == torch.bfloat16


def test_refuses_mismatched_heads():
    inputs = step_inputs(torch.float32, [3], 1, heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        CPU_OP(*inputs, 0)
