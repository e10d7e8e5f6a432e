"""ONNX export of a passed paged-step graph (`llmc compile --backend onnx`), validated against the graph itself.

`export_onnx` takes the passed *prefill* GraphModule (a pipeline run without fuse_kv_write: the graph returns
new_k / new_v and mutates nothing) and writes one model that serves prefill and decode (S = 1):

  out_dir/model.onnx       inputs  input_ids [batch, sequence], positions [batch, sequence],
                                   k_cache / v_cache [L, num_blocks, BS, Hkv, D], block_table [batch, max_blocks],
                                   past_lens [batch], last_index [batch]  (slot_mapping is dropped: unused)
                           outputs logits [batch, V], new_k / new_v [L, batch, sequence, Hkv, D]
  out_dir/model.onnx.data  weights larger than `external_threshold` bytes (relative location), so models past
                           protobuf's 2 GB limit load; absent when no weight is that large

Route: torch.onnx.export(dynamo=True) re-exports the graph; its own translations cover the aten ops and
codegen/onnx_ops.py's cover the llmc ops (that module lists the ONNX ops each one becomes, and what
onnxruntime's CPU provider runs). Then onnx.checker (full_check) and strict shape inference, then, as optimum
does, onnxruntime runs the model on the example inputs and on a second random set (another batch size and
sequence length, past_lens > 0 so the paged path is exercised) and every output is compared with the graph's
own (the torch reference ops) at DESIGN.md's tolerances. On a failure the files stay in out_dir for inspection.
"""
from __future__ import annotations

import collections
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc.common.contract import EXPORTED_INPUTS, STEP_OUTPUTS
from llmc.common.errors import LlmcError

from . import onnx_ops
from . import ops as _ops  # noqa: F401  (registers the llmc ops the graph calls)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MIN_OPSET = 23  # RMSNormalization, RotaryEmbedding and Attention
PROTOBUF_LIMIT = 2**31 - 1
# Named dynamic dims, in EXPORTED_INPUTS order; they become the model's dim_params.
DYNAMIC_SHAPES = ({0: "batch", 1: "sequence"}, {0: "batch", 1: "sequence"}, {1: "num_blocks"}, {1: "num_blocks"},
                  {0: "batch", 1: "max_blocks"}, {0: "batch"}, {0: "batch"})
# Whole-model criteria, DESIGN.md's. float32: elementwise rtol = atol = 1e-4 (summation order changes). 16 bits:
# cosine >= 0.999 per output, DESIGN's whole-model criterion: two independent fp16 implementations of a model
# differ by a few ulps of values O(5) after two layers (torch's fp16 graph is 0.015 from its fp32 run, the ONNX
# model as far), beyond the per-op 1e-3; tests/codegen/test_onnx_ops.py holds each translation to the per-op ones.
FLOAT32_TOLERANCE = 1e-4
MIN_COSINE = 0.999
CRITERIA = {torch.float32: f"elementwise rtol {FLOAT32_TOLERANCE:g} atol {FLOAT32_TOLERANCE:g}",
            torch.float16: f"cosine >= {MIN_COSINE} per output", torch.bfloat16: f"cosine >= {MIN_COSINE} per output"}
BF16_SKIP = ("onnxruntime's CPU execution provider has no bfloat16 kernels (not even Add or MatMul): run the "
             "model on a CUDA host to validate it")


class OnnxExportError(LlmcError, ValueError):
    pass


class OnnxValidationError(OnnxExportError):
    """The exported model's outputs differ from the graph's past tolerance."""


@dataclass
class OnnxExport:
    files: dict[str, Path]  # path relative to out_dir -> absolute path
    report: dict  # opset, ops histogram, initializers, external bytes, checks, validation max |diff|, seconds


def export_onnx(gm: torch.fx.GraphModule, example_inputs: tuple, out_dir: str | Path, *, opset: int = 23,
                external_threshold: int | None = 1024, validate: bool = True) -> OnnxExport:
    """Exports the passed prefill graph `gm` to out_dir/model.onnx (+ model.onnx.data), checks it, validates it.

    example_inputs: gm's inputs (the eight of compiler/trace.py, slot_mapping included), e.g. compiler.api's
    check_inputs; validation runs on them. external_threshold: weights of more bytes go to the data file (0: all);
    None keeps every weight inside model.onnx (only possible below 2 GB).
    Raises OnnxExportError for a graph it cannot export, OnnxValidationError when outputs diverge.
    """
    start = time.perf_counter()
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset {opset} lacks RMSNormalization, RotaryEmbedding and Attention: use {MIN_OPSET}+")
    check_ops(gm)
    if any(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()]):
        raise OnnxExportError("the onnx backend writes the weights into the model: give a checkpoint or --weights DIR")
    step = without_slot_mapping(gm)
    rotary = rope_tables_have_equal_halves(gm)
    table = onnx_ops.translation_table(rope_uses_rotary_embedding=rotary)
    model = _torch_export(step, trace_inputs(example_inputs), opset, table)
    strip_build_metadata(model)
    t_export = time.perf_counter()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, data_path = out_dir / MODEL_FILE, out_dir / DATA_FILE
    data_path.unlink(missing_ok=True)  # a stale data file from an earlier export would be mistaken for this one's
    external = save(model, model_path, external_threshold)
    t_save = time.perf_counter()

    report = {"opset": opset, "rope": "RotaryEmbedding" if rotary else "plain ops (cos/sin table halves differ)",
              **describe(model_path), **check(model_path)}
    t_check = time.perf_counter()
    report["validation"] = validate_onnx(model_path, gm, example_inputs) if validate else {"skipped": "validate=False"}
    t_end = time.perf_counter()
    report["seconds"] = {"export": t_export - start, "save": t_save - t_export, "check": t_check - t_save,
                         "validate": t_end - t_check, "total": t_end - start}
    files = {MODEL_FILE: model_path, **({DATA_FILE: data_path} if external else {})}
    return OnnxExport(files=files, report=report)


def save(model, model_path: Path, external_threshold: int | None) -> bool:
    """Writes model_path, the weights (floating-point initializers) of more than external_threshold bytes into
    DATA_FILE beside it, streamed tensor by tensor; integer constants (shapes, indices) stay inline, where shape
    inference reads them. Returns whether DATA_FILE was written."""
    import onnx_ir as ir

    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    weights = [v for v in values if external_threshold is not None and v.const_value.dtype.is_floating_point()
               and v.const_value.nbytes > external_threshold]
    inline = sum(v.const_value.nbytes for v in values) - sum(v.const_value.nbytes for v in weights)
    if inline > PROTOBUF_LIMIT:
        raise OnnxExportError(f"{inline / 2**30:.1f} GiB of initializers cannot stay inside model.onnx (protobuf "
                              f"limit 2 GiB): give a smaller external_threshold")
    if weights:
        tensors = ir.external_data.convert_tensors_to_external([v.const_value for v in weights], model_path.parent,
                                                               DATA_FILE)
        for value, tensor in zip(weights, tensors, strict=True):
            value.const_value = tensor
    ir.save(model, model_path)
    return bool(weights)


def check_ops(gm: torch.fx.GraphModule) -> None:
    """Refuses graphs with an llmc op that has no translation, naming it and what to do instead."""
    known = {target.name() for target in onnx_ops.translation_table()}
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "llmc":
            continue
        if node.target.name() == "llmc::rope_write_kv":
            raise OnnxExportError("the graph writes the KV cache (llmc.rope_write_kv, from the fuse_kv_write pass): "
                                  "run the pipeline without fuse_kv_write for the onnx backend")
        if node.target.name() not in known:
            raise OnnxExportError(f"op {node.target.name().replace('::', '.')} has no ONNX translation; compile with "
                                  f"--backend triton/default")


def without_slot_mapping(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of gm (sharing its tensors) whose inputs are EXPORTED_INPUTS: slot_mapping, which only fuse_kv_write's
    cache writes read, dropped."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target == "slot_mapping" and not node.users:
            graph.erase_node(node)
    names = tuple(n.target for n in graph.nodes if n.op == "placeholder")
    if names != EXPORTED_INPUTS:
        raise OnnxExportError(f"graph inputs {names} are not a paged step's {EXPORTED_INPUTS} (+ unused slot_mapping)")
    return torch.fx.GraphModule(gm, graph)


def rope_tables_have_equal_halves(gm: torch.fx.GraphModule) -> bool:
    """True when every llmc.rope table has equal halves (cos(p * f) for frequencies [f, f]), which ONNX's
    RotaryEmbedding requires: it takes one half as its cache."""
    for node in gm.graph.nodes:
        if node.target is not torch.ops.llmc.rope.default:
            continue
        for table_node in node.args[2:4]:
            if table_node.op != "get_attr":
                return False
            table = getattr(gm, table_node.target)
            first, second = table.chunk(2, dim=-1)
            if table.shape[-1] % 2 or not torch.equal(first, second):
                return False
    return True


def trace_inputs(example_inputs: tuple) -> tuple:
    """Export inputs with every dynamic dim distinct and > 1 (batch 2, sequence 5, 11 blocks, tables 3 wide), so
    the export neither merges two dims of equal example size nor specialises one to 1."""
    k_cache = example_inputs[2]
    layers, _, block_size, kv_heads, head_dim = k_cache.shape
    batch, seq, num_blocks, width = 2, 5, 11, 3
    cache = torch.zeros(layers, num_blocks, block_size, kv_heads, head_dim, dtype=k_cache.dtype)
    ints = dict(dtype=torch.long)
    return (torch.zeros(batch, seq, **ints), torch.arange(seq).repeat(batch, 1), cache, cache.clone(),
            torch.zeros(batch, width, **ints), torch.zeros(batch, **ints), torch.full((batch,), seq - 1, **ints))


def _torch_export(step: torch.fx.GraphModule, inputs: tuple, opset: int, table: dict):
    try:
        with warnings.catch_warnings():
            # Export's own internals warn (deprecated pytree LeafSpec, torchvision absent): not ours to fix.
            warnings.simplefilter("ignore")
            program = torch.onnx.export(step, inputs, dynamo=True, opset_version=opset, verbose=False,
                                        custom_translation_table=table, dynamic_shapes=DYNAMIC_SHAPES,
                                        input_names=list(EXPORTED_INPUTS), output_names=list(STEP_OUTPUTS))
    except torch.onnx.errors.OnnxExporterError as error:
        root = error
        while root.__cause__ is not None:  # torch.onnx wraps the real reason (a missing aten translation...)
            root = root.__cause__
        reason = f"{type(root).__name__}: {str(root).strip().splitlines()[0]}"
        raise OnnxExportError(f"torch.onnx could not export the graph ({reason}); compile with --backend "
                              f"triton/default") from error
    return program.model


def strip_build_metadata(model) -> None:
    """Drops torch.onnx's per-node stack traces and FX node text (most of model.onnx's bytes, with the build
    machine's file paths: bundles would differ by where llmc was installed); keeps the module namespace."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in [k for k in node.metadata_props if k.startswith("pkg.torch.onnx.")]:
            del node.metadata_props[key]


def describe(model_path: Path) -> dict:
    """What went into the file: ops histogram (domain-qualified outside the default domain), initializers."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    ops = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in proto.graph.node)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    external_bytes = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in external)
    return {"ir_version": proto.ir_version, "ops": dict(sorted(ops.items())),
            "initializers": len(proto.graph.initializer), "external_initializers": len(external),
            "external_bytes": external_bytes, "model_bytes": model_path.stat().st_size}


def check(model_path: Path) -> dict:
    """onnx.checker with full_check (which includes strict shape inference) and shape inference from the path
    (the way for models with external data): the model is well formed and every value's type is derivable."""
    import onnx

    inferred_path = model_path.with_name(f".{model_path.name}.inferred")
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred_path), strict_mode=True)
        inferred = onnx.load(str(inferred_path), load_external_data=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise OnnxExportError(f"the exported model is not valid ONNX ({str(error).strip().splitlines()[0]}); "
                              f"report it with the graph") from error
    finally:
        inferred_path.unlink(missing_ok=True)
    return {"checker": "full_check passed", "inferred_values": len(inferred.graph.value_info)}


def validate_onnx(model_path: Path, gm: torch.fx.GraphModule, example_inputs: tuple, seed: int = 0) -> dict:
    """Runs the model with onnxruntime (CPU) on the example inputs and on a second random set and compares every
    output with gm's. Returns the criterion and, per set and output, the max |diff| (and the cosine in 16 bits);
    raises OnnxValidationError on a divergence."""
    import onnxruntime as ort

    dtype = example_inputs[2].dtype
    if dtype == torch.bfloat16:
        warnings.warn(f"ONNX export not validated: {BF16_SKIP}", stacklevel=3)
        return {"skipped": BF16_SKIP}
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    ort_errors = (state.Fail, state.NotImplemented, state.InvalidArgument, state.InvalidGraph, state.RuntimeException)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # spinning idle threads slow a shared machine down
    expected = _run_graph(gm, example_inputs)
    second = random_inputs(gm, example_inputs, vocab_size=expected[0].shape[-1], seed=seed)
    result = {"criterion": CRITERIA.get(dtype, CRITERIA[torch.float32]), "max_abs_diff": {}, "cosine": {}}
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        runs = []
        for label, inputs, want in (("example", example_inputs, expected), ("random", second, None)):
            feeds = {name: tensor.numpy() for name, tensor in zip(EXPORTED_INPUTS, inputs)}
            want = want if want is not None else _run_graph(gm, inputs)
            runs.append((label, session.run(list(STEP_OUTPUTS), feeds), want))
    except ort_errors as error:
        raise OnnxValidationError(f"onnxruntime could not run the exported model ({str(error).strip()[:300]}); "
                                  f"compile with --backend triton/default") from error
    for label, arrays, want in runs:
        got = [torch.from_numpy(array) for array in arrays]
        for name, g, w in zip(STEP_OUTPUTS, got, want):
            worst, cosine = _compare(name, label, g, w)
            result["max_abs_diff"].setdefault(label, {})[name] = worst
            result["cosine"].setdefault(label, {})[name] = cosine
    return result


def _run_graph(gm: torch.fx.GraphModule, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(gm(*inputs))


def _compare(name: str, label: str, got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, cosine); raises past the criterion of want's dtype (CRITERIA)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        raise OnnxValidationError(f"ONNX output {name} is {got.dtype}{list(got.shape)} instead of the graph's "
                                  f"{want.dtype}{list(want.shape)} on the {label} inputs")
    got, want_ = got.double(), want.double()
    worst = float((got - want_).abs().max()) if got.numel() else 0.0
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), want_.flatten(), dim=0))
    if want.dtype == torch.float32:
        diverged = not torch.isclose(got, want_, rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE).all()
    else:
        diverged = not cosine >= MIN_COSINE  # also catches NaN
    if diverged:
        raise OnnxValidationError(f"ONNX output {name} diverges from the torch graph on the {label} inputs: max abs "
                                  f"diff {worst:.3g}, cosine {cosine:.6f} ({CRITERIA.get(want.dtype)}); a translation "
                                  f"in codegen/onnx_ops.py is wrong: compile with --backend triton/default meanwhile")
    return worst, cosine


def random_inputs(gm: torch.fx.GraphModule, like: tuple, vocab_size: int, seed: int = 0) -> tuple:
    """gm's inputs for another batch size and sequence length (decode, S = 1, after a prefill example; S = 4
    after a decode one) over a random cache of which each sequence has read past_lens >= 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    layers, _, block_size, kv_heads, head_dim = like[2].shape
    batch, seq, width = like[0].shape[0] + 1, 1 if like[0].shape[1] > 1 else 4, max(2, like[4].shape[1])
    num_blocks = batch * width + 1
    longest = min([width * block_size, *(n - seq for n in _position_limits(gm))])
    if longest < 1:
        raise OnnxExportError(f"the graph's RoPE tables are too short for a {seq}-token step after a cached token")
    past = torch.randint(1, longest + 1, (batch,), generator=g)
    positions = past[:, None] + torch.arange(seq)
    cache_shape = (layers, num_blocks, block_size, kv_heads, head_dim)
    k, v = (torch.randn(cache_shape, generator=g).to(like[2].dtype) for _ in range(2))
    table = torch.randperm(num_blocks, generator=g)[: batch * width].view(batch, width)
    last = torch.randint(0, seq, (batch,), generator=g)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    unused_slots = torch.full((batch, seq), -1, dtype=torch.long)
    return (ids, positions, k, v, table, past, last, unused_slots)[: len(like)]


def _position_limits(gm: torch.fx.GraphModule) -> list[int]:
    """Rows of the graph's folded RoPE tables: positions must stay below them."""
    return [getattr(gm, n.args[2].target).shape[0] for n in gm.graph.nodes
            if n.target is torch.ops.llmc.rope.default and n.args[2].op == "get_attr"]

