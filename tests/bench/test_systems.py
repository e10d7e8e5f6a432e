"""The peers of `llmc bench` beyond transformers. llama.cpp runs for real where llama-cpp-python is installed (CI's
fresh environment has no build of it: those tests skip there), on a tiny GGUF written here: greedy, on the very
prompt given, with the pinned thread count, and inside the sweep beside llmc. Its floor counts the GGUF's stored
bytes. Nothing here checks a speed."""
from __future__ import annotations

import sys

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmc.bench import systems as bench_systems
from llmc.bench.run import run_bench
from llmc.models.gguf import GGUFFile
from tests.models.test_gguf import reference, tiny_hf, write_gguf

LAYER_MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny llama in F32 (llama.cpp then multiplies in f32, close to transformers' float32)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, tiny_hf("llama", tied=False), "llama", Q.F32)
    return path


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen3", True)])
def test_llama_cpp_floor_counts_the_matmul_weights_as_stored(tmp_path, family, tied):
    model = tiny_hf(family, tied=tied)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, family, Q.Q4_1)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q4_1]
    weights = dict(model.named_parameters())
    stored = sum(w.numel() for name, w in weights.items() if name.split(".")[-2] in LAYER_MATMULS)
    stored += weights["model.embed_tokens.weight" if tied else "lm_head.weight"].numel()  # the output matrix
    assert bench_systems.gguf_matmul_bytes(GGUFFile(path).tensors) == stored // block * size


def test_why_a_peer_cannot_run(monkeypatch, tmp_path):
    assert "runs GGUF files only" in bench_systems.llama_unavailable(None, "cpu")
    assert "CPU only" in bench_systems.llama_unavailable(tmp_path / "m.gguf", "cuda")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    reason = bench_systems.llama_unavailable(tmp_path / "m.gguf", "cpu")
    assert reason.startswith('not installed: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-cache-dir '
                             '"llama-cpp-python>=0.3"')
    assert "no bfloat16 kernels" in bench_systems.onnx_unavailable("cpu", "bfloat16")


def test_llama_cpp_decodes_greedily_after_the_given_prompt(tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(**bench_systems.llama_settings(tiny_gguf, 2, 256))
    assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (2, 2)
    prompt = torch.randint(1, 4096, (13,)).tolist()
    tokens, times = bench_systems.llama_generate(llm, prompt, 8)
    assert len(tokens) == 8 and times == sorted(times) and times[0] > 0
    again, _ = bench_systems.llama_generate(llm, prompt, 8)
    assert again == tokens  # the previous prompt's cache is not reused as if it were a prefix
    # Each token is transformers' argmax on the same file after the same prompt and the tokens before it, up to
    # near-ties: llama.cpp keeps its KV cache in f16.
    ref = reference(tiny_gguf.parent, tiny_gguf.name)
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    picked = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (logits.max(dim=1).values - picked).max() < 1e-2, (tokens, logits.argmax(dim=1).tolist())
    llm.close()


def test_the_sweep_runs_llama_cpp_beside_llmc_on_the_same_gguf(tiny_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    report = run_bench(str(tiny_gguf), quick=True, batches=[1, 2], threads=1, peers=["llama.cpp", "eager"],
                       workdir=tmp_path, progress=False)
    assert report["weights"] == "gguf" and report["threads"] == 1
    assert report["llama_cpp"]["n_threads"] == report["llama_cpp"]["n_threads_batch"] == 1
    assert set(report["not_run"]) == {"torch.compile", "onnxruntime"}
    stored = bench_systems.gguf_matmul_bytes(GGUFFile(tiny_gguf).tensors)
    assert report["llama_cpp"]["weight_bytes"] == stored
    prefill, decode1, decode2 = report["prefill"][0], *report["decode"]
    for row in (prefill, decode1):
        assert row["llama.cpp"]["seconds"] > 0 and row["llmc"]["seconds"] > 0 and row["eager"]["seconds"] > 0
        best = min(("llama.cpp", "eager"), key=lambda s: row[s]["seconds"])
        assert row["best_peer"] == best
        assert row["llmc"]["vs_best_peer"] == pytest.approx(row[best]["seconds"] / row["llmc"]["seconds"])
    kv = 2 * 2 * 2 * 16 * 2  # k and v, 2 layers, 2 kv heads, head_dim 16, f16
    floor = (stored + decode1["context"] * kv) / report["probes"]["copy_bytes_per_s"]
    assert decode1["llama.cpp"]["floor_s"] == pytest.approx(floor)
    assert decode1["llama.cpp"]["fraction_of_floor"] == pytest.approx(floor / decode1["llama.cpp"]["seconds"])
    assert "one sequence" in decode2["llama.cpp"]["skipped"] and decode2["best_peer"] == "eager"
    assert decode2["llmc"]["seconds"] > 0 and report["memory"]["llama.cpp"]["peak_bytes"] > 0
