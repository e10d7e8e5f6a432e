"""llmc as a torch.compile backend: `torch.compile(model, backend="llmc", options={...})`.

The package registers the backend under the entry-point group `torch_dynamo_backends`, so after `pip install`
the name "llmc" works without importing llmc first. For every graph dynamo captures, the backend
1. freezes the weights: the parameters and buffers dynamo hands in as inputs become constants (get_attr nodes
   our passes read, fold and replace), as inductor's freezing does;
2. lowers the graph to aten for inference with aot_autograd, keeping the composite ops torch.export keeps
   (aten.linear, aten.layer_norm, SDPA), so the graph looks like the export graphs the passes are written for;
3. runs llmc's pass pipeline (compiler/pipeline.py), optionally checking every pass numerically;
4. returns a callable running the rewritten graph: llmc ops run their Triton kernels on CUDA tensors and their
   references on CPU; what no pass matched runs as ordinary aten ops, or, with `inductor`, is compiled by
   inductor (llmc ops stay calls to their kernels).
`llmc.last_report()` then returns the BackendReport of the last graph compiled: what every pass rewrote.

Options (all optional):
  passes        "a,b" (only those), "-a,-b" (all but those) or a list of names; default every pass.
  dtype         "auto" (default: compute in the model's own dtypes) or a float dtype name: parameters are
                frozen in it (buffers, such as RoPE frequencies, keep theirs), floating inputs are cast to it on
                entry and floating outputs back to the dtype eager returns, so callers see the same types.
  check_passes  True: run the example inputs through the graph after every pass and compare with the
                unpassed graph; the first pass that diverges fails the compile, naming itself.
  max_seq_len   the longest sequence (positions stay below it): the length of the RoPE tables fold_rope
                folds. Default: max_position_embeddings of the compiled module's `config` where dynamo's
                frame shows one; otherwise fold_rope leaves RoPE unfolded and says so in the report.
  inductor      True: hand the rewritten graph to inductor instead of running it op by op.

Assumes frozen inference weights (as inductor's freezing): after changing a weight call `torch._dynamo.reset()`.
Outputs carry no autograd history; inputs that require grad are refused; weights the graph writes stay inputs.
Positions stay below max_seq_len. Sizes dynamo marks dynamic stay symbolic, so new lengths reuse the graph.
"""
from __future__ import annotations

import functools
import itertools
import time
import unittest.mock
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from llmc.common.errors import UsageError
from llmc.common.targets import DTYPE_ALIASES, get_target, targets_with_capability
from llmc.compiler import pipeline
from llmc.compiler.api import record_report
from llmc.compiler.pipeline import PipelineReport
from llmc.freeze import Frozen, freeze, read_attribute_instead

OPTION_NAMES = ("passes", "dtype", "check_passes", "max_seq_len", "inductor")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
_GRAPH_NUMBERS = itertools.count()


@dataclass(frozen=True)
class BackendOptions:
    passes: tuple[str, ...]
    dtype: torch.dtype | None = None  # None: the model's own dtypes
    check_passes: bool = False
    max_seq_len: int | None = None
    inductor: bool = False

    @classmethod
    def parse(cls, options: dict | None) -> BackendOptions:
        options = dict(options or {})
        unknown = sorted(set(options).difference(OPTION_NAMES))
        if unknown:
            raise UsageError(f"unknown llmc backend option {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(OPTION_NAMES)}")
        passes = options.get("passes")
        names = pipeline.resolve_passes(",".join(passes) if isinstance(passes, (list, tuple)) else passes)
        dtype = options.get("dtype", "auto")
        if dtype not in (None, "auto"):
            name = str(dtype).removeprefix("torch.").lower()
            name = DTYPE_ALIASES.get(name, name)
            if name not in COMPUTE_DTYPES:
                raise UsageError(f"dtype option {dtype!r}: use auto or one of {', '.join(COMPUTE_DTYPES)}")
            dtype = getattr(torch, name)
        max_seq_len = options.get("max_seq_len")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise UsageError(f"max_seq_len option must be a positive int, got {max_seq_len!r}")
        for flag in ("check_passes", "inductor"):
            if not isinstance(options.get(flag, False), bool):
                raise UsageError(f"{flag} option must be True or False, got {options[flag]!r}")
        return cls(tuple(names), None if dtype in (None, "auto") else dtype, options.get("check_passes", False),
                   max_seq_len, options.get("inductor", False))


@dataclass
class BackendReport:
    """What the backend did to one graph dynamo captured (llmc.last_report() after a torch.compile run)."""

    graph: str  # "graph <n>": the n-th graph this process compiled
    options: dict
    pipeline: PipelineReport
    weights: int  # weight tensors frozen into the graph
    dynamic: list[str] = field(default_factory=list)  # inputs with symbolic sizes, as "name[s0, 8]"
    seconds: dict = field(default_factory=dict)

    def rewrites(self) -> dict[str, int]:
        return {r.name: r.rewrites for r in self.pipeline.records}

    def to_dict(self) -> dict:
        return {"graph": self.graph, "options": self.options, "weights": self.weights, "dynamic": self.dynamic,
                "pipeline": self.pipeline.to_dict(), "seconds": self.seconds}

    def format(self) -> str:
        dynamic = ", ".join(self.dynamic) or "none"
        times = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return "\n".join([f"torch.compile backend llmc, {self.graph}: {self.weights} weights frozen; "
                          f"dynamic inputs: {dynamic}", self.pipeline.format(), f"time: {times}"])


def llmc_backend(gm: GraphModule, example_inputs: Sequence, options: dict | None = None,
                 mode: str | None = None) -> Callable:
    """The torch.compile backend (see the module docstring); dynamo calls it once per captured graph."""
    if mode is not None:
        raise UsageError(f"the llmc backend has no mode {mode!r}: give options={{...}} instead")
    opts = BackendOptions.parse(options)
    start = time.perf_counter()
    max_seq_len = opts.max_seq_len or _visible_max_positions()
    frozen = freeze(gm, example_inputs, opts.dtype)
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        from llmc.codegen.triton.launch import register_cuda_impls

        register_cuda_impls()
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch.export.exported_program import _override_composite_implicit_decomp

    lowered = _Lowered(len(frozen.names))
    kept_composites, python_decompositions = _export_decompositions()
    # Only the tracing runs with export's composites kept: the passes and inductor run after, with torch as usual.
    with _override_composite_implicit_decomp(kept_composites):
        compiled = aot_module_simplified(frozen.gm, frozen.runtime_examples, fw_compiler=lowered.capture,
                                         decompositions=python_decompositions)
    lowered.runner = _compile_lowered(lowered, frozen, opts, max_seq_len, start)
    positions = frozen.runtime_positions

    def run(*args):
        return compiled(*[args[i] for i in positions])

    return run


class _Lowered:
    """aot_autograd's inference compiler: keeps the lowered graph, its fake inputs and which weights the graph
    writes or aliases, and returns a function calling `runner`, set once the passes have run."""

    def __init__(self, weights: int):
        self.weights = weights
        self.gm: GraphModule | None = None
        self.fake_inputs: list = []
        self.stay: set[int] = set()
        self.runner: Callable | None = None

    def capture(self, gm: GraphModule, fake_inputs: Sequence) -> Callable:
        from functorch.compile import make_boxed_func

        self.gm, self.fake_inputs, self.stay = gm, list(fake_inputs), _writes_or_aliases(self.weights)
        return make_boxed_func(lambda *args: self.runner(*args))


@functools.cache
def _export_decompositions():
    """(composite ops to keep, python decompositions): what torch.export's run_decompositions({}) uses, so
    the lowered graph keeps aten.linear and friends as the passes' patterns (traced with export) have them."""
    from torch.export.exported_program import _split_decomp_table_to_cia_and_python_decomp

    return _split_decomp_table_to_cia_and_python_decomp({})


def _visible_max_positions() -> int | None:
    """max_position_embeddings of a `config` among the locals of the frame dynamo compiles (the model's
    forward: `self.config`), or in its `args` / `kwargs` (transformers 5 wraps forward in decorators whose frame
    holds the model as args[0]), or None."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        frame_locals = InstructionTranslator.current_tx().f_locals
    except AttributeError:  # not inside dynamo's frame conversion (a direct call of the backend)
        return None
    values = list(frame_locals.values())
    for value in frame_locals.values():
        values.extend(value if isinstance(value, tuple | list) else value.values() if isinstance(value, dict) else ())
    for value in values:
        length = getattr(getattr(value, "config", None), "max_position_embeddings", None)
        if isinstance(length, int) and length > 0:
            return length
    return None


def _writes_or_aliases(count: int) -> set[int]:
    """Lowered-graph inputs among the first `count` that the graph mutates or an output aliases: they must
    stay inputs (aot_autograd writes mutations back into, and rebuilds aliases from, the real tensors)."""
    from torch._functorch._aot_autograd.schemas import OutputType

    context = torch._guards.TracingContext.try_get()
    meta = context.fw_metadata if context is not None else None
    if meta is None:
        return set()
    written = {i for i, info in enumerate(meta.input_info[:count]) if info.mutates_data or info.mutates_metadata}
    aliased = {o.base_idx for o in meta.output_info
               if o.output_type in (OutputType.alias_of_input, OutputType.is_input) and o.base_idx is not None}
    return (written | aliased) & set(range(count))


def _compile_lowered(lowered: _Lowered, frozen: Frozen, opts: BackendOptions, max_seq_len: int | None,
                     start: float) -> Callable:
    """Binds the weights into the lowered graph as constants, runs the passes, returns the graph's runner."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    lowered_at = time.perf_counter()
    gm, weights, stay = lowered.gm, lowered.weights, lowered.stay
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != weights + len(frozen.runtime_examples):
        raise RuntimeError(f"aot_autograd lowered {len(placeholders)} inputs, expected {weights} weights and "
                           f"{len(frozen.runtime_examples)} runtime inputs")
    cast_written = [frozen.names[i] for i in sorted(stay) if frozen.cast[i]]
    if cast_written:
        raise UsageError(f"the graph writes into weight {cast_written[0]}, which the dtype option would copy: "
                         "compile with dtype='auto'")
    for i, node in enumerate(placeholders[:weights]):
        if i not in stay:
            gm.register_buffer(frozen.names[i], frozen.tensors[i])
            read_attribute_instead(gm, node, frozen.names[i])
    gm.recompile()
    kept = [i for i in range(len(placeholders)) if i >= weights or i in stay]
    name = f"graph {next(_GRAPH_NUMBERS)}"
    check = None
    if opts.check_passes:
        real = [*frozen.tensors, *map(_concrete, frozen.runtime_examples)]
        check = tuple(real[i] for i in kept)
    ctx = pipeline.PassContext(target=_target(frozen.runtime_examples), dtype=opts.dtype or _weights_dtype(frozen),
                               max_seq_len=max_seq_len)
    with unset_fake_temporarily(), warnings.catch_warnings():  # passes evaluate real tensors (folded weights...)
        # torch's own pytree internals warn about their deprecated LeafSpec when patterns are exported.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        report = pipeline.run_pipeline(gm, ctx, list(opts.passes), check_inputs=check, graph_name=name)
    passed_at = time.perf_counter()
    if opts.inductor:
        inner = _inductor(gm, [lowered.fake_inputs[i] for i in kept])

        def runner(*args):
            return inner([args[i] for i in kept])
    else:
        def runner(*args):
            return gm(*[args[i] for i in kept])
    done = time.perf_counter()
    options = {"passes": list(opts.passes), "dtype": str(opts.dtype).removeprefix("torch.") if opts.dtype else "auto",
               "check_passes": opts.check_passes, "max_seq_len": max_seq_len, "inductor": opts.inductor}
    record_report(BackendReport(name, options, report, weights - len(stay), _dynamic_inputs(frozen),
                                {"freeze+lower": lowered_at - start, "passes": passed_at - lowered_at,
                                 "codegen": done - passed_at, "total": done - start}))
    return runner


def _inductor(gm: GraphModule, examples: list):
    """Inductor's compile of the rewritten graph. Inductor expects its own decompositions applied (aot ran with
    export's, which keep gelu, linear, ...), so the graph is traced once more through them; llmc ops stay."""
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    # The frozen weights are real tensors among fake ones, as in inductor's own freezing.
    with unittest.mock.patch.object(detect_fake_mode(examples), "allow_non_fake_inputs", True):
        decomposed = make_fx(gm, decomposition_table=select_decomp_table())(*examples)
        return compile_fx_inner(decomposed, examples)


def _concrete(value):
    """A SymInt input's value for this call (check_passes runs the graph on the example inputs)."""
    return value.node.hint if isinstance(value, torch.SymInt) else value


def _weights_dtype(frozen: Frozen) -> torch.dtype | None:
    """The floating dtype holding most weight elements: the model's dtype for the passes."""
    totals: dict[torch.dtype, int] = {}
    for tensor in frozen.tensors:
        if tensor.is_floating_point():
            totals[tensor.dtype] = totals.get(tensor.dtype, 0) + tensor.numel()
    return max(totals, key=totals.__getitem__) if totals else None


def _target(examples: Sequence):
    device = next((x.device for x in examples if isinstance(x, torch.Tensor)), torch.device("cpu"))
    if device.type == "cpu":
        return get_target("cpu")
    if device.type == "cuda":
        matching = targets_with_capability(torch.cuda.get_device_capability(device))
        return matching[0] if matching else None
    return None


def _dynamic_inputs(frozen: Frozen) -> list[str]:
    """Tensor inputs dynamo made dynamic, with their sizes as dynamo's fake tensors hold them."""
    found = []
    for name, node in zip(frozen.runtime_names, frozen.gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            found.append(f"{name}{list(value.shape)}")
    return found


