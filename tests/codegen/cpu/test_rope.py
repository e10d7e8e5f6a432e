"""llmc::rope_cpu / rope_write_kv_cpu (codegen/cpu/rope.py) equal their references bit for bit on fresh random
inputs (fp32, bf16, fp16; with and without Qwen3's q/k norm; batch padding in the slots), across the layers of a
step that share positions and slots, and after those tensors change in place."""
import pytest
import torch

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)

llmc = torch.ops.llmc
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tables(max_len=64, dim=16):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim))
    angles = torch.outer(torch.arange(max_len).float(), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * 1.1, angles.sin() * 1.1  # a scaling factor, as YaRN's tables carry


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_rope_cpu_equals_the_reference(dtype, norm):
    cos, sin = tables()
    x = torch.randn(3, 5, 4, 16).to(dtype)
    positions = torch.randint(0, 63, (3, 5))  # 63: the +1 below stays inside the 64-row tables
    weight = torch.rand(16).to(dtype) + 0.5 if norm else None
    for _ in range(2):  # the second call (another layer) reuses the step's rows
        assert torch.equal(llmc.rope_cpu(x, positions, cos, sin, weight, 1e-6),
                           llmc.rope(x, positions, cos, sin, weight, 1e-6))
    positions.add_(1)  # changed in place: the rows are computed anew
    assert torch.equal(llmc.rope_cpu(x, positions, cos, sin, weight, 1e-6),
                       llmc.rope(x, positions, cos, sin, weight, 1e-6))
    other = (cos * 0.5, sin * 0.5)  # other tables with the same positions
    assert torch.equal(llmc.rope_cpu(x, positions, *other, weight, 1e-6),
                       llmc.rope(x, positions, *other, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_rope_write_kv_cpu_writes_what_the_reference_writes(dtype, padded):
    cos, sin = tables()
    layers, blocks, block_size = 3, 9, 4
    k, v = (torch.randn(2, 3, 2, 16).to(dtype) for _ in range(2))
    positions = torch.randint(0, 64, (2, 3))
    slots = torch.randperm(blocks * block_size)[:6].reshape(2, 3)
    if padded:
        slots[1, 2] = -1
    ours = [torch.randn(layers, blocks, block_size, 2, 16).to(dtype) for _ in range(2)]
    theirs = [c.clone() for c in ours]
    for layer in range(layers):  # every layer of a step: the same positions and slots
        got = llmc.rope_write_kv_cpu(k, v, positions, cos, sin, None, 1e-6, *ours, layer, slots)
        want = llmc.rope_write_kv(k, v, positions, cos, sin, None, 1e-6, *theirs, layer, slots)
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    slots[0, 0] = (slots[0, 0] + 1) % (blocks * block_size)  # a new step's slots in the same tensor
    if slots[0, 0] in slots.reshape(-1)[1:]:
        slots[0, 0] = -1
    llmc.rope_write_kv_cpu(k, v, positions, cos, sin, None, 1e-6, *ours, 0, slots)
    llmc.rope_write_kv(k, v, positions, cos, sin, None, 1e-6, *theirs, 0, slots)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
