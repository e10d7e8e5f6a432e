"""A bundle's step graphs, loaded for its backend: the graph.json GraphModules (with, on CUDA, the scope in which
they launch the bundle's shipped kernels), an ONNX model for onnxruntime, or a TensorRT engine; and which of them
write the KV cache themselves. runtime/engine.py runs them."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import torch

from llmc.codegen.cpu.direct import call_directly
from llmc.codegen.graph_io import graph_from_json, resolve_target
from llmc.runtime.bundle import Bundle, BundleError


# The ops that write a layer's keys and values into the cache in place (the fuse_kv_write pass, its CPU lowering).
KV_WRITERS = ("llmc.rope_write_kv.default", "llmc.rope_write_kv_cpu.default")


def graph_writes_kv(graph: dict, num_layers: int) -> bool:
    """Whether a graph.json graph writes every layer's new keys and values into the cache itself: it calls a
    KV_WRITERS op for each layer. A graph that writes only some layers (the pass skipped an attention) leaves the
    writing to the engine, which then rewrites those layers with equal values."""
    layers = set()
    for node in graph["nodes"]:
        if node.get("target") in KV_WRITERS:
            schema = resolve_target(node["target"])._schema
            layer = [a.name for a in schema.arguments].index("layer")  # by name: the op's schema says where
            layers.add(node["kwargs"]["layer"] if "layer" in node.get("kwargs", {}) else node["args"][layer])
    return layers == set(range(num_layers))


def shipped_kernel_scope(kernels_dir: Path) -> Callable[[], AbstractContextManager]:
    """On CUDA the llmc ops run their Triton launchers, which inside the returned scope launch the bundle's cubins
    (no Triton compilation) where it ships them for this GPU; what it lacks, they JIT-compile."""
    from llmc.codegen.triton import launch
    from llmc.codegen.triton.record import ShippedKernels
    from llmc.runtime.kernels import KernelLibrary

    launch.register_cuda_impls()
    library = KernelLibrary(kernels_dir) if (kernels_dir / "index.json").is_file() else None
    if library is not None:
        library.load_all()
    shipped = ShippedKernels(library) if library is not None else None
    return partial(launch.using, shipped)


def load_graphs(bundle: Bundle, backend: str, dev: torch.device, dtype: torch.dtype
                 ) -> tuple[dict, frozenset, Callable[[], AbstractContextManager]]:
    """The bundle's prefill and decode graphs for its backend, those among them that write the KV cache, and the
    kernel scope they run in (Engine.kernel_scope)."""
    if backend == "onnx":
        from llmc.runtime.onnx import OnnxGraph

        graph = OnnxGraph(bundle.path / bundle.manifest["onnx"]["file"], dev, dtype)
        return {"prefill": graph, "decode": graph}, frozenset(), contextlib.nullcontext
    if backend == "tensorrt":
        from llmc.runtime.tensorrt import load_graphs

        return load_graphs(bundle, dev), frozenset(), contextlib.nullcontext
    if backend != "triton":
        raise BundleError(f"{bundle.path} runs with backend {backend!r}, which this llmc does not know; upgrade "
                          f"llmc or recompile the bundle")
    scope = shipped_kernel_scope(bundle.path / "kernels") if dev.type == "cuda" else contextlib.nullcontext
    weights = bundle.load_weights(dev)
    graphs = {name: graph_from_json(g, weights, dev) for name, g in bundle.graph["graphs"].items()}
    if dev.type == "cpu":
        for gm in graphs.values():
            call_directly(gm)  # skips the dispatcher's cost per llmc op call (codegen/cpu/direct.py)
    num_layers = bundle.config["num_layers"]
    writing = frozenset(name for name, g in bundle.graph["graphs"].items() if graph_writes_kv(g, num_layers))
    return graphs, writing, scope
