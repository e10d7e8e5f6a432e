"""llmc::sparse_paged_attention's reference against a literal, loop-by-loop float64 reading of the selection rule
(codegen/sparse_attention.py's docstring), its limits (keep >= 1 is paged_attention; keep < 1 drops blocks), the
tie and rounding rules, and its fake implementation."""
import math
from fractions import Fraction

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc, sparse_paged_attention with them)
from llmc.codegen.sparse_attention import block_visibility, key_block_bound, query_block_count, select_blocks
from tests.conftest import paged_step_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against float64 (inputs rounded to the dtype first): the reference is SDPA, which sums in another order.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
sparse_op, paged_op = torch.ops.llmc.sparse_paged_attention, torch.ops.llmc.paged_attention


def sequence_keys(k_cache, v_cache, block_table, b, past, k, v):
    """Sequence b's keys and values at positions 0 .. past + S - 1, read slot by slot through the table."""
    block_size = k_cache.shape[1]
    slots = [(int(block_table[b, t // block_size]), t % block_size) for t in range(past)]
    past_k = torch.stack([k_cache[i, j] for i, j in slots]) if slots else k_cache[:0, 0]
    past_v = torch.stack([v_cache[i, j] for i, j in slots]) if slots else v_cache[:0, 0]
    return torch.cat([past_k, k[b]]).double(), torch.cat([past_v, v[b]]).double()


def sees(query: int, key: int, window: int) -> bool:
    return 0 <= query - key and (window == 0 or query - key < window)


def literal_selection(q, keys, past, scale, window, keep, block):
    """{(h, query block): kept key blocks} for one sequence, the rule as the docstring states it, in float64."""
    seq, heads = q.shape[:2]
    group, total = heads // keys.shape[1], keys.shape[0]
    chosen = {}
    for n in sorted({(past + i) // block for i in range(seq)}):
        rows = [i for i in range(seq) if (past + i) // block == n]
        visible = [j for j in range(-(-total // block))
                   if any(sees(past + i, t, window) for i in rows for t in range(j * block, min(total, j * block + block)))]
        forced = [j for j in visible if j in (0, n)]
        budget = max(math.ceil(Fraction(str(keep)) * len(visible)), len(forced))
        for h in range(heads):
            pooled_q = q[rows, h].double().mean(0)
            score = {j: float(pooled_q @ keys[j * block: j * block + block, h // group].mean(0)) * scale
                     for j in visible}
            others = sorted((j for j in visible if j not in forced), key=lambda j: (-score[j], j))
            chosen[h, n] = set(forced + others[: budget - len(forced)])
    return chosen


def sparse_float64(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window, keep, block):
    outs = []
    for b, past in enumerate(past_lens.tolist()):
        keys, values = sequence_keys(k_cache, v_cache, block_table, b, past, k, v)
        chosen = literal_selection(q[b], keys, past, scale, window, keep, block)
        seq, heads = q.shape[1:3]
        group = heads // keys.shape[1]
        mask = torch.tensor([[[sees(past + i, t, window) and t // block in chosen[h, (past + i) // block]
                               for t in range(keys.shape[0])] for i in range(seq)] for h in range(heads)])
        scores = torch.einsum("shd,thd->hst", q[b].double(), keys.repeat_interleave(group, 1)) * scale
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hst,thd->shd", weights, values.repeat_interleave(group, 1)))
    return torch.stack(outs)


def paged_inputs(dtype, past_lens, seq, **shape):
    return paged_step_inputs(dtype, past_lens, seq, **shape)


def select(inputs, window, keep, block) -> torch.Tensor:
    q, k, _, k_cache, _, block_table, past_lens, scale = inputs
    return select_blocks(q, k, k_cache, block_table, past_lens, scale, window, keep, block)


def selection_sets(kept: torch.Tensor, past_lens, seq: int, block: int) -> list[dict]:
    """select_blocks' mask as the literal reading's {(h, query block): key blocks}, per sequence."""
    out = []
    for b, past in enumerate(past_lens.tolist()):
        blocks = sorted({(past + i) // block for i in range(seq)})
        out.append({(h, n): set(torch.nonzero(kept[b, h, n - past // block]).flatten().tolist())
                    for h in range(kept.shape[1]) for n in blocks})
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq,block", [(1, 4), (9, 4), (9, 6), (13, 8)])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("keep", [0.2, 0.5])
def test_matches_the_literal_rule_in_float64(dtype, seq, block, window, keep):
    # Pasts of 0, inside a block and over several; block 6 is no multiple of the cache's 4-slot blocks.
    inputs = paged_inputs(dtype, past_lens=[0, 5, 27], seq=seq)
    kept = select(inputs, window, keep, block)
    for b, got in enumerate(selection_sets(kept, inputs[6], seq, block)):
        keys, _ = sequence_keys(*inputs[3:6], b, int(inputs[6][b]), inputs[1], inputs[2])
        want = literal_selection(inputs[0][b], keys, int(inputs[6][b]), inputs[7], window, keep, block)
        assert got == want, f"sequence {b}"
    assert kept.sum(-1).amax() >= 1 and not kept.all(), "the case selects something and drops something"
    out = sparse_op(*inputs, window, keep, block)
    assert out.shape == inputs[0].shape and out.dtype == dtype and out.is_contiguous()
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), sparse_float64(*inputs, window, keep, block), rtol=rtol, atol=atol)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("seq", [1, 7])
def test_keep_one_is_paged_attention(window, seq):
    inputs = paged_inputs(torch.bfloat16, past_lens=[0, 9, 30], seq=seq)
    dense = paged_op(*inputs, window)
    # keep >= 1 returns paged_attention's own result: the op calls it (every visible block is kept), bit for bit.
    for keep in (1.0, 1.5):
        assert torch.equal(sparse_op(*inputs, window, keep, 4), dense)
    # 0.999 goes through the selection and still keeps every visible block (ceil(0.999 * n) = n for n < 1000):
    # the same softmax with a mask that drops nothing, to float32's tolerance for a changed summation.
    inputs32 = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    num_q, num_k = query_block_count(seq, 4), key_block_bound(seq, inputs[5].shape[1], 4, 4)
    visible, _ = block_visibility(inputs[6], seq, 4, window, num_q, num_k)
    assert torch.equal(select(inputs32, window, 0.999, 4), visible[:, None].expand(3, 4, num_q, num_k))
    torch.testing.assert_close(sparse_op(*inputs32, window, 0.999, 4), paged_op(*inputs32, window),
                               rtol=1e-4, atol=1e-4)


def test_a_small_keep_drops_blocks_and_stays_finite():
    inputs = paged_inputs(torch.float32, past_lens=[40, 3], seq=6)
    dense, sparse = paged_op(*inputs, 0), sparse_op(*inputs, 0, 0.2, 4)
    assert sparse.isfinite().all()
    assert not torch.allclose(sparse[0], dense[0], rtol=1e-2, atol=1e-2)
    # Sequence 1's first row (position 3) sees block 0 only, the sink, always kept: it is dense attention.
    torch.testing.assert_close(sparse[1, :1], dense[1, :1], rtol=1.3e-6, atol=1e-5)


def test_sink_and_diagonal_are_kept_and_ties_go_to_the_lower_block():
    # Keys of blocks 1 .. 4 identical (equal pooled keys, equal scores); block 5 holds the query: with keep 0.5 of
    # 6 visible blocks, 3 are kept: the sink 0, the diagonal 5, and block 1, the lowest of the tied ones.
    q, k, v, k_cache, v_cache, table, _, scale = paged_inputs(torch.float32, past_lens=[20], seq=1)
    row = k_cache[table[0, 1]].clone()
    for column in range(1, 5):
        k_cache[table[0, column]] = row
    kept = select_blocks(q, k, k_cache, table, torch.tensor([20]), scale, 0, 0.5, 4)
    assert torch.nonzero(kept[0, :, 0])[:, 1].view(4, 3).tolist() == [[0, 1, 5]] * 4


@pytest.mark.parametrize("keep,visible,kept", [(0.28, 25, 7), (0.56, 25, 14), (0.2, 5, 2), (0.0, 10, 2),
                                               (0.25, 13, 4)])
def test_the_kept_count_is_ceil_keep_times_visible_at_least_the_forced_two(keep, visible, kept):
    # 0.28 * 25 and 0.56 * 25 are 7.000000000000001 and 14.000000000000002 in floating point: still 7 and 14.
    block = 4
    inputs = paged_inputs(torch.float32, past_lens=[(visible - 1) * block], seq=1)
    count = select(inputs, 0, keep, block).sum(-1)
    assert count.flatten().tolist() == [kept] * 4


def test_padding_rows_stay_finite():
    # Sequence 0 has 3 real tokens of the batch's 6: the padding rows' queries are zeros, their keys zeros.
    inputs = paged_inputs(torch.float16, past_lens=[9, 4], seq=6)
    for x in inputs[:3]:
        x[0, 3:] = 0
    assert sparse_op(*inputs, 0, 0.3, 4).isfinite().all()


def test_fake_impl_export_and_opcheck():
    inputs = paged_inputs(torch.bfloat16, past_lens=[0, 6], seq=5)
    args = (*inputs, 3, 0.25, 4)
    torch.library.opcheck(sparse_op.default, args)
    with FakeTensorMode() as mode:
        fake = sparse_op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.shape == inputs[0].shape and fake.dtype == torch.bfloat16

    class Step(torch.nn.Module):
        def forward(self, q, k, v, k_cache, v_cache, block_table, past_lens):
            return sparse_op(q, k, v, k_cache, v_cache, block_table, past_lens, 0.25, 3, 0.25, 4)

    gm = torch.export.export(Step(), tuple(inputs[:7])).run_decompositions({}).module()
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [sparse_op.default]
    assert torch.equal(gm(*inputs[:7]), sparse_op(*args))


@pytest.mark.parametrize("keep,block,message", [(-0.1, 4, "keep"), (float("nan"), 4, "keep"), (0.5, 0, "block")])
def test_bad_keep_or_block_is_refused(keep, block, message):
    inputs = paged_inputs(torch.float32, past_lens=[3], seq=2)
    with pytest.raises(ValueError, match=message):
        sparse_op(*inputs, 0, keep, block)
