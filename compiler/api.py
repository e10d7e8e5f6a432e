"""The compile entry: model source -> traced graphs -> pass pipeline -> bundle on disk.

Each compile makes its own CompileReport, and what a bundle's user needs of it is written into the bundle (the
manifest's passes with their counts, and its kernel report). `llmc.last_report()` is a convenience over that: the
report of the last compile in the caller's context, held in a context variable, not a process-wide one, so that
compiles in other threads (or asyncio tasks) never replace the report a caller is about to read; llmc.compile's
return value stays the bundle's path.
"""
from __future__ import annotations

import json
import tempfile
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch

import llmc
from llmc.codegen.graph_io import graph_to_json
from llmc.common.contract import GRAPH, KV_BLOCK_SIZE, MANIFEST, ManifestError, read_manifest
from llmc.common.errors import UsageError
from llmc.common.targets import get_target, resolve_dtype
from llmc.compiler import artifact, pipeline
from llmc.compiler.calibration import read_calibration
from llmc.compiler.export import export_backend
from llmc.compiler.kernels import KernelBuild, aot_for_target
from llmc.compiler.source import ModelSource, resolve
from llmc.compiler.trace import Traced, cache_slots, example_inputs, share_weights, trace, unbind_weights
from llmc.models import ModelConfig, Transformer
from llmc.passes.options import CompileOptions

DEFAULT_MAX_SEQ_LEN = 4096


@dataclass
class CompileReport:
    model: str
    target: str
    dtype: str
    out: Path | None = None
    pipelines: list = field(default_factory=list)  # one PipelineReport per graph
    seconds: dict = field(default_factory=dict)
    kernels: dict | None = None  # the AOT kernel report (compiler/kernels.py) for GPU targets
    export: dict | None = None  # the ONNX export's report (--backend onnx / tensorrt)
    notes: list = field(default_factory=list)  # what happened to the stored weight formats (GGUF blocks)

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "dtype": self.dtype, "out": str(self.out),
                "graphs": [p.to_dict() for p in self.pipelines], "kernels": self.kernels, "seconds": self.seconds,
                "notes": self.notes}

    def format(self) -> str:
        head = f"{self.model} -> {self.target} ({self.dtype}): {self.out}"
        times = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        kernels = [KernelBuild(files={}, report=self.kernels).format()] if self.kernels else []
        notes = ["weights: " + "; ".join(self.notes)] if self.notes else []
        return "\n\n".join([head, *notes, *(p.format() for p in self.pipelines), *kernels, f"time: {times}"])


# The report of the most recent compile in this context (llmc.last_report()): a CompileReport, or llmc.backend's
# BackendReport when torch.compile compiled last.
_LAST_REPORT: ContextVar = ContextVar("llmc_last_report", default=None)


def last_report():
    """The CompileReport of the last `llmc.compile` in this thread (this context), or the BackendReport of the last
    graph the torch.compile backend compiled in it, whichever came last; None before either. Both have format()
    and to_dict()."""
    return _LAST_REPORT.get()


def record_report(report) -> None:
    """Makes `report` what last_report() returns in this context (the torch.compile backend records its reports
    here)."""
    _LAST_REPORT.set(report)


def meta_model(source: ModelSource, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(source.config)
    return model.to(dtype).eval()


def check_inputs(model: Transformer, name: str, max_seq_len: int, seed: int = 0) -> tuple:
    """Random tokens over a partly filled random cache: what --check-passes feeds every graph. Positions stay
    below max_seq_len, the length the RoPE tables are folded for. Sequences hold distinct blocks and the new
    tokens' slots follow their tables (-1 past a table's end), so a graph that writes the cache writes only where
    no query reads in this step, as the runtime's blocks guarantee."""
    g = torch.Generator().manual_seed(seed)
    seq = min(7 if name == "prefill" else 1, max_seq_len)
    ids, pos, k, v, table, past, last, _ = example_inputs(model, 3, seq, KV_BLOCK_SIZE)
    ids = torch.randint(0, model.config.vocab_size, ids.shape, generator=g)
    k, v = torch.randn(k.shape, generator=g).to(k.dtype), torch.randn(v.shape, generator=g).to(v.dtype)
    table = torch.randperm(k.shape[1], generator=g)[: table.numel()].view(table.shape)
    past = torch.randint(0, min(table.shape[1] * KV_BLOCK_SIZE, max_seq_len - seq + 1), past.shape, generator=g)
    pos = past[:, None] + torch.arange(seq)
    return ids, pos, k, v, table, past, last, cache_slots(table, past, seq, KV_BLOCK_SIZE)


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


def compile(model: str | Path, target: str | None = None, out: str | Path | None = None, *,
            weights: str | Path | None = None, progress: bool = False, overwrite: bool = True,
            options: CompileOptions | None = None, **flags) -> Path:
    """Compiles MODEL (registry name, "llmc-tiny", a checkpoint directory or a GGUF file) for TARGET (default cpu)
    into a bundle directory.

    The compile's options are one CompileOptions (passes/options.py): `options=`, or its flags as keywords, the
    command line's spellings (CompileOptions.from_flags): dtype, passes, max_seq_len, check_passes,
    sliding_window (N > 0: every attention sees only the last N positions), backend ("triton", "onnx" run by
    onnxruntime, "tensorrt": that ONNX plus TensorRT builder settings, the engine built on the GPU host), quant (a
    scheme name: fp8, int8, int8-w8a16, int4, int4-awq, w4a8, mixed, ...) or quant_policy (a TOML policy file),
    quant_group_size, calibration (a text file for SmoothQuant / AWQ / Wanda), sparsity ("2:4"), attention_keep
    (in (0, 1): block-sparse attention keeping that fraction of key blocks of attention_block tokens).
    """
    if options is None:
        options = CompileOptions.from_flags(target=target or "cpu", **flags)
    elif flags or target is not None:
        raise TypeError("llmc.compile takes options= or the options as keywords, not both")
    tgt = get_target(options.target)
    # onnxruntime's CPU provider has few bf16 kernels: an ONNX bundle for a CPU stays float32 unless asked.
    onnx_on_cpu = options.backend == "onnx" and tgt.arch == "cpu" and options.dtype is None
    dtype_name = "float32" if onnx_on_cpu else resolve_dtype(tgt, options.dtype)
    source = resolve(model, weights)
    max_seq_len = options.max_seq_len or min(source.config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if max_seq_len > source.config.max_position_embeddings:
        raise UsageError(f"--max-seq-len must be in 1..{source.config.max_position_embeddings} for {source.name}")
    passes = options.passes
    names = pipeline.resolve_passes(",".join(passes) if isinstance(passes, list) else passes)
    options.check_pass_names(names)
    if options.dump_after:
        pipeline.dump_point(names, options.dump_after[0])  # a phase or pass that does not run is refused now
    if options.backend != "triton":
        names = [n for n in names if n not in ("fuse_kv_write", "lower_cpu")]  # ONNX: keys returned, reference ops only
    if (options.check_passes or options.backend != "triton" or options.calibration) and not source.has_weights:
        what = ("--check-passes runs the graphs" if options.check_passes else
                f"--backend {options.backend} validates the export" if options.backend != "triton" else "--calibration")
        raise UsageError(f"{what} and needs weights: give a checkpoint or --weights DIR")
    out = Path(out) if out else Path(f"{source.name}-{tgt.name}.llmc")
    artifact.check_destination(out, overwrite)
    return _build(source, tgt, dtype_name, max_seq_len, names, out, progress, overwrite, options=options)


def bind(bundle: str | Path, weights: str | Path, out: str | Path | None = None, progress: bool = False) -> Path:
    """Binds a checkpoint's weights to a bundle compiled without them (on any machine, no GPU needed).

    Replays the bundle's recorded compile (model config, target, dtype, passes, max length) with the weights and
    checks the graphs came out identical, so kernels built for the bundle stay valid. Writes atomically: in
    place by default, the unbound bundle is replaced only once the bound one is complete.
    """
    bundle = Path(bundle)
    if not (bundle / MANIFEST).is_file():
        raise UsageError(f"{bundle} is not an llmc bundle (no {MANIFEST})")
    try:
        manifest = read_manifest(bundle)  # the contract's reader: the fields llmc.load relies on, typed
    except ManifestError as e:
        raise UsageError(f"{bundle}: {e}; rebuild the bundle with llmc compile") from None
    recorded = ModelConfig.from_dict(manifest.model)
    source = resolve(weights)
    if not source.config.same_model(recorded):
        raise UsageError(f"--weights {weights} holds a different model than the bundle ({manifest.model.get('name')})")
    source.name = manifest.model.get("name", source.name)
    names = list(dict.fromkeys(p["name"] for p in manifest.passes if p["graph"] == "prefill"))
    old_graph = json.loads((bundle / GRAPH).read_text())
    out = Path(out) if out else bundle
    options = CompileOptions.from_manifest(manifest.to_json())
    path = _build(source, get_target(options.target), options.dtype, options.max_seq_len, names, out, progress, True,
                  expect_graph=old_graph, options=options)
    return path


def _structure(graph: dict) -> dict:
    """graph.json with each graph's call-node names replaced by their positions: two exports of one model may
    number nodes differently (export's name counters), but must agree on everything else."""

    def renamed(value, names: dict):
        if isinstance(value, str):
            return names.get(value, value)
        if isinstance(value, list):
            return [renamed(v, names) for v in value]
        if isinstance(value, dict):
            return {k: renamed(v, names) for k, v in value.items()}
        return value

    graphs = {}
    for name, g in graph["graphs"].items():
        names = {n["name"]: f"#{i}" for i, n in enumerate(g["nodes"]) if n["op"] not in ("placeholder", "get_attr")}
        graphs[name] = renamed(g, names)
    # Bundles of older llmc carry a memory plan (graph.json "memory", no longer written): not compared.
    return {**{k: v for k, v in graph.items() if k not in ("memory", "graphs")}, "graphs": graphs}


def _decode_with_weights(net: Transformer, source: ModelSource, dtype: torch.dtype, ctx, names: list[str],
                         prefill: Traced) -> tuple[Traced, pipeline.PipelineReport]:
    """The decode graph passed with its own weights, for when its passes derived tensors the prefill graph's did
    not (a lowering specific to one row): the weights are streamed again, and the tensors both graphs name are
    the prefill graph's."""
    decode = trace(net, KV_BLOCK_SIZE, source.weight_stream(dtype))[1]  # the fresh prefill graph is dropped here
    report = pipeline.run_pipeline(decode.gm, ctx, names, graph_name=decode.name, free_weights=True)
    share_weights(decode.gm, prefill.gm)
    return decode, report


def _build(source: ModelSource, tgt, dtype_name: str, max_seq_len: int, names: list[str], out: Path, progress: bool,
           overwrite: bool, expect_graph: dict | None = None, options: CompileOptions | None = None) -> Path:
    t0 = time.perf_counter()
    options = options or CompileOptions()
    check = options.check_passes
    report = CompileReport(source.name, tgt.name, dtype_name)
    dtype = getattr(torch, dtype_name)
    net = meta_model(source, dtype)
    report.notes = source.weight_notes(dtype_name)
    weights = source.weight_stream(dtype, progress)  # streamed into the graph: one copy of the weights, never two
    t1 = time.perf_counter()
    graphs = trace(net, KV_BLOCK_SIZE, weights)
    samples = {t.name: check_inputs(net, t.name, max_seq_len) for t in graphs} if check else {}
    t2 = time.perf_counter()
    calibration = None
    if options.calibration is not None:
        calibration = read_calibration(options.calibration, source.tokenizer_dir, source.config, dtype, KV_BLOCK_SIZE,
                                       max_seq_len)
    ctx = pipeline.PassContext(target=tgt, dtype=dtype_name, max_seq_len=max_seq_len, options=options,
                               calibration=calibration.inputs if calibration else None)
    # One copy of the weights: the decode graph's passes run on meta weights and it then reads the prefill graph's
    # tensors by name, so the prefill graph's references are the only ones and the passes free each weight they
    # replace as they go. Not when checked (the check runs the graph) nor calibrated (the prefill graph's statistics
    # and the scales derived from them are real tensors, which the passes combine with the weights).
    shared = source.has_weights and not check and calibration is None
    if shared:
        unbind_weights(graphs[1].gm)
    for t in graphs:
        report.pipelines.append(pipeline.run_pipeline(t.gm, ctx, names, check_inputs=samples.get(t.name),
                                                      graph_name=t.name, free_weights=True))
    if shared and share_weights(graphs[1].gm, graphs[0].gm):
        graphs[1], report.pipelines[1] = _decode_with_weights(net, source, dtype, ctx, names, graphs[0])
    t3 = time.perf_counter()
    moved, extra = {}, {}
    scratch = tempfile.TemporaryDirectory(prefix=f".{out.name}.export-", dir=out.parent if out.parent.exists() else None)
    kernels = None
    if options.backend == "triton":
        kernels = aot_for_target(graphs, tgt)
        extra = kernels.files if kernels else {}
    else:
        moved, report.export = export_backend(graphs[0].gm, check_inputs(net, "prefill", max_seq_len),
                                              options.backend, tgt, dtype_name, max_seq_len, KV_BLOCK_SIZE,
                                              source.config, Path(scratch.name))
    report.kernels = kernels.report if kernels else None
    t_kernels = time.perf_counter()

    manifest = {
        "llmc_version": llmc.__version__,
        "model": {"name": source.name, **source.config.to_dict()},
        "target": tgt.to_dict(),
        "dtype": dtype_name,
        "max_seq_len": max_seq_len,
        **options.to_manifest(),
        **({"calibration": calibration.record} if calibration else {}),
        **({"onnx": {"file": "onnx/model.onnx", **report.export}} if options.backend != "triton" else {}),
        "block_size": KV_BLOCK_SIZE,
        "has_weights": source.has_weights,
        "eos_token_ids": source.eos_token_ids,
        "passes": [{"graph": p.graph, **r} for p in report.pipelines for r in p.to_dict()["records"]],
        **({"kernels": kernels.report} if kernels else {}),
    }
    graph = {"inputs": [n.name for n in graphs[0].gm.graph.nodes if n.op == "placeholder"],
             "outputs": ["logits", "new_k", "new_v"],
             "graphs": {t.name: graph_to_json(t.gm) for t in graphs}}
    if expect_graph is not None and _structure(expect_graph) != _structure(graph):
        raise UsageError("binding these weights changed the compiled graphs; recompile with llmc compile --weights")
    tensors = collect_weights(graphs)
    weight_stream = sorted(tensors.items()) if source.has_weights else None
    if options.backend != "triton":  # the weights live in the ONNX model (external data): not stored twice
        weight_stream, manifest["weights_in"] = None, "onnx/model.onnx" 
    with scratch:
        report.out = artifact.write_bundle(out, manifest, graph, weight_stream, source.tokenizer_dir,
                                           overwrite=overwrite, progress=progress, extra_files=extra,
                                           moved_files=moved)
    t4 = time.perf_counter()
    report.seconds = {"load": t1 - t0, "trace": t2 - t1, "passes": t3 - t2, "kernels": t_kernels - t3,
                      "write": t4 - t_kernels, "total": t4 - t0}
    record_report(report)
    return report.out
