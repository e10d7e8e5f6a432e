"""The non-Triton backends of `llmc compile --backend`: the passed prefill graph exported to ONNX (which serves
decode too), plus TensorRT's builder settings for --backend tensorrt (the engine itself is built on the GPU host:
`llmc build-engine BUNDLE` or the first load)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmc.common.contract import DEFAULT_MAX_BATCH

ONNX_DIR = "onnx"
TENSORRT_SETTINGS = "tensorrt/settings.json"


def export_backend(gm: torch.fx.GraphModule, inputs: tuple, backend: str, target, dtype: str, max_seq_len: int,
                   block_size: int, config, scratch: Path) -> tuple[dict[str, Path], dict]:
    """Writes the backend's files under `scratch`; returns {path in the bundle: file} and the export report."""
    from llmc.codegen.onnx import export_onnx

    settings = None
    if backend == "tensorrt":  # settings first: a target TensorRT cannot serve is refused before the export
        from llmc.codegen.tensorrt import build_settings

        settings = build_settings(target, dtype, DEFAULT_MAX_BATCH, max_seq_len, block_size, config.num_layers,
                                  config.num_kv_heads, config.head_dim)
    exported = export_onnx(gm, inputs, scratch / ONNX_DIR)
    files = {f"{ONNX_DIR}/{name}": path for name, path in exported.files.items()}
    if settings is not None:
        path = scratch / TENSORRT_SETTINGS
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")
        files[TENSORRT_SETTINGS] = path
    return files, exported.report
