"""A tiny transformers Qwen3 checkpoint compiled once per test module (compiling takes seconds)."""
import pytest

import llmc


@pytest.fixture(scope="module")
def tiny_bundle(module_hf_checkpoint, tmp_path_factory):
    ckpt = module_hf_checkpoint("qwen3", tied=True, hidden_size=64, head_dim=16, num_attention_heads=4)
    return ckpt, llmc.compile(ckpt.path, target="cpu", dtype="float32", out=tmp_path_factory.mktemp("bundle") / "tiny.llmc")
