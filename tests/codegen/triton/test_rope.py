import pytest
import torch

import llmc.codegen.ops as ops
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.launch import launch_rope, launch_rope_write_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The kernel repeats the reference's roundings step for step; the per-head RMSNorm's statistic is the only sum.
TOLERANCE = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
MAX_LEN = 40


def tables(head_dim, device):
    angles = torch.rand(MAX_LEN, head_dim) * 6.28 * 3
    scale = 1.1  # the attention scaling the tables carry (YaRN); not 1, so it must survive
    return (angles.cos() * scale).to(device), (angles.sin() * scale).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (1, 1, 3, 80), (1, 37, 2, 16)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_matches_reference(device, dtype, shape, with_norm):
    batch, seq, heads, head_dim = shape
    x = (torch.randn(shape) * 2).to(dtype).to(device)
    positions = torch.randint(0, MAX_LEN, (batch, seq)).to(device)
    cos, sin = tables(head_dim, device)
    weight = (1 + 0.3 * torch.randn(head_dim)).to(dtype).to(device) if with_norm else None
    out = launch_rope(x, positions, cos, sin, weight, 1e-6, poison=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ops.rope(x, positions, cos, sin, weight, 1e-6),
                               rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


@pytest.mark.parametrize("with_norm", [False, True])
def test_heads_sliced_from_a_fused_projection(device, with_norm):
    # q and k as views of one [B, S, (Hq + 2 Hkv) * D] projection: strided heads and tokens, 2 heads per block (the last block half empty).
    batch, seq, head_dim = 2, 3, 16
    qkv = torch.randn(batch, seq, (5 + 2 * 2) * head_dim, device=device).view(batch, seq, 9, head_dim)
    q, k = qkv[:, :, :5], qkv[:, :, 5:7]
    positions = torch.randint(0, MAX_LEN, (batch, seq), device=device)
    cos, sin = tables(head_dim, device)
    weight = torch.randn(head_dim, device=device) if with_norm else None
    for x in (q, k):
        out = launch_rope(x, positions, cos, sin, weight, 1e-6, config=Config(block_m=2, num_warps=1), poison=True)
        torch.testing.assert_close(out, ops.rope(x, positions, cos, sin, weight, 1e-6), rtol=1.3e-6, atol=1e-5)


def test_fp32_norm_weight_promotes_bf16_heads(device):
    x = torch.randn(1, 4, 3, 8).to(torch.bfloat16).to(device)
    positions = torch.randint(0, MAX_LEN, (1, 4), device=device)
    cos, sin = tables(8, device)
    weight = torch.randn(8, device=device)
    out = launch_rope(x, positions, cos, sin, weight, 1e-6, poison=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ops.rope(x, positions, cos, sin, weight, 1e-6), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(2, 3, 4, 7)), "even"),
    (dict(positions=torch.zeros(2, 4, dtype=torch.long)), "positions"),
    (dict(cos=torch.randn(MAX_LEN, 8, dtype=torch.float64)), "cos_table"),
])
def test_bad_arguments_are_refused(change, message):
    arguments = dict(x=torch.randn(2, 3, 4, 8), positions=torch.zeros(2, 3, dtype=torch.long),
                     cos=torch.randn(MAX_LEN, 8), sin=torch.randn(MAX_LEN, 8), weight=None) | change
    with pytest.raises(ValueError, match=message):
        launch_rope(arguments["x"], arguments["positions"], arguments["cos"], arguments["sin"], arguments["weight"], 1e-6)


# ---- rope_write_kv: the same kernel, storing the rotated keys and v at their cache slots ----------------------

def kv_write_case(dtype, device, shape, with_norm, layers=3, blocks=9, block_size=4, padding=2):
    """Keys and values (v a strided view of a wider projection), random caches, distinct random slots spread over
    the blocks in no order, the last row's tail padding (-1)."""
    batch, seq, kv_heads, head_dim = shape
    k = (torch.randn(shape) * 2).to(dtype).to(device)
    v = torch.randn(batch, seq, kv_heads + 1, head_dim).to(dtype).to(device)[:, :, 1:]
    positions = torch.randint(0, MAX_LEN, (batch, seq)).to(device)
    cos, sin = tables(head_dim, device)
    weight = (1 + 0.3 * torch.randn(head_dim)).to(dtype).to(device) if with_norm else None
    caches = [torch.randn(layers, blocks, block_size, kv_heads, head_dim).to(dtype).to(device) for _ in range(2)]
    slots = torch.randperm(blocks * block_size)[: batch * seq].view(batch, seq)
    slots[-1, max(1, seq - padding):] = -1  # the first token of a row is never padding
    return [k, v, positions, cos, sin, weight, 1e-6, *caches, 1, slots.to(device)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 2, 10), (1, 2, 3, 80), (3, 4, 1, 18), (2, 3, 5, 16)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope_write_kv_matches_reference(device, dtype, shape, with_norm):
    # Head dims that are not powers of 2; 2 heads per program, so 3 and 5 heads leave a half-empty last block.
    args = kv_write_case(dtype, device, shape, with_norm)
    k, v, positions, cos, sin, weight, eps, k_cache, v_cache, layer, slots = args
    before = [k_cache.cpu().clone(), v_cache.cpu().clone()]
    rotated = ops.rope_write_kv(*[a.cpu().clone() if isinstance(a, torch.Tensor) else a for a in args])
    config = Config(block_m=2, num_warps=1)
    out = launch_rope_write_kv(*args, config=config, poison=True)
    assert out.dtype == dtype
    # The rope kernel's arithmetic exactly; the reference's within the rope tolerance.
    assert torch.equal(out, launch_rope(k, positions, cos, sin, weight, eps, config=config, poison=True))
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu(), rotated, rtol=rtol, atol=atol)
    flat = slots.cpu().flatten()
    keep, targets = flat >= 0, flat[flat >= 0]
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    assert torch.equal(k_cache[layer].flatten(0, 1)[targets], out.cpu().flatten(0, 1)[keep])
    assert torch.equal(v_cache[layer].flatten(0, 1)[targets], v.cpu().flatten(0, 1)[keep])
    # Every other slot, of this layer and the others, is untouched bit for bit.
    untouched = torch.ones(k_cache.shape[:3], dtype=torch.bool)
    untouched[layer].view(-1)[targets] = False
    assert torch.equal(k_cache[untouched], before[0][untouched])
    assert torch.equal(v_cache[untouched], before[1][untouched])
    assert targets.numel() > 0


def test_rope_write_kv_refuses_strided_caches_and_other_dtypes():
    args = kv_write_case(torch.float32, "cpu", (1, 3, 2, 8), False)
    strided = list(args)
    strided[7] = args[7].transpose(1, 2)
    strided[8] = args[8].transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        launch_rope_write_kv(*strided)
    other = list(args)
    other[7], other[8] = args[7].half(), args[8].half()
    with pytest.raises(ValueError, match="model's dtype"):
        launch_rope_write_kv(*other)
