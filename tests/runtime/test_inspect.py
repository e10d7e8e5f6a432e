"""llmc inspect's storage line (the bytes of a bundle's tensors by storage scheme, from graph.json's shapes) and its
activation lines (planned on the spot at the engine's prefill chunk)."""
import json

import pytest

import llmc
from llmc.common.contract import KV_BLOCK_SIZE
from llmc.runtime.bundle import open_bundle
from llmc.runtime.engine import DEFAULT_PREFILL_CHUNK
from llmc.runtime.inspect import describe, weight_bytes_by_scheme


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory):
    return llmc.compile("llmc-tiny", target="cpu", dtype="float32", quant="int4", quant_group_size=64,
                        out=tmp_path_factory.mktemp("b") / "q.llmc")


def test_int4_bytes_are_the_packed_weights_scales_and_zeros(int4_bundle):
    bundle = open_bundle(int4_bundle, verify_hashes=False)
    by_scheme = weight_bytes_by_scheme(bundle.graph, bundle.manifest["weight_aliases"])
    # llmc-tiny: 4 layers of qkv [512, 256], o [256, 256], gate_up [1408, 256], down [256, 704]; group 64:
    # per weight N*K/2 packed bytes + N*K/64 float32 scales + N*K/64 uint8 zeros.
    gemms = [(512, 256), (256, 256), (1408, 256), (256, 704)]
    expected = 4 * sum(n * k // 2 + n * k // 64 * 4 + n * k // 64 for n, k in gemms)
    assert by_scheme["int4_w4a16"] == [expected, 16]
    stored = sum(f.stat().st_size for f in (int4_bundle / "weights").glob("*.safetensors"))
    total = sum(size for size, _ in by_scheme.values())
    assert total <= stored < total + 64 * 1024  # safetensors adds only its JSON headers
    line = next(line for line in describe(bundle) if line.startswith("storage"))
    assert "int4_w4a16" in line and "(16 GEMMs)" in line and "float32" in line


def test_tied_weights_are_counted_once():
    graph = {"graphs": {"prefill": {"nodes": [
        {"name": "a", "op": "get_attr", "target": "embed", "shape": [4, 8], "dtype": "bfloat16"},
        {"name": "b", "op": "get_attr", "target": "lm_head", "shape": [4, 8], "dtype": "bfloat16"}]}}}
    assert weight_bytes_by_scheme(graph, {}) == {"bfloat16": [128, 0]}
    assert weight_bytes_by_scheme(graph, {"lm_head": "embed"}) == {"bfloat16": [64, 0]}
    assert json.dumps(weight_bytes_by_scheme({"graphs": {}}, {})) == "{}"


def test_activations_are_planned_at_the_engines_prefill_chunk(module_hf_checkpoint, tmp_path):
    """A prompt longer than the engine's chunk is prefilled a chunk at a time: that is the step inspect sizes."""
    max_seq_len = DEFAULT_PREFILL_CHUNK + 2 * KV_BLOCK_SIZE + 3
    ckpt = module_hf_checkpoint("qwen3", max_position_embeddings=2 * DEFAULT_PREFILL_CHUNK)
    path = llmc.compile(ckpt.path, target="cpu", dtype="float32", max_seq_len=max_seq_len, out=tmp_path / "long.llmc")
    bundle = open_bundle(path, verify_hashes=False)
    assert "memory" not in bundle.graph  # compile stores no plan
    context = -(-max_seq_len // KV_BLOCK_SIZE) * KV_BLOCK_SIZE
    lines = [line.split(":")[0].removeprefix("activations").strip() for line in describe(bundle)
             if "without reuse" in line]
    assert lines == [f"prefill batch 1 x {DEFAULT_PREFILL_CHUNK} tokens, context {context} tokens",
                     f"prefill batch 32 x {DEFAULT_PREFILL_CHUNK} tokens, context {context} tokens",
                     f"decode batch 1, context {context} tokens", f"decode batch 32, context {context} tokens"]
