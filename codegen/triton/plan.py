"""Which Triton kernels a graph launches on a target arch: the specs the AOT compiler (aot.py) builds cubins of.

Every call of an llmc op that has a launcher (launch.LAUNCHERS) is run through that launcher under
`launch.recording(arch)` on meta tensors shaped like the node's inputs, so the plan is whatever the launcher
would launch on that GPU: the same block configuration, rendered source and argument list, with no GPU and
no weights. The graphs are dynamic in the token dims (batch, sequence), and the launchers pick a block
configuration by shape class (configs.shape_class: decode up to DECODE_MAX_M token rows, prefill above), so
each call is planned once per class with every symbolic dim set to that class's size; either graph can meet
either class (a prefill of one short prompt is decode-sized, a decode step of a large batch prefill-sized).
Attention calls are planned once more per prefill sequence-length bucket (configs.attention_plan_sizes), whose
block configurations differ; a paged call at S = 1 plans the decode kernel and its combine.

A spec's `launches` is the number of call sites in the graph it serves: a per-layer kernel of an L-layer model
serves L launches per step. Nothing here needs a GPU or imports the kernel sources.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from llmc.codegen.triton import configs, launch
from llmc.codegen.triton.aot import KernelSpec
from llmc.codegen.triton.configs import DECODE_MAX_M
from llmc.common.errors import LlmcError

# The size every symbolic dim takes when planning a shape class: the token count then falls in that class.
CLASS_DIM_SIZE = {"decode": 1, "prefill": DECODE_MAX_M + 1}


class PlanError(LlmcError, ValueError):
    pass


def llmc_op(node: fx.Node) -> str | None:
    """"rms_norm" for a call of torch.ops.llmc.rms_norm.default, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    namespace, _, rest = node.target.name().partition("::")
    return rest.split(".")[0] if namespace == "llmc" else None


def _concrete(value, size: int) -> int:
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr.xreplace({symbol: size for symbol in expr.free_symbols}))
    return int(value)


def meta_like(value: torch.Tensor, size: int) -> torch.Tensor:
    """A meta tensor with `value`'s dtype and layout (strides, storage offset: they decide the kernel's pointer
    alignment and whether a launcher copies), every symbolic dim set to `size`."""
    shape = [_concrete(d, size) for d in value.shape]
    stride = [_concrete(s, size) for s in value.stride()]
    offset = _concrete(value.storage_offset(), size)
    extent = offset + 1 + sum((d - 1) * s for d, s in zip(shape, stride)) if all(shape) else offset
    return torch.empty(extent, dtype=value.dtype, device="meta").as_strided(shape, stride, offset)


def _input_value(gm: fx.GraphModule, node: fx.Node):
    value = node.meta.get("val")
    if value is None and node.op == "get_attr":  # weights a pass registered carry no meta value
        value = operator.attrgetter(node.target)(gm)
    if not isinstance(value, torch.Tensor):
        raise PlanError(f"node {node.name} has no tensor value to plan a kernel launch with; run the graph "
                        "through torch.export or FakeTensorProp first")
    return value


def _meta_arguments(gm: fx.GraphModule, node: fx.Node, size: int) -> tuple[tuple, dict]:
    def convert(arg: fx.Node):
        return meta_like(_input_value(gm, arg), size)

    return fx.node.map_arg(node.args, convert), fx.node.map_arg(node.kwargs, convert)


def kernel_specs(gm: fx.GraphModule, arch: str) -> list[KernelSpec]:
    """The distinct kernel specs `gm`'s llmc op calls launch on `arch` ("sm_80"), both shape classes, each with
    `launches` = the number of call sites it serves, in first-use order."""
    sites: dict[tuple, tuple[KernelSpec, set[str]]] = {}
    for node in gm.graph.nodes:
        op = llmc_op(node)
        if op is None or op not in launch.LAUNCHERS:
            continue
        sizes = {**CLASS_DIM_SIZE, **(configs.attention_plan_sizes() if op in configs.ATTENTION_OPS else {})}
        for shape_class, size in sizes.items():
            args, kwargs = _meta_arguments(gm, node, size)
            with launch.recording(arch) as recorder:
                try:
                    launch.LAUNCHERS[op](*args, **kwargs)
                except ValueError as e:  # the launcher's own checks: a dtype or shape its kernel cannot take
                    raise PlanError(f"no Triton kernel for {node.name} ({op}, {shape_class}) on {arch}: {e}") from None
            for spec in recorder.specs:
                sites.setdefault(_identity(spec), (spec, set()))[1].add(node.name)
    return [dataclasses.replace(spec, launches=len(names)) for spec, names in sites.values()]


def launches_per_step(gm: fx.GraphModule, arch: str, size: int) -> int:
    """Kernel launches one run of gm makes on `arch` with every symbolic dim `size` (a paged decode attention
    call launches two: split-K partials and their combine)."""
    count = 0
    for node in gm.graph.nodes:
        op = llmc_op(node)
        if op is None or op not in launch.LAUNCHERS:
            continue
        args, kwargs = _meta_arguments(gm, node, size)
        with launch.recording(arch) as recorder:
            launch.LAUNCHERS[op](*args, **kwargs)
        count += len(recorder.specs)
    return count


def _identity(spec: KernelSpec) -> tuple:
    """Equal for specs that compile to the same cubin (the kernel name is a hash of its source)."""
    return (spec.name, tuple(spec.signature.items()), tuple(sorted(spec.constexprs.items())), spec.num_warps,
            spec.num_stages, spec.aligned, spec.op)
