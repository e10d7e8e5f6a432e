"""The compile entry: model source -> traced graphs -> pass pipeline -> bundle on disk."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import llmc
from llmc.codegen.graph_io import graph_to_json
from llmc.compiler import artifact, pipeline
from llmc.compiler.source import ModelSource, resolve
from llmc.compiler.trace import example_inputs, trace
from llmc.models import Transformer
from llmc.models.loader import load_checkpoint
from llmc.targets import get_target, resolve_dtype

DEFAULT_MAX_SEQ_LEN = 4096
BLOCK_SIZE = 16


@dataclass
class CompileReport:
    model: str
    target: str
    dtype: str
    out: Path | None = None
    pipelines: list = field(default_factory=list)  # one PipelineReport per graph
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "dtype": self.dtype, "out": str(self.out),
                "graphs": [p.to_dict() for p in self.pipelines], "seconds": self.seconds}

    def format(self) -> str:
        head = f"{self.model} -> {self.target} ({self.dtype}): {self.out}"
        times = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return "\n\n".join([head, *(p.format() for p in self.pipelines), f"time: {times}"])


class _LastReport:
    """Holds the report of the most recent compile in this process (llmc.last_report())."""

    report: CompileReport | None = None


def last_report() -> CompileReport | None:
    return _LastReport.report


def build_model(source: ModelSource, dtype: torch.dtype, progress: bool) -> Transformer:
    if source.weights_dir is not None:
        return load_checkpoint(source.weights_dir, dtype=dtype, progress=progress)
    with torch.device("meta"):
        model = Transformer(source.config)
    return model.to(dtype).eval()


def check_inputs(model: Transformer, name: str, seed: int = 0) -> tuple:
    """Random tokens over a partly filled random cache: what --check-passes feeds every graph."""
    g = torch.Generator().manual_seed(seed)
    seq = 7 if name == "prefill" else 1
    ids, pos, k, v, table, past, last = example_inputs(model, 3, seq, BLOCK_SIZE)
    ids = torch.randint(0, model.config.vocab_size, ids.shape, generator=g)
    k, v = torch.randn(k.shape, generator=g).to(k.dtype), torch.randn(v.shape, generator=g).to(v.dtype)
    table = torch.randperm(k.shape[1], generator=g)[: table.numel()].view(table.shape)
    past = torch.randint(0, table.shape[1] * BLOCK_SIZE, past.shape, generator=g)
    pos = past[:, None] + torch.arange(seq)
    return ids, pos, k, v, table, past, last


def collect_weights(graphs) -> dict[str, torch.Tensor]:
    """Every tensor a graph reads, once by name; two graphs may share a name only for the same values."""
    tensors: dict[str, torch.Tensor] = {}
    for t in graphs:
        for node in t.gm.graph.nodes:
            if node.op != "get_attr":
                continue
            value = getattr(t.gm, node.target)
            seen = tensors.setdefault(node.target, value)
            if seen is not value and not (seen.device.type == "meta" or torch.equal(seen, value)):
                raise ValueError(f"graphs disagree on tensor {node.target}: a pass must give new tensors new names")
    return tensors


def compile(model: str | Path, target: str = "cpu", out: str | Path | None = None, *, weights: str | Path | None = None,
            dtype: str | None = None, passes: str | list[str] | None = None, max_seq_len: int | None = None,
            check_passes: bool = False, progress: bool = False, overwrite: bool = True) -> Path:
    """Compiles MODEL (registry name, "llmc-tiny", or a checkpoint directory) for TARGET into a bundle directory."""
    t0 = time.perf_counter()
    tgt = get_target(target)
    dtype_name = resolve_dtype(tgt, dtype)
    source = resolve(model, weights)
    max_seq_len = max_seq_len or min(source.config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if max_seq_len < 1 or max_seq_len > source.config.max_position_embeddings:
        raise ValueError(f"--max-seq-len must be in 1..{source.config.max_position_embeddings} for {source.name}")
    names = pipeline.resolve_passes(",".join(passes) if isinstance(passes, list) else passes)
    out = Path(out) if out else Path(f"{source.name}-{tgt.name}.llmc")
    report = CompileReport(source.name, tgt.name, dtype_name)

    net = build_model(source, getattr(torch, dtype_name), progress)
    t1 = time.perf_counter()
    graphs = trace(net, BLOCK_SIZE)
    t2 = time.perf_counter()
    if check_passes and source.weights_dir is None:
        raise ValueError("--check-passes runs the graphs and needs weights: give a checkpoint or --weights DIR")
    ctx = pipeline.PassContext(target=tgt, dtype=dtype_name)
    for t in graphs:
        sample = check_inputs(net, t.name) if check_passes else None
        report.pipelines.append(pipeline.run_pipeline(t.gm, ctx, names, check_inputs=sample, graph_name=t.name))
    t3 = time.perf_counter()

    tensors = collect_weights(graphs)
    manifest = {
        "llmc_version": llmc.__version__,
        "model": {"name": source.name, **source.config.to_dict()},
        "target": tgt.to_dict(),
        "dtype": dtype_name,
        "max_seq_len": max_seq_len,
        "block_size": BLOCK_SIZE,
        "has_weights": source.weights_dir is not None,
        "eos_token_ids": source.eos_token_ids,
        "passes": [{"graph": p.graph, **r} for p in report.pipelines for r in p.to_dict()["records"]],
    }
    graph = {"inputs": [n.name for n in graphs[0].gm.graph.nodes if n.op == "placeholder"],
             "outputs": ["logits", "new_k", "new_v"],
             "graphs": {t.name: graph_to_json(t.gm) for t in graphs}}
    weight_stream = sorted(tensors.items()) if source.weights_dir is not None else None
    report.out = artifact.write_bundle(out, manifest, graph, weight_stream, source.tokenizer_dir,
                                       overwrite=overwrite, progress=progress)
    t4 = time.perf_counter()
    report.seconds = {"load": t1 - t0, "trace": t2 - t1, "passes": t3 - t2, "write": t4 - t3, "total": t4 - t0}
    _LastReport.report = report
    return report.out
