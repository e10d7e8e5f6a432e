"""The attention kernels (attention_prefill, attention_decode + attention_combine) against a float64 computation
of the contract, under the interpreter on CPU (tiny shapes: the interpreter pays per program and per op) or
compiled on a GPU. Outputs and decode partials are poisoned with NaN before the kernels run."""
import pytest
import torch

import llmc.codegen.ops as ops
from llmc.codegen.triton import configs
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.launch import launch_causal_attention, launch_paged_attention
from tests.conftest import dense_attention_float64, paged_step_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against float64: the kernels sum in another order than any reference and round the probabilities to the dtype
# before the product with V, as SDPA does.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def causal_float64(q, k, v, scale, window):
    positions = torch.arange(q.shape[1])
    return torch.stack([dense_attention_float64(q[b], k[b], v[b], scale, positions, positions, window)
                        for b in range(q.shape[0])])


def paged_float64(q, k, v, k_cache, v_cache, block_table, past_lens, scale, window):
    block_size, seq = k_cache.shape[1], q.shape[1]
    outs = []
    for b, past in enumerate(past_lens.tolist()):
        blocks = block_table[b, torch.arange(past) // block_size]
        slots = torch.arange(past) % block_size
        keys, values = torch.cat([k_cache[blocks, slots], k[b]]), torch.cat([v_cache[blocks, slots], v[b]])
        outs.append(dense_attention_float64(q[b], keys, values, scale, past + torch.arange(seq), torch.arange(past + seq),
                                  window))
    return torch.stack(outs)


def check(out, expected, dtype, seq_lens=None):
    assert out.dtype == dtype
    out = out.cpu().double()
    if seq_lens is not None:  # padded query rows may hold any finite value
        assert out.isfinite().all()
        keep = torch.arange(out.shape[1])[None, :] < torch.tensor(seq_lens)[:, None]
        out, expected = out[keep], expected[keep]
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


def rand(*shape, dtype, device):
    return torch.randn(*shape).to(dtype).to(device)


def paged_inputs(dtype, device, past_lens, seq, **shape):
    return paged_step_inputs(dtype, past_lens, seq, device=device, **shape)


def cpu(tensors):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("head_dim", [10, 64, 80])
def test_causal_attention(device, dtype, heads, kv_heads, head_dim):
    # 21 queries: one full block of 16 and a partial one.
    q = rand(1, 21, heads, head_dim, dtype=dtype, device=device)
    k, v = (rand(1, 21, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    out = launch_causal_attention(q, k, v, head_dim ** -0.5, 0, poison=True)
    check(out, causal_float64(q.cpu(), k.cpu(), v.cpu(), head_dim ** -0.5, 0), dtype)


@pytest.mark.parametrize("seq,block_m,block_n", [(16, 16, 16), (23, 16, 16), (23, 32, 16), (23, 16, 32),
                                                 (40, 32, 32)])
@pytest.mark.parametrize("window", [0, 6])
def test_causal_attention_block_shapes_and_window(device, seq, block_m, block_n, window):
    q = rand(2, seq, 2, 16, dtype=torch.float32, device=device)
    k, v = (rand(2, seq, 1, 16, dtype=torch.float32, device=device) for _ in range(2))
    config = Config(block_m=block_m, block_n=block_n, num_warps=1, num_stages=1)
    out = launch_causal_attention(q, k, v, 0.3, window, config=config, poison=True)
    check(out, causal_float64(q.cpu(), k.cpu(), v.cpu(), 0.3, window), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
def test_paged_prefill(device, dtype, window):
    # Past lengths on and off block boundaries, and a sequence without a past; 6 new tokens each.
    inputs = paged_inputs(dtype, device, past_lens=[0, 8, 13], seq=6)
    out = launch_paged_attention(*inputs, window, poison=True)
    check(out, paged_float64(*cpu(inputs), window), dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 3, 10), (8, 1, 80)])
@pytest.mark.parametrize("window", [0, 7])
def test_paged_prefill_heads_and_window(device, heads, kv_heads, head_dim, window):
    inputs = paged_inputs(torch.bfloat16, device, past_lens=[11, 0], seq=3, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim)
    check(launch_paged_attention(*inputs, window, poison=True), paged_float64(*cpu(inputs), window), torch.bfloat16)


def test_paged_prefill_right_padded_rows(device):
    # Sequence 0 has 2 real tokens of the batch's 5: its padded rows must stay finite, the real ones exact.
    inputs = paged_inputs(torch.float16, device, past_lens=[9, 4], seq=5)
    out = launch_paged_attention(*inputs, 0, poison=True)
    check(out, paged_float64(*cpu(inputs), 0), torch.float16, seq_lens=[2, 5])


@pytest.mark.parametrize("window", [0, 4])
def test_chunked_prefill_equals_one_shot(device, window):
    """A 13-token prompt as one causal_attention call, and as chunks of 5, 4, 4 through paged_attention, each
    chunk's keys and values written into the cache before the next: the same outputs."""
    block_size, heads, kv_heads, head_dim, total = 4, 4, 2, 16, 13
    q = rand(1, total, heads, head_dim, dtype=torch.bfloat16, device=device)
    k, v = (rand(1, total, kv_heads, head_dim, dtype=torch.bfloat16, device=device) for _ in range(2))
    one_shot = launch_causal_attention(q, k, v, 0.25, window, poison=True)
    k_cache = torch.full((6, block_size, kv_heads, head_dim), float("nan"), dtype=torch.bfloat16, device=device)
    v_cache = k_cache.clone()
    block_table = torch.tensor([[5, 2, 0, 3]], device=device)
    chunks, past = [], 0
    for length in (5, 4, 4):
        new = slice(past, past + length)
        past_lens = torch.tensor([past], device=device)
        chunks.append(launch_paged_attention(q[:, new], k[:, new], v[:, new], k_cache, v_cache, block_table,
                                             past_lens, 0.25, window, poison=True))
        positions = torch.arange(past, past + length, device=device)
        blocks, slots = block_table[0, positions // block_size], positions % block_size
        k_cache[blocks, slots], v_cache[blocks, slots] = k[0, new], v[0, new]
        past += length
    chunked = torch.cat(chunks, 1)
    # Tiles fall on other key boundaries in the two runs, so they agree to rounding, not bit for bit.
    check(chunked, one_shot.cpu().double(), torch.bfloat16)
    check(chunked, causal_float64(q.cpu(), k.cpu(), v.cpu(), 0.25, window), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_k(device, dtype, heads, kv_heads, num_splits):
    # Pasts of 0 (only the new key), one key, a block boundary and a long one: with 8 splits most are empty
    # for the short sequences, several hold keys for the long one.
    inputs = paged_inputs(dtype, device, past_lens=[0, 1, 8, 37], seq=1, heads=heads, kv_heads=kv_heads)
    out = launch_paged_attention(*inputs, 0, num_splits=num_splits, poison=True)
    check(out, paged_float64(*cpu(inputs), 0), dtype)


def test_decode_more_splits_than_one_combine_step(device):
    # 20 splits: the combine merges them 16 at a time, rescaling the first group's sums when the second holds
    # a larger score: the new key (in the last split), 20 times longer than the cached ones, for about half of
    # the 16 (sequence, head) rows.
    inputs = paged_inputs(torch.float32, device, past_lens=[37, 60], seq=1, heads=8, kv_heads=2)
    inputs[1] = inputs[1] * 20
    out = launch_paged_attention(*inputs, 0, num_splits=20, poison=True)
    check(out, paged_float64(*cpu(inputs), 0), torch.float32)


@pytest.mark.parametrize("window", [1, 5, 30])
@pytest.mark.parametrize("head_dim", [10, 64])
def test_decode_window_and_head_dims(device, window, head_dim):
    inputs = paged_inputs(torch.float32, device, past_lens=[3, 29], seq=1, heads=4, kv_heads=1, head_dim=head_dim)
    out = launch_paged_attention(*inputs, window, num_splits=4, poison=True)
    check(out, paged_float64(*cpu(inputs), window), torch.float32)


def test_decode_default_splits_follow_the_table(device):
    inputs = paged_inputs(torch.float16, device, past_lens=[21, 50], seq=1)
    out = launch_paged_attention(*inputs, 0, poison=True)
    check(out, paged_float64(*cpu(inputs), 0), torch.float16)


def test_launchers_match_the_references(device):
    # The graph's CPU path (the references) and the kernels agree on the same inputs.
    inputs = paged_inputs(torch.bfloat16, device, past_lens=[5, 0], seq=4)
    for window in (0, 3):
        rtol, atol = TOLERANCE[torch.bfloat16]
        torch.testing.assert_close(launch_paged_attention(*inputs, window).cpu(),
                                   ops.paged_attention(*cpu(inputs), window), rtol=rtol, atol=atol)
        torch.testing.assert_close(launch_causal_attention(*inputs[:3], 0.3, window).cpu(),
                                   ops.causal_attention(*cpu(inputs[:3]), 0.3, window), rtol=rtol, atol=atol)


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.randn(1, 2, 3, 8)), "multiple of Hkv"),
    (dict(k_cache=torch.randn(4, 4, 2, 16)), "k_cache"),
    (dict(block_table=torch.zeros(1, 3, dtype=torch.int32)), "block_table"),
    (dict(past_lens=torch.zeros(2, dtype=torch.int64)), "past_lens"),
    (dict(window=-1), "window"),
    (dict(q=torch.randn(1, 2, 4, 16, dtype=torch.float64), k=torch.randn(1, 2, 2, 16, dtype=torch.float64),
          v=torch.randn(1, 2, 2, 16, dtype=torch.float64)), "float64"),
])
def test_bad_arguments_are_refused(change, message):
    arguments = dict(q=torch.randn(1, 2, 4, 16), k=torch.randn(1, 2, 2, 16), v=torch.randn(1, 2, 2, 16),
                     k_cache=torch.randn(4, 4, 2, 16), v_cache=torch.randn(4, 4, 2, 16),
                     block_table=torch.zeros(1, 3, dtype=torch.int64), past_lens=torch.zeros(1, dtype=torch.int64),
                     scale=0.25, window=0) | change
    if "k_cache" in change:
        arguments["k_cache"] = arguments["k_cache"].half()
    with pytest.raises(ValueError, match=message):
        launch_paged_attention(**arguments)


def test_head_dim_above_the_table_is_refused():
    with pytest.raises(ValueError, match="head_dim up to 256"):
        configs.pick_attention("prefill", "sm_90", 320, 100)


@pytest.fixture(scope="module")
def attention_cubins(tmp_path_factory):
    """The prefill and split-K decode kernels of a bf16 GQA layer (head_dim 128, 8 heads over 2), planned on meta
    tensors as `llmc compile` plans them, built for sm_80 and sm_90 in a fresh Triton cache."""
    from llmc.codegen.triton import launch
    from llmc.codegen.triton.aot import compile_all

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    specs = {}
    for seq in (1, 40):
        cache = meta(64, 16, 2, 128)
        with launch.recording("sm_80") as recorder:
            launch_paged_attention(meta(2, seq, 8, 128), meta(2, seq, 2, 128), meta(2, seq, 2, 128), cache, cache,
                                   meta(2, 8, dtype=torch.int64), meta(2, dtype=torch.int64), 0.088, 0)
        specs |= {spec.op: spec for spec in recorder.specs}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        return compile_all([specs["attention_prefill"], specs["attention_decode"]], ["sm_80", "sm_90"], workers=2)


def test_attention_kernels_cross_compile_to_cuda_elf(attention_cubins):
    from llmc.runtime.kernels import cubin_arch

    assert {entry.spec.op for entry in attention_cubins.kernels.values()} == {"attention_prefill", "attention_decode"}
    for entry in attention_cubins.kernels.values():
        for arch in ("sm_80", "sm_90"):
            artifact = entry.artifacts[arch]
            assert artifact.cubin[:4] == b"\x7fELF" and int.from_bytes(artifact.cubin[18:20], "little") == 190
            # Triton <= 3.8 builds sm_90 as arch-specific sm_90a, 3.9 as plain sm_90: both run on 9.0 (the loader
            # accepts either, runtime/kernels.py).
            assert cubin_arch(artifact.cubin).removesuffix("a") == arch
            assert artifact.metadata["name"] == entry.spec.name
            assert 0 < artifact.metadata["shared"] <= configs.SHARED_MEMORY[arch]
