"""llmc bind: a bundle compiled from a config alone gets its weights later and then generates exactly what a
bundle compiled with the weights generates."""
import json

import pytest
import torch

import llmc
from llmc.compiler.api import bind
from llmc.runtime.bundle import BundleError


def test_bind_later_equals_compile_with_weights(tiny_hf_checkpoint, tmp_path):
    ckpt = tiny_hf_checkpoint("llama", tied=True)
    bare = llmc.compile(ckpt.path, target="cpu", out=tmp_path / "bare.llmc", weights=False)
    manifest = json.loads((bare / "manifest.json").read_text())
    assert manifest["has_weights"] is False and not (bare / "weights").exists()
    with pytest.raises(BundleError, match="without weights"):
        llmc.load(bare)
    bound = bind(bare, ckpt.path, out=tmp_path / "bound.llmc")
    direct = llmc.compile(ckpt.path, target="cpu", out=tmp_path / "direct.llmc")
    assert (bound / "graph.json").read_text() == (direct / "graph.json").read_text()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 17)]
    assert llmc.load(bound).generate(prompts, max_new_tokens=8) == llmc.load(direct).generate(prompts, max_new_tokens=8)
    bind(bare, ckpt.path)  # in place
    assert json.loads((bare / "manifest.json").read_text())["has_weights"] is True


def test_bind_refuses_other_model(tiny_hf_checkpoint, tmp_path):
    bare = llmc.compile(tiny_hf_checkpoint("qwen3").path, target="cpu", out=tmp_path / "bare.llmc", weights=False)
    other = tiny_hf_checkpoint("qwen3", num_hidden_layers=3)
    with pytest.raises(ValueError, match="different model"):
        bind(bare, other.path)
    assert json.loads((bare / "manifest.json").read_text())["has_weights"] is False
