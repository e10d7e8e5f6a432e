"""`llmc compile --backend onnx / tensorrt` end to end on CPU: transformers' tiny Qwen3 and Llama through the ONNX
export and onnxruntime generate exactly transformers' greedy tokens in float32."""
import json

import pytest
import torch

import llmc
from llmc.runtime.bundle import verify_bundle


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_onnx_backend_generates_transformers_greedy_tokens(tiny_hf_checkpoint, hf_greedy, tmp_path, family):
    ckpt = tiny_hf_checkpoint(family, tied=family == "qwen3", num_hidden_layers=2)
    bundle = llmc.compile(ckpt.path, target="cpu", out=tmp_path / "b.llmc", backend="onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"] == "onnx" and manifest["onnx"]["file"] == "onnx/model.onnx"
    assert not (bundle / "weights").exists()  # the weights are the ONNX model's, stored once
    names = {p["name"] for p in manifest["passes"]}
    assert "fuse_kv_write" not in names  # an ONNX graph returns its keys: the engine writes them
    verify_bundle(bundle)
    engine = llmc.load(bundle)
    assert engine.graphs["prefill"] is engine.graphs["decode"]  # one model serves both steps
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 19, 2)]  # 19 > one 16-token KV block
    got = engine.generate(prompts, max_new_tokens=24)
    assert got == [hf_greedy(ckpt.model, p, 24) for p in prompts]
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


def test_tensorrt_backend_holds_the_onnx_and_build_settings(tiny_hf_checkpoint, tmp_path):
    ckpt = tiny_hf_checkpoint("qwen3", num_hidden_layers=1)
    bundle = llmc.compile(ckpt.path, target="a100", dtype="float16", out=tmp_path / "b.llmc", backend="tensorrt")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt"
    settings = json.loads((bundle / "tensorrt" / "settings.json").read_text())
    assert "tensorrt/settings.json" in manifest["files"] and "onnx/model.onnx" in manifest["files"]
    assert settings["compute_capability"] == [8, 0]
    verify_bundle(bundle)


@pytest.mark.parametrize("kwargs,message", [
    ({"backend": "tvm"}, "unknown --backend 'tvm'"),
    ({"backend": "tensorrt"}, "needs a GPU target"),
])
def test_backend_options_that_cannot_work_are_refused(tiny_hf_checkpoint, tmp_path, kwargs, message):
    ckpt = tiny_hf_checkpoint("qwen3", num_hidden_layers=1)
    with pytest.raises(ValueError, match=message):
        llmc.compile(ckpt.path, target="cpu", out=tmp_path / "b.llmc", **kwargs)
    assert not (tmp_path / "b.llmc").exists()


def test_onnx_backend_needs_weights(tmp_path):
    with pytest.raises(ValueError, match="--backend onnx validates the export and needs weights"):
        llmc.compile("qwen3-0.6b", target="cpu", out=tmp_path / "b.llmc", backend="onnx")
