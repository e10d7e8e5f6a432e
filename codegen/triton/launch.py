"""One launcher per llmc op: checks the inputs, allocates the outputs, picks the block configuration, loads the
kernel rendered for this spec and launches it (the attention launchers live in attention.py, what every launcher
shares in hooks.py). `register_cuda_impls()` makes the launchers the ops' CUDA implementations, so a graph of llmc
ops runs these kernels on CUDA tensors and the references on CPU.

Launchers run on CPU tensors too when TRITON_INTERPRET=1 (the tests). `poison=True` fills outputs with NaN
before the kernel runs, so an element a kernel fails to write shows up; production allocates them empty.
"""
from __future__ import annotations

import torch
import triton

from llmc.codegen import ops
from llmc.codegen.triton import attention, configs, quant
from llmc.codegen.triton.attention import launch_causal_attention, launch_paged_attention
from llmc.codegen.triton.quant import launch_quant_linear
from llmc.codegen.triton import sparse_attention
from llmc.codegen.triton.sparse_attention import launch_sparse_paged_attention
from llmc.codegen.triton.configs import Config
from llmc.codegen.triton.hooks import current_arch, load, recording, using  # noqa: F401  (re-exported)
from llmc.codegen.triton.hooks import dtype_name as _dtype_name, empty_output as _empty


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as [rows, width] with unit stride along width (a view when x allows one, else a copy)."""
    rows = x.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_last_dim(x: torch.Tensor, weight: torch.Tensor, what: str) -> int:
    width = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != width:
        raise ValueError(f"{what} weight has shape {tuple(weight.shape)}; expected ({width},), x's last dim")
    return width


def _row_norm(op: str, x, residual, weight, eps, config, poison):
    width = _check_last_dim(x, weight, op)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    rows = _rows(x, width)
    count = rows.shape[0]
    out = _empty(x.shape, out_dtype, x.device, poison)
    total = _empty(x.shape, x.dtype, x.device, poison) if residual is not None else None
    if count == 0:
        return out if residual is None else (total, out)
    config = config or configs.pick(op, current_arch(x.device), count, width)
    block_n = min(triton.next_power_of_2(width), config.block_n)
    num_warps = max(1, min(config.num_warps, block_n // 256))
    kernel = load(op, dtype=_dtype_name(x, "x"), weight_dtype=_dtype_name(weight, "weight"),
                  out_dtype=_dtype_name(out, "output"), n=width, block_n=block_n, num_warps=num_warps)
    weight = weight.contiguous()
    if residual is None:
        kernel[(count,)](rows, weight, out, rows.stride(0), eps, num_warps=num_warps)
        return out
    residual_rows = _rows(residual, width)
    kernel[(count,)](rows, residual_rows, total, weight, out, rows.stride(0), residual_rows.stride(0), eps,
                     num_warps=num_warps)
    return total, out


def launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, config: Config | None = None,
                    poison: bool = False) -> torch.Tensor:
    return _row_norm("rms_norm", x, None, weight, eps, config, poison)


def launch_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                        config: Config | None = None, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _row_norm("add_rms_norm", x, residual, weight, eps, config, poison)


def _linear(op, x, residual, weight, bias, eps, norm, epilogue, config, poison):
    if norm not in ops.NORMS or epilogue not in ops.EPILOGUES:
        raise ValueError(f"{op}: norm {norm!r} / epilogue {epilogue!r}; norm one of {ops.NORMS}, "
                         f"epilogue one of {ops.EPILOGUES}")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} {weight.dtype} must be [N, {k}] in x's {x.dtype}")
    total_n = weight.shape[0]
    if epilogue == "swiglu" and total_n % 2:
        raise ValueError(f"{op}: swiglu needs an even number of weight rows ([gate; up]), got {total_n}")
    if bias is not None and (bias.shape != (total_n,) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} {bias.dtype} must be ({total_n},) in {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    n = total_n // 2 if epilogue == "swiglu" else total_n
    rows = _rows(x, k)
    m = rows.shape[0]
    out = _empty((*x.shape[:-1], n), x.dtype, x.device, poison)
    total = _empty(x.shape, x.dtype, x.device, poison) if residual is not None else None
    if m == 0 or n == 0:
        return out if residual is None else (total, out)
    if config is None:
        arch = current_arch(x.device)
        config = configs.fit_shared_memory(configs.pick(op, arch, m, n, k, epilogue), arch, x.element_size(),
                                           weight_tiles=2 if epilogue == "swiglu" else 1)
    kernel = load(op, dtype=_dtype_name(x, "x"), n=n, k=k, norm=norm, epilogue=epilogue, has_bias=bias is not None,
                  block_m=config.block_m, block_n=config.block_n, block_k=config.block_k,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    args = [rows]
    if residual is not None:
        residual_rows = _rows(residual, k)
        args += [residual_rows, total]
    args.append(weight.contiguous())
    if bias is not None:
        args.append(bias.contiguous())
    args += [out, m, rows.stride(0)]
    if residual is not None:
        args.append(residual_rows.stride(0))
    kernel[grid](*args, eps, num_warps=config.num_warps, num_stages=config.num_stages)
    return out if residual is None else (total, out)


def launch_norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, norm: str,
                       epilogue: str, *, config: Config | None = None, poison: bool = False) -> torch.Tensor:
    return _linear("norm_linear", x, None, weight, bias, eps, norm, epilogue, config, poison)


def launch_add_norm_linear(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           eps: float, norm: str, epilogue: str, *, config: Config | None = None,
                           poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear("add_norm_linear", x, residual, weight, bias, eps, norm, epilogue, config, poison)


def _rope(op: str, x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
          norm_weight: torch.Tensor | None, eps: float, config: Config | None, poison: bool,
          write: tuple | None = None) -> torch.Tensor:
    """rope's launch; with write = (v, k_cache_layer, v_cache_layer, slots), rope_write_kv's (one kernel)."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected [batch, seq, heads, head_dim]")
    batch, seq, heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim {head_dim} must be even (the rotation pairs halves)")
    if positions.shape != (batch, seq):
        raise ValueError(f"{op}: positions {tuple(positions.shape)} must be [batch, seq] = ({batch}, {seq})")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if table.dim() != 2 or table.shape[1] != head_dim or table.dtype != torch.float32:
            raise ValueError(f"{op}: {name} {tuple(table.shape)} {table.dtype} must be [max_len, {head_dim}] "
                             "float32")
    if norm_weight is not None:
        _check_last_dim(x, norm_weight, f"{op} norm")
    out_dtype = torch.promote_types(norm_weight.dtype, x.dtype) if norm_weight is not None else x.dtype
    out = _empty(x.shape, out_dtype, x.device, poison)
    tokens = batch * seq
    if tokens == 0 or heads == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    config = config or configs.pick(op, current_arch(x.device), tokens, heads, head_dim)
    block_h = min(triton.next_power_of_2(config.block_m), triton.next_power_of_2(heads))
    kernel = load(op, dtype=_dtype_name(x, "x"), out_dtype=_dtype_name(out, "output"), heads=heads,
                  head_dim=head_dim, has_norm=norm_weight is not None, block_h=block_h, num_warps=config.num_warps)
    args = [x, positions.contiguous(), cos_table.contiguous(), sin_table.contiguous()]
    if norm_weight is not None:
        args.append(norm_weight.contiguous())
    args.append(out)
    if write is not None:
        v, k_cache_layer, v_cache_layer, slots = write
        v = v if v.stride(-1) == 1 else v.contiguous()
        args += [v, slots.contiguous(), k_cache_layer, v_cache_layer]
    args += [seq, x.stride(0), x.stride(1), x.stride(2)]
    if write is not None:
        args += [v.stride(0), v.stride(1), v.stride(2)]
    args.append(eps)
    kernel[(tokens, triton.cdiv(heads, block_h))](*args, num_warps=config.num_warps)
    return out


def launch_rope(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                norm_weight: torch.Tensor | None, eps: float, *, config: Config | None = None,
                poison: bool = False) -> torch.Tensor:
    return _rope("rope", x, positions, cos_table, sin_table, norm_weight, eps, config, poison)


def launch_rope_write_kv(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                         sin_table: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, layer: int, slots: torch.Tensor, *, config: Config | None = None,
                         poison: bool = False) -> torch.Tensor:
    """rope's kernel, which also stores the rotated keys and v at their slots of layer `layer` of the caches. The
    slots are not checked against the caches' size here (that would read them back from the GPU every step):
    the runtime computes them from blocks it allocated."""
    out_dtype = torch.promote_types(norm_weight.dtype, k.dtype) if norm_weight is not None else k.dtype
    ops.check_kv_write(k, v, out_dtype, k_cache, v_cache, layer, slots)
    k_layer, v_layer = k_cache.select(0, layer), v_cache.select(0, layer)
    if not (k_layer.is_contiguous() and v_layer.is_contiguous()):
        raise ValueError("rope_write_kv: each layer of the caches must be contiguous [NB, BS, Hkv, D], as "
                         "PagedKVCache allocates them")
    return _rope("rope_write_kv", k, positions, cos_table, sin_table, norm_weight, eps, config, poison,
                 (v, k_layer, v_layer, slots))


LAUNCHERS = {"rms_norm": launch_rms_norm, "add_rms_norm": launch_add_rms_norm, "norm_linear": launch_norm_linear,
             "add_norm_linear": launch_add_norm_linear, "rope": launch_rope, "rope_write_kv": launch_rope_write_kv,
             "causal_attention": launch_causal_attention, "paged_attention": launch_paged_attention}
LAUNCHERS["quant_linear"] = launch_quant_linear
LAUNCHERS["sparse_paged_attention"] = launch_sparse_paged_attention
# The kernels (templates) each launcher may launch: KernelSpec.op names these.
KERNELS = {op: (op,) for op in LAUNCHERS} | {"causal_attention": ("attention_prefill",),
                                             "paged_attention": ("attention_prefill", "attention_decode",
                                                                 "attention_combine")}
KERNELS["quant_linear"] = ("quant_linear_a16", "quant_linear_rows", "quant_linear_a8")
KERNELS["sparse_paged_attention"] = ("attention_sparse", "attention_combine")


def register_cuda_impls() -> None:
    """Registers every launcher as its llmc op's CUDA kernel; calling it again changes nothing."""
    for op, launcher in LAUNCHERS.items():
        qualified = f"llmc::{op}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"):
            torch.library.register_kernel(qualified, "cuda", launcher)


def example_inputs(op: str, shapes: dict, dtype: torch.dtype, device: str, *, norm: str = "rms",
                   epilogue: str = "none", bias: bool = False, with_norm_weight: bool = True,
                   **quant_options) -> tuple:
    """Random inputs of `op` for shapes {"m": tokens, "n": out features / hidden / heads, "k": in features /
    head_dim} (rope: m = batch * seq as [1, m]), in the launcher's argument order (for autotune and benchmarks).
    Attention ops take attention.example_inputs' shapes (b, s, h, kv, d, past, bs, window)."""
    if op == "sparse_paged_attention":  # shapes also keep, block (sparse_attention.example_inputs)
        return sparse_attention.example_inputs(shapes, dtype, device)
    if op in configs.ATTENTION_OPS:
        return attention.example_inputs(op, shapes, dtype, device)
    if op == "quant_linear":  # quant_options: scheme, group_size (quant.example_inputs)
        return quant.example_inputs(shapes, dtype, device, norm=norm, epilogue=epilogue, bias=bias, **quant_options)
    m, n, k = shapes["m"], shapes["n"], shapes.get("k", 0)
    eps = 1e-6

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=device).mul_(scale).to(dtype)

    if op == "rms_norm":
        return rand(m, n), rand(n), eps
    if op == "add_rms_norm":
        return rand(m, n), rand(m, n), rand(n), eps
    if op in ("norm_linear", "add_norm_linear"):
        rows = 2 * n if epilogue == "swiglu" else n
        weight, bias_tensor = rand(rows, k, scale=k ** -0.5), rand(rows) if bias else None
        if op == "norm_linear":
            return rand(m, k), weight, bias_tensor, eps, norm, epilogue
        return rand(m, k), rand(m, k), weight, bias_tensor, eps, norm, epilogue
    if op == "rope":
        max_len = max(m, 16)
        angles = torch.rand(max_len, k, device=device) * 6.28
        positions = torch.randint(0, max_len, (1, m), device=device)
        weight = rand(k) if with_norm_weight else None
        return rand(1, m, n, k), positions, angles.cos(), angles.sin(), weight, eps
    if op == "rope_write_kv":
        max_len, block_size = max(m, 16), 16
        angles = torch.rand(max_len, k, device=device) * 6.28
        positions = torch.randint(0, max_len, (1, m), device=device)
        weight = rand(k) if with_norm_weight else None
        num_blocks = -(-m // block_size) + 1
        caches = [rand(1, num_blocks, block_size, n, k) for _ in range(2)]
        slots = torch.randperm(num_blocks * block_size, device=device)[:m].view(1, m)
        return rand(1, m, n, k), rand(1, m, n, k), positions, angles.cos(), angles.sin(), weight, eps, *caches, 0, slots
    raise ValueError(f"no Triton kernel for op {op!r}; known: {', '.join(LAUNCHERS)}")
