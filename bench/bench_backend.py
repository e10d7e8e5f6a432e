"""torch.compile(backend="llmc") on transformers' Qwen3ForCausalLM and LlamaForCausalLM beside eager and
backend="inductor", in one process: greedy generate() with transformers' own dynamic KV cache, bf16, random
weights at a registry model's shapes, decode time per token (median over runs), naming the device. GPU only.

    python bench/bench_backend.py                       # qwen3-0.6b and llama3.2-1b shapes
    python bench/bench_backend.py --models qwen3-8b --new-tokens 64 --out $OUT/backend.json

Per token: (time of the last token's logits - time of the first's) / (new tokens - 1), so prefill is left out.
Every compiled system first runs one untimed generate() (its compiles: prefill, then decode until the length is
dynamic); "tokens = eager" says whether its greedy tokens equal eager's (bf16 kernels may round differently).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from llmc.bench.probe import device_name, device_slug

RESULTS = Path(__file__).parent / "results"
SYSTEMS = ("eager", "inductor", "llmc")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen3-0.6b", "llama3.2-1b"],
                        help="registry names (llmc.models.registry) whose shapes the random models take")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>/)")
    return parser.parse_args(argv)


def random_model(name: str, dtype, device: str):
    """transformers' model class for the registry config `name`, with random weights, built on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmc.models.registry import get_config

    hf = get_config(name).to_hf()
    hf.pop("architectures")
    hf.pop("torch_dtype")
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.disable_compile = True  # only the torch.compile this script asks for
    return model.eval()


def decode_per_token(model, ids, new_tokens: int) -> tuple[float, list]:
    """Seconds per decoded token of one greedy generate(), and its tokens."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    stamps = Stamps()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             logits_processor=LogitsProcessorList([stamps]))
    return (stamps.times[-1] - stamps.times[0]) / (len(stamps.times) - 1), out[:, ids.shape[1]:].tolist()


def bench_model(name: str, args) -> dict:
    import torch

    dtype = getattr(torch, args.dtype)
    model = random_model(name, dtype, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), device="cuda")
    plain_forward = model.forward
    row = {"model": name, "ms_per_token": {}, "first_generate_s": {}, "tokens_equal_eager": {}}
    eager_tokens = None
    for system in SYSTEMS:
        torch._dynamo.reset()
        model.forward = plain_forward if system == "eager" else torch.compile(plain_forward, backend=system)
        start = time.perf_counter()
        _, tokens = decode_per_token(model, ids, args.new_tokens)  # warm-up; for compiled systems, the compiles
        row["first_generate_s"][system] = time.perf_counter() - start
        times = []
        for _ in range(args.repeat):
            seconds, tokens = decode_per_token(model, ids, args.new_tokens)
            times.append(seconds)
        row["ms_per_token"][system] = statistics.median(times) * 1e3
        eager_tokens = tokens if system == "eager" else eager_tokens
        row["tokens_equal_eager"][system] = tokens == eager_tokens
        if system == "llmc":
            import llmc

            row["llmc_rewrites"] = llmc.last_report().rewrites()
    model.forward = plain_forward
    torch._dynamo.reset()
    ms = row["ms_per_token"]
    row["speedup_vs_eager"] = ms["eager"] / ms["llmc"]
    row["speedup_vs_inductor"] = ms["inductor"] / ms["llmc"]
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_backend needs a CUDA GPU")
    device = device_name("cuda")
    rows = [bench_model(name, args) for name in args.models]
    print(f"torch.compile backends, decode ms/token, {args.dtype}, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, on {device}")
    print(f"{'model':<14}{'eager':>9}{'inductor':>10}{'llmc':>9}{'x eager':>9}{'x inductor':>12}  tokens = eager")
    for row in rows:
        ms = row["ms_per_token"]
        same = ", ".join(s for s in SYSTEMS[1:] if row["tokens_equal_eager"][s]) or "none"
        print(f"{row['model']:<14}{ms['eager']:>9.3f}{ms['inductor']:>10.3f}{ms['llmc']:>9.3f}"
              f"{row['speedup_vs_eager']:>9.2f}{row['speedup_vs_inductor']:>12.2f}  {same}")
    out = args.out or RESULTS / device_slug(device) / "backend.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "dtype": args.dtype,
                               "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
