"""The attention_sparse kernel (prefill, and decode + attention_combine) against a float64 computation of the
sparse contract over the launcher's own selection, and against the op's reference; under the interpreter on CPU
(tiny shapes) or compiled on a GPU. Outputs and decode partials are poisoned with NaN before the kernels run.
Also: the launch plans on meta tensors and cross-compiles for sm_80."""
import pytest
import torch

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)
from llmc.codegen.sparse_attention import query_block_count, select_blocks
from llmc.codegen.triton import configs, launch
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.sparse_attention import kept_lists, launch_sparse_paged_attention, tile_sizes
from tests.conftest import paged_step_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against float64: the kernel sums in another order than any reference and rounds the probabilities to the
# dtype before the product with V, as SDPA does (test_attention.py's tolerances).
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def paged_inputs(dtype, device, past_lens, seq, **shape):
    return paged_step_inputs(dtype, past_lens, seq, device=device, **shape)


def cpu(tensors):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors]


def expected_float64(inputs, window, keep, block):
    """The contract in float64 over select_blocks' choice on the same inputs (the launcher's own selection: the
    kernel is judged on attending the kept blocks, the selection rule in tests/codegen/test_sparse_attention.py)."""
    q, k, v, k_cache, v_cache, block_table, past_lens, scale = cpu(inputs)
    kept = select_blocks(q, k, k_cache, block_table, past_lens, scale, window, keep, block)
    seq, heads, block_size = q.shape[1], q.shape[2], k_cache.shape[1]
    group = heads // k.shape[2]
    outs = []
    for b, past in enumerate(past_lens.tolist()):
        positions = torch.arange(past)
        blocks, slots = block_table[b, positions // block_size], positions % block_size
        keys = torch.cat([k_cache[blocks, slots], k[b]]).double().repeat_interleave(group, 1)
        values = torch.cat([v_cache[blocks, slots], v[b]]).double().repeat_interleave(group, 1)
        query_positions, key_positions = past + torch.arange(seq), torch.arange(past + seq)
        offset = query_positions[:, None] - key_positions[None, :]
        visible = (offset >= 0) & ((offset < window) if window > 0 else True)
        query_block = query_positions // block - past // block
        chosen = kept[b][:, query_block][:, :, key_positions // block]  # [H, S, T]
        scores = torch.einsum("shd,thd->hst", q[b].double(), keys) * scale
        weights = scores.masked_fill(~(visible & chosen), float("-inf")).softmax(-1)
        outs.append(torch.einsum("hst,thd->shd", weights, values))
    return torch.stack(outs)


def check(out, expected, dtype):
    assert out.dtype == dtype and out.isfinite().all()
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0])
def test_prefill(device, dtype, window, keep):
    # Pasts of 0, inside a selection block and over several; 7 new tokens straddle query blocks of 8.
    inputs = paged_inputs(dtype, device, past_lens=[0, 9, 21], seq=7)
    out = launch_sparse_paged_attention(*inputs, window, keep, 8, poison=True)
    check(out, expected_float64(inputs, window, keep, 8), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("keep,num_splits", [(0.2, 1), (0.5, 3), (1.0, 2), (0.2, 8)])
def test_decode(device, dtype, window, keep, num_splits):
    # Pasts of 0 (only the new key), 1, a block boundary and a long one; 8 splits leave most of them empty.
    inputs = paged_inputs(dtype, device, past_lens=[0, 1, 8, 37], seq=1)
    out = launch_sparse_paged_attention(*inputs, window, keep, 8, num_splits=num_splits, poison=True)
    check(out, expected_float64(inputs, window, keep, 8), dtype)


@pytest.mark.parametrize("seq", [1, 6])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(3, 3, 10), (8, 1, 80)])
def test_selection_blocks_off_the_cache_blocks_and_head_shapes(device, seq, heads, kv_heads, head_dim):
    # Selection blocks of 6 tokens over cache blocks of 4: key blocks straddle cache blocks and partial tiles.
    inputs = paged_inputs(torch.bfloat16, device, past_lens=[23, 4], seq=seq, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim)
    out = launch_sparse_paged_attention(*inputs, 0, 0.3, 6, poison=True)
    check(out, expected_float64(inputs, 0, 0.3, 6), torch.bfloat16)


@pytest.mark.parametrize("block,block_m,block_n", [(32, 16, 16), (16, 32, 32), (8, 16, 16)])
def test_tile_shapes(device, block, block_m, block_n):
    # Query tiles smaller than a selection block (2 per block), and larger (masked to the block).
    inputs = paged_inputs(torch.float32, device, past_lens=[40, 3], seq=20)
    config = Config(block_m=block_m, block_n=block_n, num_warps=1, num_stages=1)
    out = launch_sparse_paged_attention(*inputs, 0, 0.4, block, config=config, poison=True)
    check(out, expected_float64(inputs, 0, 0.4, block), torch.float32)


def test_the_kernel_is_the_ops_cuda_impl_and_matches_its_reference(device):
    inputs = paged_inputs(torch.float16, device, past_lens=[30, 0], seq=5)
    reference = torch.ops.llmc.sparse_paged_attention(*cpu(inputs), 3, 0.25, 8)
    rtol, atol = TOLERANCE[torch.float16]
    torch.testing.assert_close(launch_sparse_paged_attention(*inputs, 3, 0.25, 8).cpu(), reference, rtol=rtol,
                               atol=atol)
    launch.register_cuda_impls()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("llmc::sparse_paged_attention", "CUDA")
    if device.type == "cuda":
        torch.testing.assert_close(torch.ops.llmc.sparse_paged_attention(*inputs, 3, 0.25, 8).cpu(), reference,
                                   rtol=rtol, atol=atol)


def test_kept_lists_are_ascending_and_counted():
    kept = torch.rand(2, 3, 4, 9) < 0.4
    ordered, count = kept_lists(kept)
    assert ordered.dtype == count.dtype == torch.int32 and ordered.shape == kept.shape
    for row, n, mask in zip(ordered.view(-1, 9), count.flatten(), kept.view(-1, 9)):
        assert row[:n].tolist() == torch.nonzero(mask).flatten().tolist() and (row[n:] == 9).all()


@pytest.mark.parametrize("change,message", [(dict(keep=-1.0), "keep"), (dict(block=0), "block"),
                                            (dict(window=-1), "window")])
def test_bad_arguments_are_refused(change, message):
    arguments = dict(zip(("q", "k", "v", "k_cache", "v_cache", "block_table", "past_lens", "scale"),
                         paged_inputs(torch.float32, "cpu", past_lens=[3], seq=2))) | dict(window=0, keep=0.5,
                                                                                            block=8) | change
    with pytest.raises(ValueError, match=message):
        launch_sparse_paged_attention(**arguments)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def planned_specs(arch: str, seq: int, window: int = 0) -> list:
    """The kernels one bf16 GQA layer's call launches on `arch` (head_dim 128, 8 heads over 2, 16-slot cache
    blocks, selection blocks of 64), planned on meta tensors as `llmc compile` plans them."""
    cache = meta(64, 16, 2, 128)
    with launch.recording(arch) as recorder:
        out = launch_sparse_paged_attention(meta(2, seq, 8, 128), meta(2, seq, 2, 128), meta(2, seq, 2, 128), cache,
                                            cache, meta(2, 8, dtype=torch.int64), meta(2, dtype=torch.int64), 0.088,
                                            window, 0.2, 64)
    assert out.device.type == "meta" and out.shape == (2, seq, 8, 128)
    return recorder.specs


def test_plans_on_meta_tensors():
    prefill, decode = planned_specs("sm_80", 300), planned_specs("sm_80", 1, window=32)
    assert [s.op for s in prefill] == ["attention_sparse"] and [s.op for s in decode] == ["attention_sparse",
                                                                                          "attention_combine"]
    assert prefill[0].signature["kept_ptr"] == prefill[0].signature["kept_count_ptr"] == "*i32"
    config = configs.pick_attention("prefill", "sm_80", 128, 300)
    block_m, block_n = tile_sizes(config, 64)
    source = prefill[0].source.read_text()
    assert f"tiles of {block_n} keys" in source and f"{block_m} queries" in source and "tl.dot" in source
    assert "window" in decode[0].source.read_text() and prefill[0].name != decode[0].name
    assert query_block_count(300, 64) == 6  # 300 queries from any past span at most 6 blocks of 64


def test_a_graphs_sparse_call_is_planned_per_bucket():
    """An exported step with symbolic batch, sequence and table width, planned as `llmc compile` plans it: the
    prefill kernel per sequence-length bucket whose tiles differ, the decode kernel and its combine at S = 1."""
    from llmc.codegen.triton import plan

    class Step(torch.nn.Module):
        def forward(self, q, k, v, k_cache, v_cache, block_table, past_lens):
            return torch.ops.llmc.sparse_paged_attention(q, k, v, k_cache, v_cache, block_table, past_lens, 0.125,
                                                         0, 0.2, 64)

    batch, seq, width = (torch.export.Dim(name) for name in ("batch", "seq", "width"))
    inputs = paged_inputs(torch.bfloat16, "cpu", past_lens=[0, 9], seq=5, heads=8, kv_heads=2, head_dim=64)[:7]
    shapes = ({0: batch, 1: seq},) * 3 + (None, None, {0: batch, 1: width}, {0: batch})
    gm = torch.export.export(Step(), tuple(inputs), dynamic_shapes=shapes).run_decompositions({}).module()
    specs = plan.kernel_specs(gm, "sm_80")
    buckets = {tile_sizes(configs.pick_attention("prefill", "sm_80", 64, size), 64) for size in
               configs.attention_plan_sizes().values()}
    decode = [s for s in specs if "max_ptr" in s.signature]  # the split decode and the combine take partials
    assert sorted(s.op for s in decode) == ["attention_combine", "attention_sparse"]
    assert {s.op for s in specs if s not in decode} == {"attention_sparse"} and len(specs) == len(buckets) + 2
    assert all(s.launches == 1 for s in specs)


@pytest.fixture(scope="module")
def sparse_cubins(tmp_path_factory):
    """The prefill and decode kernels of planned_specs' layer, built for sm_80 in a fresh Triton cache."""
    from llmc.codegen.triton.aot import compile_all

    kernels = [planned_specs("sm_80", 40)[0], planned_specs("sm_80", 1)[0]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        return compile_all(kernels, ["sm_80"], workers=2)


def test_sparse_kernels_cross_compile_to_sm80_elf(sparse_cubins):
    from llmc.runtime.kernels import cubin_arch

    assert len(sparse_cubins.kernels) == 2, "prefill and decode are two kernels"
    for entry in sparse_cubins.kernels.values():
        artifact = entry.artifacts["sm_80"]
        assert artifact.cubin[:4] == b"\x7fELF" and int.from_bytes(artifact.cubin[18:20], "little") == 190
        assert cubin_arch(artifact.cubin) == "sm_80" and artifact.metadata["name"] == entry.spec.name
        assert 0 < artifact.metadata["shared"] <= configs.SHARED_MEMORY["sm_80"]
