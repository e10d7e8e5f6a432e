"""Activation statistics of every GEMM's input, measured by running a graph on calibration inputs.

The GEMMs are those the fusion passes leave (`Gemm.of`): `llmc.norm_linear(x, W, ...)`,
`llmc.add_norm_linear(x, r, W, ...)` and `aten.linear(x, W, b)`. What a GEMM multiplies is its normalised input
h = normalize(x [+ r]) (computed as the op does, in x's dtype); a norm's gain is already folded into W, so h is
exactly the matrix the weight meets. Per input channel k, over every row of every calibration input:
- amax |h_k| (SmoothQuant's activation range), mean |h_k| (AWQ's saliency), sqrt(sum h_k^2) (Wanda's norm);
- a uniform random sample of at most `sample_rows` rows (seeded, so two runs agree), on which AWQ searches scales.
Results are keyed by the GEMM's weight get_attr name, which the prefill and decode graphs share, so stats measured
on the prefill graph serve the decode graph (PassContext.calibration_stats).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

import llmc.codegen.ops  # noqa: F401  (registers torch.ops.llmc)
from llmc.codegen.ops import _normalize
from llmc.common.errors import LlmcError

from .graph_weights import is_weight, read, val

aten, llmc = torch.ops.aten, torch.ops.llmc
SAMPLE_ROWS = 256


class CalibrationError(LlmcError, ValueError):
    """Calibration cannot run (no inputs, no weights); the message says what to give instead."""


class Gemm:
    """One GEMM of a fused graph: inputs (x, or x and the residual r it adds first), weight and bias get_attr
    nodes, and the norm prologue / epilogue it applies."""

    def __init__(self, node: Node, inputs: list, weight: Node, bias: Node | None, eps: float, norm: str,
                 epilogue: str):
        self.node, self.inputs, self.weight, self.bias = node, inputs, weight, bias
        self.eps, self.norm, self.epilogue = eps, norm, epilogue

    @property
    def adds_residual(self) -> bool:
        return len(self.inputs) == 2

    @staticmethod
    def of(node: Node) -> Gemm | None:
        if node.op != "call_function" or node.kwargs:
            return None
        if node.target == aten.linear.default:
            x, weight, bias = (*node.args, None)[:3]
            gemm = Gemm(node, [x], weight, bias, 0.0, "none", "none")
        elif node.target == llmc.norm_linear.default:
            x, weight, bias, eps, norm, epilogue = node.args
            gemm = Gemm(node, [x], weight, bias, eps, norm, epilogue)
        elif node.target == llmc.add_norm_linear.default:
            x, residual, weight, bias, eps, norm, epilogue = node.args
            gemm = Gemm(node, [x, residual], weight, bias, eps, norm, epilogue)
        else:
            return None
        w = val(weight) if is_weight(weight) else None
        if w is None or w.dim() != 2 or not (gemm.bias is None or is_weight(gemm.bias)):
            return None
        return gemm

    def normalized_input(self, values: list[torch.Tensor]) -> torch.Tensor:
        """h from the runtime values of `inputs`, as the op computes it."""
        x = values[0] + values[1] if self.adds_residual else values[0]
        return _normalize(x, self.norm, self.eps)


def gemms(gm: GraphModule) -> list[Gemm]:
    return [g for g in map(Gemm.of, gm.graph.nodes) if g is not None]


@dataclass
class Stats:
    """One GEMM's input over the calibration set; float32 tensors over its K input channels."""

    amax: torch.Tensor  # [K] max |h_k|
    abs_sum: torch.Tensor  # [K] sum |h_k|
    square_sum: torch.Tensor  # [K] sum h_k^2
    rows: int  # rows seen
    sample: torch.Tensor  # [<= sample_rows, K] rows drawn uniformly without replacement
    # What a pass derived from these stats (AWQ's searched scales), so the decode graph gets the prefill
    # graph's tensors without searching again.
    derived: dict = field(default_factory=dict)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    @property
    def l2_norm(self) -> torch.Tensor:
        return self.square_sum.sqrt()


class StatsBuilder:
    """Accumulates rows (on their device; the Stats land on the cpu, beside the weights). The sample keeps the
    rows with the largest random keys: a uniform sample of all rows seen."""

    def __init__(self, k: int, sample_rows: int, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.cap = sample_rows
        self.amax, self.sample, self.keys = torch.zeros(k), torch.zeros(0, k), torch.zeros(0)
        self.abs_sum, self.square_sum = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        self.rows = 0

    def add(self, h: torch.Tensor) -> None:
        h = h.detach().reshape(-1, h.shape[-1]).float()
        if h.device != self.amax.device:
            for name in ("amax", "sample", "keys", "abs_sum", "square_sum"):
                setattr(self, name, getattr(self, name).to(h.device))
        if h.shape[0]:
            self.amax = torch.maximum(self.amax, h.abs().amax(dim=0))
        self.abs_sum += h.abs().sum(dim=0, dtype=torch.float64)
        self.square_sum += h.double().pow(2).sum(dim=0)
        self.rows += h.shape[0]
        keys = torch.cat((self.keys, torch.rand(h.shape[0], generator=self.generator).to(h.device)))
        rows = torch.cat((self.sample, h))
        keep = keys.topk(min(self.cap, keys.numel())).indices.sort().values
        self.sample, self.keys = rows[keep], keys[keep]

    def finish(self) -> Stats:
        return Stats(self.amax.cpu(), self.abs_sum.float().cpu(), self.square_sum.float().cpu(), self.rows,
                     self.sample.cpu())


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule, builders: dict[str, StatsBuilder], watched: dict[Node, Gemm]):
        super().__init__(gm)
        self.builders, self.watched = builders, watched

    def run_node(self, node: Node):
        gemm = self.watched.get(node)
        if gemm is not None:
            values = [self.env[i] for i in gemm.inputs]
            self.builders[gemm.weight.target].add(gemm.normalized_input(values))
        return super().run_node(node)


def collect_stats(gm: GraphModule, inputs_list, weight_names=None, sample_rows: int = SAMPLE_ROWS,
                  seed: int = 0) -> dict[str, Stats]:
    """Runs gm on every input tuple of `inputs_list` (cloned, as the pipeline's check does, so a graph that
    writes into an input cannot change the caller's) and returns the Stats of each GEMM's input by weight name:
    every GEMM's, or those of `weight_names`. sample_rows 0 keeps no sample (SmoothQuant needs none)."""
    if not inputs_list:
        raise CalibrationError("calibration needs at least one input; give a calibration set (--calibration FILE)")
    watched = {g.node: g for g in gemms(gm) if weight_names is None or g.weight.target in set(weight_names)}
    if any(read(gm, g.weight).device.type == "meta" for g in watched.values()):
        raise CalibrationError("calibration runs the graph and needs weights; this graph has none (meta): compile "
                               "with weights, or use a round-to-nearest scheme")
    # Seeded per weight name: a weight's sample does not depend on which other weights are watched.
    builders = {g.weight.target: StatsBuilder(val(g.weight).shape[1], sample_rows, seed + zlib.crc32(
        g.weight.target.encode())) for g in watched.values()}
    recorder = _Recorder(gm, builders, watched)
    with torch.no_grad():
        for inputs in inputs_list:
            recorder.run(*pytree.tree_map_only(torch.Tensor, torch.clone, tuple(inputs)))
    return {name: b.finish() for name, b in builders.items()}
