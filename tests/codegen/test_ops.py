import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)
from llmc.models.transformer import RMSNorm
from tests.conftest import dense_attention_float64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output vs an exact float64 computation: only the final rounding to the output dtype separates them.
TOLERANCE = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def rms_norm_float64(x, weight, eps):
    h = x.double()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 80), (2, 5, 1000), (7, 4, 3, 80)])
def test_rms_norm_matches_float64(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    weight = torch.randn(shape[-1], dtype=dtype)
    eps = 1e-5
    out = torch.ops.llmc.rms_norm.default(x, weight, eps)
    assert out.shape == x.shape and out.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), rms_norm_float64(x, weight, eps), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_the_models_rmsnorm_bit_for_bit(dtype):
    norm = RMSNorm(80, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(80))
    x = torch.randn(4, 6, 80, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(torch.ops.llmc.rms_norm(x, norm.weight, 1e-6), norm(x))


def test_eps_is_used():
    x = torch.randn(4, 80) * 1e-3  # small enough that eps dominates the mean square
    weight = torch.randn(80)
    a = torch.ops.llmc.rms_norm(x, weight, 1e-6)
    b = torch.ops.llmc.rms_norm(x, weight, 1e-2)
    torch.testing.assert_close(b.double(), rms_norm_float64(x, weight, 1e-2))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.float32),
])
def test_result_dtype_follows_promotion(x_dtype, w_dtype, out_dtype):
    x, weight = torch.randn(3, 80, dtype=x_dtype), torch.randn(80, dtype=w_dtype)
    out = torch.ops.llmc.rms_norm(x, weight, 1e-6)
    assert out.dtype == out_dtype
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x_dtype)
    assert torch.equal(out, expected)
    with FakeTensorMode() as mode:
        fake = torch.ops.llmc.rms_norm(mode.from_tensor(x), mode.from_tensor(weight), 1e-6)
    assert fake.dtype == out_dtype and fake.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_impl_shape_and_dtype(dtype):
    with FakeTensorMode():
        x = torch.empty(2, 9, 1000, dtype=dtype)
        out = torch.ops.llmc.rms_norm.default(x, torch.empty(1000, dtype=dtype), 1e-6)
    assert out.shape == (2, 9, 1000) and out.dtype == dtype
    assert out.device == x.device


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x, weight = torch.randn(3, 5, 80, dtype=dtype), torch.randn(80, dtype=dtype)
    torch.library.opcheck(torch.ops.llmc.rms_norm.default, (x, weight, 1e-6))


class Normed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(80))

    def forward(self, x):
        return torch.ops.llmc.rms_norm(x * 2, self.weight, 1e-5) + 1


def test_export_round_trip_with_dynamic_dims():
    model = Normed()
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(2, 3, 80),), dynamic_shapes=dims).run_decompositions({})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.llmc.rms_norm.default) == 1
    x = torch.randn(4, 7, 80)  # other sizes than the export's: the dims stayed dynamic
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(ep.module()(x), expected)
        # And once more through export, from the exported module itself.
        again = torch.export.export(ep.module(), (torch.randn(2, 3, 80),), dynamic_shapes=dims)
        assert torch.equal(again.module()(x), expected)


# ---- Attention references against the float64 dense formula ---------------------------------------------------
# Inputs rounded to the dtype first, so only the reference's arithmetic separates the two.
ATTENTION_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def paged_float64(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window):
    """The paged contract read literally: sequence b's cached key t is slot t % BS of block block_table[b, t // BS]."""
    block_size, seq = k_cache.shape[1], q.shape[1]
    outs = []
    for b, past in enumerate(past_lens.tolist()):
        slots = [(block_table[b, t // block_size], t % block_size) for t in range(past)]
        past_k = torch.stack([k_cache[i, j] for i, j in slots]) if slots else k_cache[:0, 0]
        past_v = torch.stack([v_cache[i, j] for i, j in slots]) if slots else v_cache[:0, 0]
        keys, values = torch.cat([past_k, k[b]]), torch.cat([past_v, v[b]])
        outs.append(dense_attention_float64(q[b], keys, values, scale, past + torch.arange(seq),
                                            torch.arange(past + seq), window))
    return torch.stack(outs)


def paged_inputs(dtype, batch=3, seq=5, heads=4, kv_heads=2, head_dim=16, block_size=4, past_lens=(0, 6, 13)):
    """A cache with more blocks than the batch uses, each sequence's blocks shuffled over it; the unused blocks
    and the table's padding entries hold NaN, so reading one shows."""
    needed = [-(-past // block_size) for past in past_lens]
    num_blocks = sum(needed) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    order = torch.randperm(num_blocks).tolist()
    unused = order[sum(needed):]
    k_cache[unused], v_cache[unused] = float("nan"), float("nan")
    max_blocks = max(needed) + 2
    block_table = torch.tensor(unused[:1] * max_blocks * batch).view(batch, max_blocks)
    for b, count in enumerate(needed):
        block_table[b, :count] = torch.tensor(order[:count])
        order = order[count:]
    q = torch.randn(batch, seq, heads, head_dim).to(dtype)
    k, v = torch.randn(batch, seq, kv_heads, head_dim).to(dtype), torch.randn(batch, seq, kv_heads, head_dim).to(dtype)
    return q, k, v, k_cache, v_cache, block_table, torch.tensor(past_lens), head_dim ** -0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 3, 10), (8, 1, 64)])
@pytest.mark.parametrize("window", [0, 4])
def test_causal_attention_matches_float64(dtype, heads, kv_heads, head_dim, window):
    batch, seq, scale = 2, 11, head_dim ** -0.5
    q = torch.randn(batch, seq, heads, head_dim).to(dtype)
    k, v = (torch.randn(batch, seq, kv_heads, head_dim).to(dtype) for _ in range(2))
    out = torch.ops.llmc.causal_attention(q, k, v, scale, window)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    positions = torch.arange(seq)
    expected = torch.stack([dense_attention_float64(q[b], k[b], v[b], scale, positions, positions, window)
                            for b in range(batch)])
    rtol, atol = ATTENTION_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [1, 5])
@pytest.mark.parametrize("window", [0, 3, 9])
def test_paged_attention_matches_float64(dtype, seq, window):
    inputs = paged_inputs(dtype, seq=seq)
    out = torch.ops.llmc.paged_attention(*inputs, window)
    assert out.shape == inputs[0].shape and out.dtype == dtype and out.isfinite().all()
    rtol, atol = ATTENTION_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), paged_float64(*inputs, window), rtol=rtol, atol=atol)


@pytest.mark.parametrize("window", [0, 5])
def test_batched_decode_equals_one_sequence_at_a_time(window):
    """A decode batch takes one SDPA over padded, masked keys; each row alone takes the per-sequence path."""
    inputs = paged_inputs(torch.float32, batch=4, seq=1, past_lens=(1, 6, 13, 0))
    batched = torch.ops.llmc.paged_attention(*inputs, window)
    q, k, v, k_cache, v_cache, table, past, scale = inputs
    for b in range(4):
        alone = torch.ops.llmc.paged_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], k_cache, v_cache, table[b:b + 1],
                                               past[b:b + 1], scale, window)
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-4, atol=1e-5)


def test_paged_attention_without_a_past_is_causal_attention():
    q, k, v, k_cache, v_cache, block_table, _, scale = paged_inputs(torch.float32)
    past_lens = torch.zeros(3, dtype=torch.long)
    for window in (0, 2):
        torch.testing.assert_close(torch.ops.llmc.paged_attention(q, k, v, k_cache, v_cache, block_table, past_lens,
                                                                  scale, window),
                                   torch.ops.llmc.causal_attention(q, k, v, scale, window), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_is_the_models_masked_sdpa(dtype):
    # What the pass replaces: models/transformer.py gathers the whole table, masks it and calls SDPA.
    from llmc.models.transformer import PagedKV, repeat_kv

    q, k, v, k_cache, v_cache, block_table, past_lens, _ = paged_inputs(dtype)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()  # the model reads every entry, masked or not
    kv = PagedKV(k_cache[None], v_cache[None], block_table, past_lens)
    past_k, past_v = kv.past(0)
    keys, values = torch.cat([past_k, k], 1).transpose(1, 2), torch.cat([past_v, v], 1).transpose(1, 2)
    model = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), repeat_kv(keys, 2), repeat_kv(values, 2), attn_mask=kv.mask(q.shape[1], "cpu"))
    out = torch.ops.llmc.paged_attention(q, k, v, k_cache, v_cache, block_table, past_lens, q.shape[-1] ** -0.5, 0)
    rtol, atol = ATTENTION_TOLERANCE[dtype]
    torch.testing.assert_close(out, model.transpose(1, 2), rtol=rtol, atol=atol)


def test_attention_fake_impls_and_opcheck():
    inputs = paged_inputs(torch.bfloat16)
    for op, args in ((torch.ops.llmc.causal_attention.default, (*inputs[:3], 0.25, 2)),
                     (torch.ops.llmc.paged_attention.default, (*inputs, 3))):
        torch.library.opcheck(op, args)
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert fake.shape == inputs[0].shape and fake.dtype == torch.bfloat16


def test_attention_refuses_mismatched_heads():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        torch.ops.llmc.causal_attention(q, k, k, 0.3, 0)


# ---- rope_write_kv: llmc::rope plus the KV-cache write --------------------------------------------------------

def kv_write_inputs(dtype, with_norm, batch=3, seq=5, kv_heads=2, head_dim=12, layers=3, blocks=7, block_size=4):
    """Random keys/values/caches; distinct slots scattered over the blocks, the last row's tail padding (-1)."""
    k, v = (torch.randn(batch, seq, kv_heads, head_dim).to(dtype) for _ in range(2))
    angles = torch.rand(40, head_dim) * 6.28
    weight = (1 + 0.3 * torch.randn(head_dim)).to(dtype) if with_norm else None
    caches = [torch.randn(layers, blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(2)]
    slots = torch.randperm(blocks * block_size)[: batch * seq].view(batch, seq)
    slots[-1, seq - 2:] = -1
    return [k, v, torch.randint(0, 40, (batch, seq)), angles.cos(), angles.sin(), weight, 1e-6, *caches, 1, slots]


def written_by_hand(cache, layer, slots, new):
    """cache with new[b, s] at slot slots[b, s] of `layer`, token by token (-1: nothing)."""
    cache, block_size = cache.clone(), cache.shape[2]
    for (b, s), slot in zip(torch.cartesian_prod(*map(torch.arange, slots.shape)).tolist(), slots.flatten().tolist()):
        if slot >= 0:
            cache[layer, slot // block_size, slot % block_size] = new[b, s]
    return cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope_write_kv_is_rope_and_writes_the_slots(dtype, with_norm):
    args = kv_write_inputs(dtype, with_norm)
    k, v, positions, cos, sin, weight, eps, k_cache, v_cache, layer, slots = args
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = torch.ops.llmc.rope_write_kv(*args)
    rotated = torch.ops.llmc.rope(k, positions, cos, sin, weight, eps)
    assert torch.equal(out, rotated) and out.dtype == dtype
    assert torch.equal(k_cache, written_by_hand(k_before, layer, slots, rotated))
    assert torch.equal(v_cache, written_by_hand(v_before, layer, slots, v))
    assert not torch.equal(k_cache, k_before)  # it wrote something


def test_rope_write_kv_refuses_what_the_caches_cannot_hold():
    args = kv_write_inputs(torch.bfloat16, True)
    cases = [(5, torch.randn(12), "model's dtype"),  # an fp32 norm weight rotates bf16 keys into fp32
             (9, 3, "outside the caches' 3 layers"), (10, args[10][:, :2], "slots"),
             (7, args[7][..., :4], "caches")]
    for index, value, message in cases:
        bad = list(args)
        bad[index] = value
        with pytest.raises(ValueError, match=message):
            torch.ops.llmc.rope_write_kv(*bad)


def test_rope_write_kv_fake_opcheck_and_dead_code_elimination():
    from llmc.codegen.graph_io import graph_from_json, graph_to_json

    args = kv_write_inputs(torch.bfloat16, True)
    torch.library.opcheck(torch.ops.llmc.rope_write_kv.default, tuple(args))
    with FakeTensorMode() as mode:
        fake = torch.ops.llmc.rope_write_kv(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.shape == args[0].shape and fake.dtype == torch.bfloat16
    # A graph that drops the rotated keys: the write is the node's only effect, so DCE must keep it.
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(f"a{i}") if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    write = graph.call_function(torch.ops.llmc.rope_write_kv.default, tuple(inputs))
    graph.output(inputs[1])
    assert write.is_impure() and not graph.eliminate_dead_code()
    rebuilt = graph_from_json(json.loads(json.dumps(graph_to_json(torch.fx.GraphModule({}, graph)))), {})
    assert [n.target for n in rebuilt.graph.nodes if n.op == "call_function"] == [write.target]
    fresh, expected = ([a.clone() if isinstance(a, torch.Tensor) else a for a in args] for _ in range(2))
    torch.ops.llmc.rope_write_kv(*expected)
    rebuilt(*[a for a in fresh if isinstance(a, torch.Tensor)])
    assert torch.equal(fresh[7], expected[7]) and torch.equal(fresh[8], expected[8])
