"""`llmc inspect`: what a bundle holds, in a few lines: model, target, passes, kernels, the bytes of its weights by
storage scheme (16-bit, each quantization scheme, 2:4 sparse), and the memory it needs: KV cache bytes and the
activations of the engine's largest steps, planned on demand (runtime/plan.py) for the engine's prefill chunk."""
from __future__ import annotations

from collections import defaultdict

import torch

from llmc.common.contract import DEFAULT_MAX_BATCH
from llmc.runtime.bundle import Bundle
from llmc.runtime.engine import DEFAULT_PREFILL_CHUNK
from llmc.runtime.kv_cache import block_bytes, format_bytes
from llmc.runtime.plan import plan_bundle

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
    lines += memory_lines(b)
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


def memory_lines(b: Bundle, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_batch: int = DEFAULT_MAX_BATCH
                 ) -> list[str]:
    """Weights, KV cache per token and block, and each graph's activation peak at the engine's largest steps,
    planned now from graph.json (runtime/plan.py); a "memory" section older bundles stored is not read (it was
    planned for whole-prompt prefill, which the engine no longer runs)."""
    if not isinstance(b.graph, dict) or not isinstance(b.graph.get("graphs"), dict):
        return ["memory      ? (graph.json holds no graphs)"]
    cfg, block, dtype = b.config, b.manifest["block_size"], getattr(torch, b.dtype)
    per_token = block_bytes(cfg["num_layers"], 1, cfg["num_kv_heads"], cfg["head_dim"], dtype)
    weights = sum(size for size, _ in weight_bytes_by_scheme(b.graph, b.manifest.get("weight_aliases") or {}).values())
    lines = [f"memory      weights {format_bytes(weights)}; KV cache {format_bytes(per_token)} per token, "
             f"{format_bytes(per_token * block)} per {block}-token block"]
    head = "activations "
    plans = plan_bundle(b.graph, cfg, dtype, block, b.manifest["max_seq_len"], prefill_chunk, max_batch)
    for graph, shapes in plans.items():
        for p in shapes:
            shape = p["shape"]
            tokens = f" x {shape['new_tokens']} tokens" if graph != "decode" else ""
            lines.append(f"{head}{graph} batch {shape['batch']}{tokens}, context {shape['kv_blocks'] * block} "
                         f"tokens: peak {format_bytes(p['peak_bytes'])} ({format_bytes(p['naive_bytes'])} without "
                         "reuse)")
            head = " " * len(head)
    return lines
