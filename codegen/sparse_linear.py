"""2:4 semi-structured sparse linear layers: the weight format, pruning, and the `llmc::sparse_linear` op.

A 2:4-sparse [N, K] weight keeps at most 2 nonzeros in every group of 4 consecutive weights along K (K % 8 == 0).
It is stored compressed, in two tensors:
- values [N, K / 2], the weight's dtype: the 2 kept weights of each group, in K order (group g -> columns 2g, 2g+1);
- meta uint8 [N, K / 8]: per group a 4-bit code idx0 | idx1 << 2, where idx0 < idx1 are the kept positions
  (0..3) inside the group; group 2j in the low nibble of byte j, group 2j + 1 in the high one (pack_int4's order).
That is K / 2 * itemsize + K / 8 bytes a row: 9/16 of a 16-bit dense weight (17/32 of a float32 one).
The layout is CUTLASS's sparse operand before its metadata interleaving: `values` is CUTLASS's packed matrix as
it is, and the bytes of `meta` read as little-endian int16 are its metadata (4 groups an int16, lowest first), so
the CUTLASS path below shares `values` and only reorders `meta`.

The op: sparse_linear(x, values, meta, bias, eps, norm, epilogue) = norm_linear(x, decompress_24(values, meta, K),
bias, eps, norm, epilogue), bit for bit (the reference is norm_linear's arithmetic on the decompressed weight).

On CUDA (sm_80+, float16 / bfloat16) the GEMM runs on the sparse tensor cores through torch's semi-structured
sparse tensors, built once per weight and cached (see `semi_structured_weight`), with the norm prologue and the
SwiGLU epilogue in torch around it. Elsewhere (CPU, an older GPU, float32, a shape the backends refuse, an empty
batch) the reference runs. torch's constraints (torch.sparse.semi_structured, _DTYPE_SHAPE_CONSTRAINTS):
- cuSPARSELt (torch's default where it is built in): float16 / bfloat16 (also int8, fp8 through _scaled_mm) with
  N and K multiples of 16; its own packed layout (values and metadata in one tensor), so it holds a second copy
  of the compressed weight, made from the dense one by torch._cslt_compress.
- CUTLASS: float16 / bfloat16 with N a multiple of 32 and K of 64 (float32 too, but it runs as TF32, which
  misses float32's tolerance, so float32 takes the reference); int16 metadata, reordered to CUTLASS's
  ColumnMajorInterleaved<2> layout; no second copy of the values.
- both: the sparse operand is 2-D and contiguous; the dense one is padded to a multiple of 8 rows and columns by
  torch; the product accumulates in float32 and rounds to x's dtype, as F.linear does.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets
from torch.utils.weak import WeakIdKeyDictionary

from llmc.codegen.ops import _epilogue, _linear_out_shape, _normalize

GROUP = 4  # weights per group along K
KEPT = 2  # nonzeros kept per group
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}


def check_24_shape(n: int, k: int) -> None:
    if k % (2 * GROUP) or k <= 0 or n <= 0:
        raise ValueError(f"a 2:4-sparse weight [{n}, {k}] needs K a positive multiple of 8 (two groups of 4 per "
                         "metadata byte); keep this layer dense")


def _kept_positions(score: torch.Tensor) -> torch.Tensor:
    """score [N, G, 4] -> the positions of the 2 largest of each group, ascending, [N, G, 2] int64.
    Ties go to the lower position: a stable descending sort keeps equal scores in position order."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :KEPT]
    return order.sort(dim=-1).values


def prune_24(w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """w [N, K] with all but the 2 most important of every 4 consecutive weights along K set to zero (same dtype).
    importance (same shape; default |w|) ranks the weights of a group; ties keep the lower index. Works on meta
    tensors (shapes only)."""
    if w.dim() != 2:
        raise ValueError(f"prune_24 takes a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"prune_24: K = {k} is not a multiple of {GROUP}")
    score = w.abs() if importance is None else importance
    if tuple(score.shape) != (n, k):
        raise ValueError(f"prune_24: importance {tuple(score.shape)} must have the weight's shape ({n}, {k})")
    groups = w.reshape(n, k // GROUP, GROUP)
    keep = _kept_positions(score.float().reshape(n, k // GROUP, GROUP))
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=w.device).scatter_(-1, keep, True)
    return torch.where(mask, groups, torch.zeros((), dtype=w.dtype, device=w.device)).reshape(n, k)


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4-sparse [N, K] weight (at most 2 nonzeros per group; prune_24's output) -> (values, meta) in the
    module docstring's layout. A group with fewer nonzeros keeps zeros at its lowest free positions. Raises for a
    group of more than 2 nonzeros. Works on meta tensors (no check there)."""
    if w.dim() != 2:
        raise ValueError(f"compress_24 takes a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    check_24_shape(n, k)
    groups = w.reshape(n, k // GROUP, GROUP)
    nonzero = groups != 0
    if w.device.type != "meta" and bool((nonzero.sum(dim=-1) > KEPT).any()):
        raise ValueError("compress_24: the weight has groups of 4 with more than 2 nonzeros; prune it with "
                         "prune_24 first")
    keep = _kept_positions(nonzero.to(torch.float32))
    values = groups.gather(-1, keep).reshape(n, k // 2)
    codes = (keep[..., 0] | (keep[..., 1] << 2)).to(torch.uint8)  # [N, K / 4]
    return values.contiguous(), (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _check_compressed(values: torch.Tensor, meta: torch.Tensor, k: int) -> int:
    if values.dim() != 2 or meta.dim() != 2:
        raise ValueError(f"2:4 weight: values {tuple(values.shape)} and meta {tuple(meta.shape)} must be 2-D")
    n = values.shape[0]
    check_24_shape(n, k)
    if tuple(values.shape) != (n, k // 2) or tuple(meta.shape) != (n, k // 8) or meta.dtype != torch.uint8:
        raise ValueError(f"2:4 weight of K = {k}: values {tuple(values.shape)} must be [{n}, {k // 2}] and meta "
                         f"{tuple(meta.shape)} {meta.dtype} [{n}, {k // 8}] uint8")
    return n


def decompress_24(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """(values, meta) -> the dense [N, K] weight in values' dtype (compress_24's inverse)."""
    n = _check_compressed(values, meta, k)
    codes = torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(n, k // GROUP)
    positions = torch.stack((codes & 3, codes >> 2), dim=-1).long()  # [N, K / 4, 2]
    dense = values.new_zeros(n, k // GROUP, GROUP)
    return dense.scatter_(-1, positions, values.reshape(n, k // GROUP, KEPT)).reshape(n, k)


def _reference(x, values, meta, bias, eps, norm, epilogue):
    weight = decompress_24(values, meta, 2 * values.shape[1])
    return _epilogue(torch.nn.functional.linear(_normalize(x, norm, eps), weight, bias), epilogue)


@torch.library.custom_op("llmc::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, eps: float,
                  norm: str, epilogue: str) -> torch.Tensor:
    """epilogue(normalize(x) @ W.T + bias) with W = decompress_24(values, meta, K): norm_linear over a 2:4-sparse
    weight stored compressed (module docstring). norm: none | rms | layer; epilogue: none | swiglu."""
    return _reference(x, values, meta, bias, eps, norm, epilogue)


@sparse_linear.register_fake
def _sparse_linear_fake(x, values, meta, bias, eps, norm, epilogue):
    return x.new_empty(_linear_out_shape(x, values, epilogue))


# ---- CUDA: torch's semi-structured sparse tensors (sparse tensor cores, sm_80+) --------------------------------


def semi_structured_backend(capability: tuple[int, int], dtype: torch.dtype, n: int, k: int,
                            cusparselt: bool) -> tuple[str | None, str]:
    """(backend, "") for a weight [N, K] of `dtype` on a GPU of `capability`, cuSPARSELt first where torch has it
    (torch's own default); (None, why not) where neither backend takes it and the reference must run."""
    if tuple(capability) < (8, 0):
        return None, f"sm_{capability[0]}{capability[1]} has no sparse tensor cores (sm_80 and up)"
    if dtype not in SPARSE_DTYPES:
        return None, f"{dtype} weights: the sparse tensor-core path takes float16 / bfloat16"
    for name in (("cusparselt",) if cusparselt else ()) + ("cutlass",):
        limits = BACKENDS[name]._DTYPE_SHAPE_CONSTRAINTS[dtype]
        if n % limits.sparse_min_rows == 0 and k % limits.sparse_min_cols == 0:
            return name, ""
    return None, f"weight [{n}, {k}] is not a multiple of cuSPARSELt's (16, 16) or CUTLASS's (32, 64) tiles"


def cutlass_meta(meta: torch.Tensor) -> torch.Tensor:
    """Our uint8 [N, K / 8] metadata -> CUTLASS's int16 [N, K / 16] in its interleaved order (what
    torch.sparse's sparse_semi_structured_from_dense_cutlass computes from the dense weight). K % 16 == 0."""
    n, cols = meta.shape[0], meta.shape[1] // 2
    as_int16 = meta.contiguous().view(torch.int16)  # little-endian: 4 nibbles an int16, lowest group first
    offsets = _calculate_meta_reordering_scatter_offsets(n, cols, torch.int16, meta.device)
    return as_int16.new_empty(n * cols).scatter_(0, offsets, as_int16.reshape(-1)).view(n, cols)


def semi_structured_weight(values: torch.Tensor, meta: torch.Tensor, backend: str) -> torch.Tensor:
    """The torch SparseSemiStructuredTensor [N, K] of a compressed weight (CUDA tensors) for `backend`:
    cuSPARSELt compresses the decompressed weight into its own layout; CUTLASS reads `values` in place."""
    k = 2 * values.shape[1]
    n = _check_compressed(values, meta, k)
    with warnings.catch_warnings():  # torch warns once that the API is a prototype; we pin what we use in tests
        warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemiStructuredTensor")
        if backend == "cusparselt":
            return SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress_24(values, meta, k))
        if backend == "cutlass":
            return SparseSemiStructuredTensorCUTLASS(torch.Size([n, k]), packed=values.contiguous(),
                                                     meta=cutlass_meta(meta), packed_t=None, meta_t=None,
                                                     compressed_swizzled_bitmask=None)
    raise ValueError(f"unknown semi-structured backend {backend!r}; one of {', '.join(BACKENDS)}")


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, norm: str,
                           epilogue: str) -> torch.Tensor:
    """sparse_linear's arithmetic with a prebuilt semi-structured weight: norm in torch, the sparse GEMM, then
    the epilogue in torch. x [..., K] -> [..., N or N / 2]."""
    h = _normalize(x, norm, eps)
    rows = h.reshape(-1, h.shape[-1]).contiguous()  # the sparse tensors' linear takes a 2-D contiguous operand
    y = torch.nn.functional.linear(rows, weight, bias)
    return _epilogue(y.reshape(*x.shape[:-1], y.shape[-1]), epilogue)


class _Cached:
    """A built semi-structured weight and what it was built from. The cache is keyed weakly by the values
    tensor's identity (an entry dies with its tensor, so a new tensor at a reused address never finds a stale
    one) and checked against the meta tensor, the storage addresses and, outside inference mode, both tensors'
    version counters (an in-place update rebuilds it)."""

    def __init__(self, values, meta, backend, weight):
        self.meta = weakref.ref(meta)
        self.stamp = _stamp(values, meta)
        self.backend, self.weight = backend, weight

    def valid_for(self, values, meta) -> bool:
        return self.meta() is meta and self.stamp == _stamp(values, meta)


def _stamp(values: torch.Tensor, meta: torch.Tensor) -> tuple:
    versions = tuple(None if t.is_inference() else t._version for t in (values, meta))
    return values.data_ptr(), meta.data_ptr(), versions


_CACHE = WeakIdKeyDictionary()


def clear_semi_structured_cache() -> None:
    _CACHE.clear()


def cached_semi_structured_weight(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(the semi-structured weight, backend) for CUDA tensors, built on first use; (None, why not) where the GPU,
    dtype or shape does not qualify."""
    entry = _CACHE.get(values)
    if entry is not None and entry.valid_for(values, meta):
        return entry.weight, entry.backend
    n, k = values.shape[0], 2 * values.shape[1]
    backend, why_not = semi_structured_backend(torch.cuda.get_device_capability(values.device), values.dtype, n, k,
                                               torch.backends.cusparselt.is_available())
    if backend is None:
        return None, why_not
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("llmc::sparse_linear builds its sparse weights on first use: run one step before "
                           "capturing a CUDA graph")
    weight = semi_structured_weight(values, meta, backend)
    _CACHE[values] = _Cached(values, meta, backend, weight)
    return weight, backend


@sparse_linear.register_kernel("cuda")
def _sparse_linear_cuda(x, values, meta, bias, eps, norm, epilogue):
    qualifies = (x.dtype == values.dtype and (bias is None or bias.dtype == x.dtype) and x.numel() > 0
                 and x.shape[-1] == 2 * values.shape[1])
    weight = cached_semi_structured_weight(values, meta)[0] if qualifies else None
    if weight is None:
        return _reference(x, values, meta, bias, eps, norm, epilogue)
    return semi_structured_linear(x, weight, bias, eps, norm, epilogue)
