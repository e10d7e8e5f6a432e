"""llmc::rope_cpu and llmc::rope_write_kv_cpu: llmc::rope and llmc::rope_write_kv (same schema, meaning and fake)
with fewer ops per call, for the CPU where a small model's decode step is bound by the host's per-op cost.

A step calls these once per layer with the same positions and slots: the cos / sin rows of those positions and the
slots' cache coordinates are computed once per step (kept while that positions / slots tensor lives, unchanged:
its version counter is checked) instead of once per layer. The rotation is the reference's arithmetic in the same
order, h * cos + rotate_half(h) * sin in h's dtype (rotate_half as a roll by half the head with the first half of
sin negated: the same products, bit for bit), so the results equal the reference's exactly.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from llmc.codegen import ops

_ROWS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # positions -> (version, tables, dtype, cos, signed sin)
_SLOTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # slots -> (version, block size, (rows kept, block, offset))


def _rows(positions, cos_table, sin_table, dtype):
    key = (positions._version, cos_table, sin_table, dtype)
    entry = _ROWS.get(positions)
    if entry is None or entry[0] != key[0] or entry[1] is not cos_table or entry[2] is not sin_table \
            or entry[3] != dtype:
        cos = cos_table[positions].to(dtype).unsqueeze(2)  # [B, S, 1, D]
        sin = sin_table[positions].to(dtype).unsqueeze(2)
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # rotate_half's minus moved onto sin
        entry = (*key, cos, signed)
        _ROWS[positions] = entry
    return entry[4], entry[5]


def rope_impl(x, positions, cos_table, sin_table, norm_weight, eps):
    h = ops.rms_norm._init_fn(x, norm_weight, eps) if norm_weight is not None else x
    cos, signed_sin = _rows(positions, cos_table, sin_table, h.dtype)
    # rotate_half(h) * sin == roll(h, half) * signed_sin: each product is the same pair of numbers.
    return h * cos + h.roll(h.shape[-1] // 2, dims=-1) * signed_sin


def _coordinates(slots: torch.Tensor, block_size: int):
    entry = _SLOTS.get(slots)
    if entry is None or entry[0] != slots._version or entry[1] != block_size:
        flat = slots.reshape(-1)
        keep = None if bool((flat >= 0).all()) else flat >= 0  # batch padding (-1) is not written
        targets = flat if keep is None else flat[keep]
        entry = (slots._version, block_size, (keep, targets // block_size, targets % block_size))
        _SLOTS[slots] = entry
    return entry[2]


def rope_write_kv_impl(k, v, positions, cos_table, sin_table, norm_weight, eps, k_cache, v_cache, layer, slots):
    out = rope_impl(k, positions, cos_table, sin_table, norm_weight, eps)
    ops.check_kv_write(k, v, out.dtype, k_cache, v_cache, layer, slots)
    keep, block, offset = _coordinates(slots, k_cache.shape[2])
    keys, values = out.reshape(-1, *out.shape[2:]), v.reshape(-1, *v.shape[2:])
    if keep is not None:
        keys, values = keys[keep], values[keep]
    k_cache[layer].index_put_((block, offset), keys)  # a view of one layer: any cache strides, no flattening
    v_cache[layer].index_put_((block, offset), values)
    return out


@torch.library.custom_op("llmc::rope_cpu", mutates_args=())
def rope_cpu(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
             norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """llmc::rope with the step's cos / sin rows computed once (module docstring)."""
    return rope_impl(x, positions, cos_table, sin_table, norm_weight, eps)


@torch.library.custom_op("llmc::rope_write_kv_cpu", mutates_args=("k_cache", "v_cache"))
def rope_write_kv_cpu(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                      sin_table: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """llmc::rope_write_kv with the step's cos / sin rows and cache coordinates computed once (module docstring)."""
    return rope_write_kv_impl(k, v, positions, cos_table, sin_table, norm_weight, eps, k_cache, v_cache, layer,
                              slots)


rope_cpu.register_fake(ops._rope_fake)
rope_write_kv_cpu.register_fake(ops._rope_write_kv_fake)

llmc = torch.ops.llmc
LOWERINGS = {llmc.rope.default: llmc.rope_cpu.default, llmc.rope_write_kv.default: llmc.rope_write_kv_cpu.default}
