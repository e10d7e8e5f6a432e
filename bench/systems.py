"""The systems `llmc bench` measures, each behind one interface (System): the time to the first token of a prompt,
and the time per decode step of a batch of prompts. Every system is handed the same token ids, the same number of
new tokens and the same thread count by the sweep (compiler/bench.py), and decodes greedily.

- llmc: the bundle compiled for the target, run by llmc's engine (no prefix caching: rounds repeat prompts).
- eager / torch.compile: transformers' model; torch.compile runs its forward under inductor with a static KV
  cache, the set-up transformers documents for compiled generation (a dynamic cache changes shape every step and
  recompiles). The first call at each shape compiles; it is kept apart as `first_call_s`.
- onnxruntime: llmc's own --backend onnx export of the same model, run by the same engine through onnxruntime
  (intra-op threads = torch's thread count).
- llama.cpp: llama-cpp-python on the GGUF file itself, its quantized blocks as stored. Its Llama object holds one
  sequence, so it decodes batch 1 only.

onnxruntime and llama.cpp are optional: where one cannot run, `*_unavailable` says why in one line (and how to
install it), and the report carries that line instead of figures.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc.models.gguf import GGUFFile
from llmc.bench import probe
from llmc.runtime.engine import load
from llmc.runtime.onnx import INSTALL_ORT

# --no-cache-dir: pip would otherwise reuse a wheel it built before, whatever CMAKE_ARGS say now.
LLAMA_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-cache-dir "llama-cpp-python>=0.3"'


@dataclass
class System:
    ttft: Callable[[list[int]], float]  # prompt -> seconds to its first new token
    decode_step: Callable[[list[list[int]]], float]  # prompts -> seconds per decode step of the batch
    close: Callable[[], None] = lambda: None
    max_batch: int | None = None  # the largest decode batch it runs; None: any
    why_not_batch: str = ""  # the skip reason for a larger batch


def llmc_system(bundle: Path, device: str, kv_tokens: int, new_tokens: int) -> System:
    """llmc's engine on a bundle (the default backend's or --backend onnx's)."""
    engine = load(bundle, device=device, kv_cache_tokens=kv_tokens, prefix_caching=False)

    def ttft(prompt: list[int]) -> float:
        engine.generate([prompt], max_new_tokens=1)
        return engine.timing.first_token_s

    def decode_step(prompts: list[list[int]]) -> float:
        engine.generate(prompts, max_new_tokens=new_tokens)
        t = engine.timing
        if not t.decode_tokens:  # every sequence ended at an end-of-sequence token with its first new token
            raise RuntimeError("llmc ran no decode step: every prompt ended at once; rerun (fresh prompts are drawn)")
        # Steps, not tokens: a step decodes one token of each sequence still running.
        return t.decode_s / (t.decode_tokens / len(prompts))

    return System(ttft, decode_step)


def hf_generate(model, prompts: list[list[int]], new_tokens: int, cache_len: int | None) -> list[float]:
    """Timestamps (from the call) of each new token's logits: [0] is the time to first token. cache_len: a static
    cache of that many tokens (its shape is part of the compiled graphs), None for transformers' dynamic one."""
    from transformers import LogitsProcessor, LogitsProcessorList, StaticCache

    class Stamps(LogitsProcessor):
        def __init__(self, start: float):
            self.start, self.times = start, []

        def __call__(self, input_ids, scores):
            probe.synchronize(scores.device)
            self.times.append(time.perf_counter() - self.start)
            return scores

    ids = torch.tensor(prompts, device=model.device)
    extra = {"past_key_values": StaticCache(config=model.config, max_cache_len=cache_len)} if cache_len else {}
    probe.synchronize(model.device)
    stamps = Stamps(time.perf_counter())
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                       logits_processor=LogitsProcessorList([stamps]), **extra)
    return stamps.times


def hf_system(hf_args: dict, dtype: torch.dtype, device: str, compiled: bool, new_tokens: int,
              first_calls: dict) -> System:
    """transformers' model from hf_args (from_pretrained's arguments); compiled: torch.compile on its forward.
    first_calls gets the time of each shape's first (compiling) call."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(**hf_args, dtype=dtype).to(device).eval()
    model.generation_config.disable_compile = True  # only our torch.compile, never transformers' own
    if compiled:
        model.forward = torch.compile(model.forward)

    def cache_len(prompts: list[list[int]]) -> int | None:
        # The decode runs' cache for a prompt as long as their context: the compiled prefill is shared.
        return len(prompts[0]) + new_tokens if compiled else None

    def first_call(key: str, run: Callable[[], float]) -> None:
        if compiled and key not in first_calls:  # the compile of this shape: worth reporting on its own
            first_calls[key] = run()

    def ttft(prompt: list[int]) -> float:
        run = lambda: hf_generate(model, [prompt], 1, cache_len([prompt]))[0]  # noqa: E731
        first_call(f"prefill {len(prompt)}", run)
        return run()

    def decode_step(prompts: list[list[int]]) -> float:
        def run() -> float:
            times = hf_generate(model, prompts, new_tokens, cache_len(prompts))
            return (times[-1] - times[0]) / (len(times) - 1)

        first_call(f"decode batch {len(prompts)}", lambda: run() * (new_tokens - 1))
        return run()

    def close() -> None:
        nonlocal model
        del model
        if compiled:
            torch._dynamo.reset()

    return System(ttft, decode_step, close)


def onnx_unavailable(device: str, dtype: str) -> str | None:
    """Why llmc's onnx backend cannot run here, or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        return f"not installed: {INSTALL_ORT}"
    if device == "cpu" and dtype != "float32":
        return f"onnxruntime's CPU provider has no {dtype} kernels: bench with --dtype float32 to include it"
    if device != "cpu" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime has no CUDA provider: pip install onnxruntime-gpu"
    return None


def llama_unavailable(gguf: Path | None, device: str) -> str | None:
    """Why llama.cpp cannot run here, or None."""
    if gguf is None:
        return "runs GGUF files only: bench a GGUF file, or a packaged GGUF model such as smollm2-135m-instruct"
    if device != "cpu":
        return "measured on CPU only (llama-cpp-python's CPU build)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"not installed: {LLAMA_INSTALL} (builds llama.cpp for this CPU; minutes)"
    return None


def gguf_matmul_bytes(tensors: dict) -> int:
    """Bytes of a GGUF's matmul weights as stored, what llama.cpp reads in a decode step: every layer's 2-D
    weights and the output matrix (the token embedding when the model ties them). tensors: name -> gguf's
    ReaderTensor (GGUFFile.tensors)."""
    layers = sum(int(t.n_bytes) for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2)
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    return layers + int(head.n_bytes)


def llama_settings(file: Path, threads: int, n_ctx: int) -> dict:
    """Llama's arguments: the pinned thread count for decode and prompt processing alike, a whole prompt per
    llama_decode call (n_batch = n_ctx), llama-cpp-python's defaults otherwise (n_ubatch 512, f16 KV cache)."""
    return {"model_path": str(file), "n_ctx": n_ctx, "n_batch": n_ctx, "n_threads": threads,
            "n_threads_batch": threads, "verbose": False}


def llama_generate(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens after `prompt` and the time (from the call) each was picked: [0] is the time to first token."""
    llm.reset()  # forget the previous prompt: no prefix of it is reused
    start = time.perf_counter()
    llm.eval(prompt)
    tokens, times = [], []
    while True:
        tokens.append(llm.sample(temp=0.0))  # temp 0: llama.cpp's greedy sampler
        times.append(time.perf_counter() - start)
        if len(tokens) == new_tokens:
            return tokens, times
        llm.eval([tokens[-1]])


def llama_system(gguf: GGUFFile, threads: int, n_ctx: int, new_tokens: int) -> tuple[System, dict]:
    """llama.cpp on the GGUF file, and what the report says of it: its version, settings and the bytes it reads."""
    import llama_cpp

    settings = llama_settings(gguf.path, threads, n_ctx)
    llm = llama_cpp.Llama(**settings)
    info = {"version": llama_cpp.__version__, "weight_bytes": gguf_matmul_bytes(gguf.tensors),
            **{k: v for k, v in settings.items() if k not in ("model_path", "verbose")}}

    def decode_step(prompts: list[list[int]]) -> float:
        times = llama_generate(llm, prompts[0], new_tokens)[1]
        return (times[-1] - times[0]) / (len(times) - 1)

    return System(lambda prompt: llama_generate(llm, prompt, 1)[1][0], decode_step, llm.close, max_batch=1,
                  why_not_batch="skipped: llama-cpp-python's Llama decodes one sequence"), info
