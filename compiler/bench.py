"""The `llmc bench` sweep: llmc beside Hugging Face eager and torch.compile on one model, in one process.

For a registry name the model gets random weights, written as a Hugging Face checkpoint to a temporary
directory, so that llmc compiles and transformers loads the very same tensors. For each system it measures time
to first token over prompt lengths (batch 1) and decode time per step over batch sizes, and its peak memory;
for llmc also the compile time and the cold start (bundle load to first token). Each figure is set against
its floor on the measured device (runtime/bench.py) and llmc's figures against the other two.

torch.compile runs transformers' forward under inductor (default mode) with a static KV cache, the set-up
transformers documents for compiled generation: a dynamic cache changes shape every step and recompiles.
Its first call (compilation) is a warm-up and is reported apart as `first_call_s`.

A point that cannot run here is recorded as {"skipped": reason}, never estimated: lengths beyond the model's
maximum, runs whose time, extrapolated from a shorter measured length by FLOPs, exceeds the per-point budget,
and llmc prompts whose attention scores would not fit in memory (the reference attention materializes them).
"""
from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import llmc
from llmc.compiler.api import compile as llmc_compile
from llmc.models.loader import read_config, save_checkpoint
from llmc.models.registry import EMBEDDED_DIR, EMBEDDED_NAME, get_config
from llmc.models.transformer import Transformer
from llmc.runtime import bench as probe
from llmc.runtime.engine import load
from llmc.targets import get_target, resolve_dtype, targets_with_capability

SYSTEMS = ("llmc", "eager", "torch.compile")


@dataclass
class BenchSettings:
    lengths: list[int] = field(default_factory=lambda: [128, 1024, 4096, 16384, 32768])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    decode_context: int = 128  # prompt length of the decode runs
    new_tokens: int = 32  # per decode run; the first comes from the prefill and is not counted
    warmup: int = 1
    repeat: int = 3
    point_budget_s: float = 120.0  # skip a point whose extrapolated time exceeds this

    @classmethod
    def quick(cls) -> BenchSettings:
        """One length, one batch, a few tokens: every system and field exercised, in CI time."""
        return cls(lengths=[64], batches=[1], decode_context=64, new_tokens=4, warmup=1, repeat=1,
                   point_budget_s=30.0)


def host_target(device: str) -> str:
    if device == "cpu":
        return "cpu"
    known = targets_with_capability(torch.cuda.get_device_capability())
    if not known:
        raise ValueError(f"no llmc target for {torch.cuda.get_device_name()}; pass --target")
    return known[0].name


def prepare_checkpoint(model: str, directory: Path, device: str) -> tuple[str, Path]:
    """(model name, checkpoint directory): the embedded model or a checkpoint directory as is, a registry name
    with random weights (stored in bfloat16, each system casts to the bench dtype)."""
    if model.lower() == EMBEDDED_NAME:
        return EMBEDDED_NAME, EMBEDDED_DIR
    path = Path(model)
    if (path / "manifest.json").is_file():
        raise ValueError(f"{model} is a bundle; bench needs the model it came from to build the transformers "
                         "baselines: give its checkpoint directory or registry name")
    if path.is_dir():
        read_config(path)
        return path.resolve().name, path
    cfg = get_config(model)
    torch.manual_seed(0)
    with torch.device(device):
        net = Transformer(cfg)
    save_checkpoint(net, directory, torch.bfloat16)
    del net
    return model.lower(), directory


def _round_up(n: int, block: int = 16) -> int:
    return -(-n // block) * block


def _free_memory_bytes(device: str) -> int:
    if device != "cpu":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


class _Points:
    """Decides which points to skip, from the model's limit and the last measured time of each system."""

    def __init__(self, max_len: int, settings: BenchSettings, shapes: probe.Shapes):
        self.max_len, self.settings, self.shapes = max_len, settings, shapes
        self.last: dict[str, tuple[float, float]] = {}  # system -> (flops, seconds) of its last prefill

    def prefill_skip(self, system: str, length: int, dtype_bytes: int, device: str) -> str | None:
        if length + 1 > self.max_len:
            return f"skipped: beyond the model's maximum of {self.max_len} tokens"
        flops = probe.prefill_flops(self.shapes, 1, length)
        if system in self.last:
            done_flops, done_s = self.last[system]
            estimate = done_s * flops / done_flops
            if estimate > self.settings.point_budget_s:
                return (f"skipped: about {estimate:.0f} s (scaled by FLOPs from a measured shorter prompt) exceeds "
                        f"the {self.settings.point_budget_s:.0f} s budget per point")
        if system == "llmc":
            scores = self.shapes.num_heads * length * length * max(dtype_bytes, 4) * 2
            if scores > _free_memory_bytes(device):
                return f"skipped: llmc's reference attention would need {scores / 1e9:.0f} GB for its scores"
        return None

    def record(self, system: str, length: int, seconds: float) -> None:
        self.last[system] = (probe.prefill_flops(self.shapes, 1, length), seconds)


def _llmc_ttft(engine, length: int, vocab: int, warmup: int, repeat: int) -> float:
    def once():
        engine.generate([torch.randint(0, vocab, (length,)).tolist()], max_new_tokens=1)
        return engine.timing.first_token_s

    return probe.median_of(once, warmup, repeat)


def _llmc_decode_step(engine, batch: int, context: int, new_tokens: int, vocab: int, warmup: int,
                      repeat: int) -> float:
    def once():
        prompts = torch.randint(0, vocab, (batch, context)).tolist()
        engine.generate(prompts, max_new_tokens=new_tokens)
        return engine.timing.decode_s / (engine.timing.decode_tokens / batch)

    return probe.median_of(once, warmup, repeat)


def _hf_generate(model, batch: int, length: int, new_tokens: int, vocab: int, cache_len: int | None) -> list[float]:
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

    ids = torch.randint(0, vocab, (batch, length), device=model.device)
    extra = {"past_key_values": StaticCache(config=model.config, max_cache_len=cache_len)} if cache_len else {}
    probe.synchronize(model.device)
    stamps = Stamps(time.perf_counter())
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                       logits_processor=LogitsProcessorList([stamps]), **extra)
    return stamps.times


def _load_hf(checkpoint: Path, dtype: torch.dtype, device: str, compiled: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    model.generation_config.disable_compile = True  # only our torch.compile, never transformers' own
    if compiled:
        model.forward = torch.compile(model.forward)
    return model


def _entry(seconds: float, floor_s: float, **more) -> dict:
    return {"seconds": seconds, "fraction_of_floor": floor_s / seconds, **more}


def run_bench(model: str, quick: bool = False, device: str = "cpu", lengths: list[int] | None = None,
              batches: list[int] | None = None, target: str | None = None, dtype: str | None = None,
              workdir: str | Path | None = None, progress: bool = True) -> dict:
    """Measures llmc, transformers eager and torch.compile on MODEL; returns the report (see bench/report.py)."""
    settings = BenchSettings.quick() if quick else BenchSettings()
    settings.lengths = sorted(set(lengths or settings.lengths))
    settings.batches = sorted(batches or settings.batches)
    if min(settings.lengths) < 1 or min(settings.batches) < 1:
        raise ValueError("--lengths and --batches must be positive")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    tgt = get_target(target or host_target(device))
    dtype_name = resolve_dtype(tgt, dtype)
    torch_dtype = getattr(torch, dtype_name)
    dtype_bytes = torch.empty(0, dtype=torch_dtype).element_size()
    with tempfile.TemporaryDirectory(dir=workdir, prefix="llmc-bench-") as tmp:
        name, checkpoint = prepare_checkpoint(model, Path(tmp) / "checkpoint", device)
        cfg = read_config(checkpoint)
        shapes = probe.Shapes.from_config(cfg.to_dict())
        settings.decode_context = min(settings.decode_context, cfg.max_position_embeddings - settings.new_tokens)
        longest = cfg.max_position_embeddings - 1  # one new token must fit
        if max(settings.lengths) > longest:  # measure at the model's limit rather than stop short of it
            settings.lengths = sorted({*settings.lengths, longest})
        report = {
            "model": name, "device": probe.device_name(device), "target": tgt.name, "dtype": dtype_name,
            # The embedded model and a checkpoint directory bring their weights; a registry name gets random ones.
            "weights": "random" if checkpoint.is_relative_to(tmp) else "checkpoint",
            "quick": quick, "date": time.strftime("%Y-%m-%d"), "settings": asdict(settings),
            "versions": {"llmc": llmc.__version__, "torch": torch.__version__, **_hf_version()},
            "config": cfg.to_dict(),
            "probes": {"copy_bytes_per_s": probe.copy_bandwidth(device),
                       "matmul_flops_per_s": probe.matmul_rate(device, torch_dtype), "matmul_dtype": dtype_name},
        }
        report["device_slug"] = probe.device_slug(report["device"])
        if max(settings.lengths) > longest:
            report["capped"] = (f"prompts longer than {longest} tokens skipped (the model's maximum is "
                                f"{cfg.max_position_embeddings}); measured at {longest} instead")
        points = _Points(cfg.max_position_embeddings, settings, shapes)
        prefill = [{"batch": 1, "length": n, "flops": probe.prefill_flops(shapes, 1, n),
                    "floor_s": probe.prefill_floor_s(shapes, 1, n, report["probes"]["matmul_flops_per_s"])}
                   for n in settings.lengths]
        context = settings.decode_context
        decode = [{"batch": b, "context": context, "new_tokens": settings.new_tokens,
                   "bytes_per_step": probe.decode_step_bytes(shapes, b, context, dtype_bytes),
                   "floor_s": probe.decode_floor_s(shapes, b, context, dtype_bytes,
                                                   report["probes"]["copy_bytes_per_s"])}
                  for b in settings.batches]
        total = len(SYSTEMS) * (len(prefill) + len(decode)) + 1
        bar = tqdm(total=total, desc=f"bench {name}", unit="point", disable=not progress)
        memory = {}
        for system in SYSTEMS:
            with probe.PeakMemory(device) as peak:
                if system == "llmc":
                    run = _llmc_system(report, checkpoint, tgt.name, dtype_name, device, settings, bar, tmp)
                else:
                    run = _hf_system(system, checkpoint, torch_dtype, device, settings, report, bar)
                for row in prefill:
                    bar.set_postfix_str(f"{system} prefill {row['length']}")
                    skip = points.prefill_skip(system, row["length"], dtype_bytes, device)
                    if skip:
                        row[system] = {"skipped": skip}
                    else:
                        seconds = run.ttft(row["length"])
                        points.record(system, row["length"], seconds)
                        row[system] = _entry(seconds, row["floor_s"])
                    bar.update()
                for row in decode:
                    bar.set_postfix_str(f"{system} decode batch {row['batch']}")
                    seconds = run.decode_step(row["batch"])
                    row[system] = _entry(seconds, row["floor_s"], tokens_per_s=row["batch"] / seconds)
                    bar.update()
                run.close()
            memory[system] = peak.to_dict()
            gc.collect()
        bar.close()
    for row in prefill + decode:
        for other in SYSTEMS[1:]:
            ours, theirs = row["llmc"].get("seconds"), row[other].get("seconds")
            row[f"llmc_speedup_vs_{other}"] = theirs / ours if ours and theirs else None
    report.update(prefill=prefill, decode=decode, memory=memory)
    return report


def _hf_version() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


class _Run:
    """One system's measuring functions over a loaded model."""

    def __init__(self, ttft, decode_step, close):
        self.ttft, self.decode_step, self.close = ttft, decode_step, close


def _llmc_system(report: dict, checkpoint: Path, target: str, dtype: str, device: str, settings: BenchSettings,
                 bar, tmp: str) -> _Run:
    vocab = report["config"]["vocab_size"]
    max_len = report["config"]["max_position_embeddings"]
    longest = min(max(settings.lengths) + 1, max_len)
    need = max(longest, settings.decode_context + settings.new_tokens)
    bar.set_postfix_str("llmc compile")
    t = time.perf_counter()
    bundle = llmc_compile(checkpoint, target, Path(tmp) / "bundle.llmc", dtype=dtype, max_seq_len=need)
    report["compile_s"] = time.perf_counter() - t
    # Room for the longest prompt alone, or for the largest decode batch at its context (never both at once).
    decode_tokens = settings.decode_context + settings.new_tokens
    kv_tokens = max(_round_up(longest), max(settings.batches) * _round_up(decode_tokens)) + 16
    t = time.perf_counter()
    engine = load(bundle, device=device if device != "cpu" else "cpu", kv_cache_tokens=kv_tokens)
    engine.generate([torch.randint(0, vocab, (min(settings.lengths[0], need - 1),)).tolist()], max_new_tokens=1)
    probe.synchronize(device)
    report["cold_start_s"] = time.perf_counter() - t
    report["cold_start_note"] = "in-process: bundle load, KV allocation and warm-up to the first token"
    bar.update()
    s = settings
    return _Run(lambda n: _llmc_ttft(engine, n, vocab, s.warmup, s.repeat),
                lambda b: _llmc_decode_step(engine, b, s.decode_context, s.new_tokens, vocab, s.warmup, s.repeat),
                lambda: None)


def _hf_system(system: str, checkpoint: Path, dtype: torch.dtype, device: str, settings: BenchSettings,
               report: dict, bar) -> _Run:
    compiled = system == "torch.compile"
    model = _load_hf(checkpoint, dtype, device, compiled)
    vocab, s = report["config"]["vocab_size"], settings
    first_calls = report.setdefault("first_call_s", {})

    def ttft(length: int) -> float:
        # The cache the decode runs use: a prompt as long as their context reuses their compiled prefill.
        cache_len = length + s.new_tokens if compiled else None
        if compiled:  # the compile of this shape is the warm-up; its time is worth reporting on its own
            first_calls[f"prefill {length}"] = _hf_generate(model, 1, length, 1, vocab, cache_len)[0]
        return probe.median_of(lambda: _hf_generate(model, 1, length, 1, vocab, cache_len)[0],
                               0 if compiled else s.warmup, s.repeat)

    def decode_step(batch: int) -> float:
        cache_len = s.decode_context + s.new_tokens if compiled else None

        def once():
            times = _hf_generate(model, batch, s.decode_context, s.new_tokens, vocab, cache_len)
            return (times[-1] - times[0]) / (len(times) - 1)

        if compiled:
            first_calls[f"decode batch {batch}"] = once() * (s.new_tokens - 1)
        return probe.median_of(once, 0 if compiled else s.warmup, s.repeat)

    def close():
        nonlocal model
        del model
        if compiled:
            torch._dynamo.reset()

    return _Run(ttft, decode_step, close)
