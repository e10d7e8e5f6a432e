"""`llmc inspect`: what a bundle holds, in a few lines: model, target, passes, kernels, the bytes of its weights by
storage scheme (16-bit, each quantization scheme, 2:4 sparse), and its memory plan."""
from __future__ import annotations

from collections import defaultdict

import torch

from llmc.runtime.bundle import Bundle
from llmc.runtime.kv_cache import format_bytes

# Which arguments of a call hold its weight tensors, and the storage they are in.
QUANT_ARGS = {"llmc.quant_linear.default": (1, 2, 3, 4), "llmc.quant_linear_cpu.default": (1, 2, 3, 4),
              "llmc.sparse_linear.default": (1, 2)}


def describe(b: Bundle) -> list[str]:
    """`llmc inspect`'s lines for an opened bundle."""
    m = b.manifest
    # Only what open_bundle checked is certain; a hand-edited manifest may lack the rest, shown as "?".
    cfg, target = m["model"], m["target"]
    size = sum((b.path / f).stat().st_size for f in m["files"])
    passes = [p for p in m.get("passes") or [] if isinstance(p, dict)]
    lines = [
        f"bundle      {b.path} (format v{m['format_version']}, llmc {m.get('llmc_version', '?')}, {size / 1e6:.1f} MB)",
        f"model       {cfg.get('name', '?')} ({cfg.get('family', '?')}: {cfg.get('num_layers', '?')} layers, "
        f"hidden {cfg.get('hidden_size', '?')}, {cfg.get('num_heads', '?')} heads / {cfg.get('num_kv_heads', '?')} kv, "
        f"vocab {cfg.get('vocab_size', '?')})",
        f"target      {target['name']} ({target['arch']}), dtype {m['dtype']}",
        f"sequence    max {m.get('max_seq_len', '?')} tokens, KV block {m.get('block_size', '?')} tokens",
        f"weights     {'bound' if m['has_weights'] else 'not bound'}",
        "passes      " + ", ".join(f"{p.get('graph')}:{p.get('name')}={p.get('rewrites')}" for p in passes),
        "toolchain   " + ", ".join(f"{k} {v}" for k, v in (m.get("toolchain") or {}).items()),
    ]
    kernels = m.get("kernels")
    if isinstance(kernels, dict):
        per_step = kernels.get("launches_per_step") or {}
        lines.append(f"kernels     {kernels.get('kernels_compiled', '?')} compiled for "
                     f"{', '.join(kernels.get('archs') or ['?'])} ({kernels.get('distinct_kernels', '?')} distinct), "
                     "serving " + ", ".join(f"{graph} {n}" for graph, n in per_step.items()) + " launches per step")
    lines += weight_lines(b)
    lines += memory_lines(b.graph.get("memory") if isinstance(b.graph, dict) else None)
    return lines



def weight_bytes_by_scheme(graph: dict, aliases: dict) -> dict[str, list]:
    """{storage scheme: [bytes, number of GEMMs]} from graph.json's tensors (shape and dtype of every get_attr),
    each stored tensor counted once (tied weights are stored once: manifest weight_aliases)."""
    sizes, scheme_of, gemms = {}, {}, defaultdict(int)
    for g in graph.get("graphs", {}).values():
        nodes = g.get("nodes", [])
        for node in nodes:
            if node.get("op") == "get_attr" and node.get("target") not in aliases:
                dtype = getattr(torch, str(node.get("dtype")), None)
                if isinstance(dtype, torch.dtype) and all(isinstance(d, int) for d in node.get("shape", [None])):
                    numel = 1
                    for d in node["shape"]:
                        numel *= d
                    sizes[node["target"]] = (numel * dtype.itemsize, node["dtype"])
        for node in nodes:
            positions = QUANT_ARGS.get(node.get("target"))
            if positions is None:
                continue
            args = node.get("args", [])
            scheme = args[9] if node["target"].startswith("llmc.quant_linear") else "2:4 sparse"
            for i in positions:
                if isinstance(args[i], dict) and "node" in args[i]:
                    scheme_of[args[i]["node"]] = scheme
            gemms[scheme] += 1
    out = defaultdict(lambda: [0, 0])
    for name, (size, dtype) in sizes.items():
        out[scheme_of.get(name, dtype)][0] += size
    graphs = max(1, len(graph.get("graphs", {})))
    for scheme, count in gemms.items():
        out[scheme][1] = count // graphs  # each graph calls every GEMM once
    return dict(out)


def weight_lines(b: Bundle) -> list[str]:
    if not isinstance(b.graph, dict):
        return []
    by_scheme = weight_bytes_by_scheme(b.graph, b.manifest.get("weight_aliases") or {})
    if not by_scheme:
        return []
    total = sum(size for size, _ in by_scheme.values())
    parts = [f"{scheme} {format_bytes(size)}" + (f" ({n} GEMMs)" if n else "")
             for scheme, (size, n) in sorted(by_scheme.items(), key=lambda item: -item[1][0])]
    return [f"storage     {format_bytes(total)} of tensors: " + ", ".join(parts)]


def memory_lines(memory) -> list[str]:
    """graph.json's "memory" section (compiler/plan.py) as inspect's lines; "?" where a hand edit broke it."""
    if not isinstance(memory, dict):
        return ["memory      not planned (compiled by an older llmc; recompile to see memory figures)"]
    block = memory.get("block_size", "?")
    lines = [f"memory      weights {format_bytes(memory.get('weight_bytes'))}; KV cache "
             f"{format_bytes(memory.get('kv_cache_bytes_per_token'))} per token, "
             f"{format_bytes(memory.get('kv_cache_bytes_per_block'))} per {block}-token block"]
    head = "activations "
    for graph, plans in (memory.get("plans") or {}).items():
        for p in [p for p in plans if isinstance(p, dict)] if isinstance(plans, list) else []:
            shape = p.get("shape") or {}
            batch, tokens, blocks = shape.get("batch", "?"), shape.get("new_tokens", "?"), shape.get("kv_blocks")
            context = blocks * block if isinstance(blocks, int) and isinstance(block, int) else "?"
            at = (f"{graph} batch {batch} x {tokens} tokens" if graph != "decode" else
                  f"{graph} batch {batch}, context {context} tokens")
            lines.append(f"{head}{at}: peak {format_bytes(p.get('peak_bytes'))} "
                         f"({format_bytes(p.get('naive_bytes'))} without reuse)")
            head = " " * len(head)
    return lines


