"""The `llmc bench` sweep: llmc beside its peers on one model, in one process. The peers (compiler/bench_systems.py):
Hugging Face eager and torch.compile always, onnxruntime (llmc's --backend onnx export) where it is installed and
runs the dtype, and llama.cpp (llama-cpp-python) where it is installed and the model is a GGUF file.

For a registry name the model gets random weights, written as a Hugging Face checkpoint to a temporary
directory, so that llmc compiles and transformers loads the very same tensors; a GGUF file (or a packaged GGUF
model) is read by every system from the file itself. Figures: time to first token over prompt lengths (batch 1)
and time per decode step over batch sizes; per system its peak memory over loading and a first short generate;
for llmc also the compile time and its peak memory, and the cold start (bundle load to first token).

Method: one thread count pinned for every system (torch, onnxruntime's intra-op pool, llama.cpp's n_threads and
n_threads_batch); all systems loaded together and alternated at each point, each round drawing fresh prompt
token ids shared by all systems (runtime/bench.py: alternate); warm-up rounds, then the median and min-max of
`repeat` rounds. A run started on a busy machine (1-minute load >= 0.5) is refused, or with `force` recorded as
not for publishing (compiler/bench_report.py: unpublishable), as is a quick one.

Each figure is set against its floor on the measured device (runtime/bench.py) and against the best peer
(compiler/bench_report.py: compare). A point that cannot run here is recorded as {"skipped": reason}, never
estimated: lengths beyond the model's maximum, runs whose time, extrapolated from a shorter measured length by
FLOPs, exceeds the per-point budget, and llmc prompts whose attention scores would not fit in memory.
"""
from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import llmc
from llmc.bench import probe
from llmc.bench import systems as systems_
from llmc.bench.report import PEERS, compare
from llmc.common.errors import UsageError
from llmc.common.targets import get_target, resolve_dtype, targets_with_capability
from llmc.compiler.api import compile as llmc_compile
from llmc.models import ModelConfig
from llmc.models.gguf import GGUFFile, is_gguf
from llmc.models.loader import read_config, save_checkpoint
from llmc.models.registry import EMBEDDED_DIR, EMBEDDED_NAME, PACKAGED, get_config, packaged_file
from llmc.models.transformer import Transformer


@dataclass
class BenchSettings:
    lengths: list[int] = field(default_factory=lambda: [128, 1024, 4096, 16384, 32768])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    decode_context: int = 128  # prompt length of the decode runs
    new_tokens: int = 32  # per decode run; the first comes from the prefill and is not counted
    warmup: int = 1  # rounds at each point before the recorded ones
    repeat: int = 5  # recorded rounds at each point
    point_budget_s: float = 120.0  # skip a point whose extrapolated time exceeds this

    @classmethod
    def quick(cls) -> BenchSettings:
        """One length, one batch, a few tokens: every system and field exercised, in CI time."""
        return cls(lengths=[64], batches=[1], decode_context=64, new_tokens=4, warmup=1, repeat=1,
                   point_budget_s=30.0)


@dataclass
class BenchModel:
    name: str
    config: ModelConfig
    source: Path  # what llmc compiles: a checkpoint directory or a GGUF file
    hf_args: dict  # transformers' from_pretrained arguments for the same weights
    weights: str  # "random", "checkpoint" or "gguf"
    gguf: GGUFFile | None = None


def host_target(device: str) -> str:
    if device == "cpu":
        return "cpu"
    known = targets_with_capability(torch.cuda.get_device_capability())
    if not known:
        raise UsageError(f"no llmc target for {torch.cuda.get_device_name()}; pass --target")
    return known[0].name


def prepare_model(model: str, directory: Path, device: str) -> BenchModel:
    """The embedded model, a checkpoint directory or a GGUF file as is; a registry name with random weights
    (stored in bfloat16, each system casts to the bench dtype)."""
    if model.lower() == EMBEDDED_NAME:
        return BenchModel(EMBEDDED_NAME, read_config(EMBEDDED_DIR), EMBEDDED_DIR,
                          {"pretrained_model_name_or_path": str(EMBEDDED_DIR)}, "checkpoint")
    path = packaged_file(model) if model.lower() in PACKAGED else Path(model)
    if is_gguf(path):
        gguf = GGUFFile(path)
        name = model.lower() if model.lower() in PACKAGED else path.stem
        return BenchModel(name, gguf.config(), path, {"pretrained_model_name_or_path": str(path.parent),
                                                      "gguf_file": path.name}, "gguf", gguf)
    if (path / "manifest.json").is_file():
        raise UsageError(f"{model} is a bundle; bench needs the model it came from to build the peers: give its "
                         "checkpoint directory, GGUF file or registry name")
    if path.is_dir():
        return BenchModel(path.resolve().name, read_config(path), path,
                          {"pretrained_model_name_or_path": str(path)}, "checkpoint")
    cfg = get_config(model)
    torch.manual_seed(0)
    with torch.device(device):
        net = Transformer(cfg)
    save_checkpoint(net, directory, torch.bfloat16)
    del net
    return BenchModel(model.lower(), cfg, directory, {"pretrained_model_name_or_path": str(directory)}, "random")


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

    def __init__(self, max_len: int, settings: BenchSettings, cfg: ModelConfig):
        self.max_len, self.settings, self.cfg = max_len, settings, cfg
        self.last: dict[str, tuple[float, float]] = {}  # system -> (flops, seconds) of its last prefill

    def prefill_skip(self, system: str, length: int, dtype_bytes: int, device: str) -> str | None:
        if length + 1 > self.max_len:
            return f"skipped: beyond the model's maximum of {self.max_len} tokens"
        flops = probe.prefill_flops(self.cfg, 1, length)
        if system in self.last:
            done_flops, done_s = self.last[system]
            estimate = done_s * flops / done_flops
            if estimate > self.settings.point_budget_s:
                return (f"skipped: about {estimate:.0f} s (scaled by FLOPs from a measured shorter prompt) exceeds "
                        f"the {self.settings.point_budget_s:.0f} s budget per point")
        if system in ("llmc", "onnxruntime"):
            scores = self.cfg.num_heads * length * length * max(dtype_bytes, 4) * 2
            if scores > _free_memory_bytes(device):
                return f"skipped: {system}'s attention would need {scores / 1e9:.0f} GB for its scores"
        return None

    def record(self, system: str, length: int, seconds: float) -> None:
        self.last[system] = (probe.prefill_flops(self.cfg, 1, length), seconds)


def _entry(samples: list[float], floor_s: float, batch: int | None = None) -> dict:
    entry = probe.spread(samples)
    entry["fraction_of_floor"] = floor_s / entry["seconds"]
    if batch is not None:
        entry.update(tokens_per_s=batch / entry["seconds"], tokens_per_s_min=batch / entry["max_s"],
                     tokens_per_s_max=batch / entry["min_s"])
    return entry


def run_bench(model: str, quick: bool = False, device: str = "cpu", lengths: list[int] | None = None,
              batches: list[int] | None = None, target: str | None = None, dtype: str | None = None,
              workdir: str | Path | None = None, progress: bool = True, threads: int | None = None,
              repeat: int | None = None, peers: list[str] | None = None, force: bool = False) -> dict:
    """Measures llmc and its peers on MODEL; returns the report (see compiler/bench_report.py). peers: the peers to
    run (default all: eager, torch.compile, onnxruntime, llama.cpp); force: measure on a busy machine."""
    settings = BenchSettings.quick() if quick else BenchSettings()
    settings.lengths = sorted(set(lengths or settings.lengths))
    settings.batches = sorted(set(batches or settings.batches))
    settings.repeat = settings.repeat if repeat is None else repeat
    if min(settings.lengths) < 1 or min(settings.batches) < 1 or settings.repeat < 1:
        raise UsageError("--lengths, --batches and --repeat must be positive")
    unknown = sorted(set(peers or ()) - set(PEERS))
    if unknown:
        raise UsageError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    if device != "cpu" and not torch.cuda.is_available():
        raise UsageError(f"device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    threads = len(os.sched_getaffinity(0)) if threads is None else threads
    if threads < 1:
        raise UsageError("--threads must be positive")
    load_at_start = probe.check_quiet(force or quick)  # a quick run is never published
    tgt = get_target(target or host_target(device))
    dtype_name = resolve_dtype(tgt, dtype)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # before any system loads: onnxruntime takes its pool size from it
    torch.manual_seed(0)  # the prompts
    wanted = ["llmc", *(p for p in PEERS if peers is None or p in peers)]
    try:
        with tempfile.TemporaryDirectory(dir=workdir, prefix="llmc-bench-") as tmp:
            bench_model = prepare_model(model, Path(tmp) / "checkpoint", device)
            report = _new_report(bench_model, device, tgt.name, dtype_name, settings, quick, threads, load_at_start)
            _measure(report, bench_model, settings, device, wanted, Path(tmp), progress)
    finally:
        torch.set_num_threads(threads_before)
    return report


def _new_report(m: BenchModel, device: str, target: str, dtype: str, settings: BenchSettings, quick: bool,
                threads: int, load: float) -> dict:
    cfg = m.config
    settings.decode_context = min(settings.decode_context, cfg.max_position_embeddings - settings.new_tokens)
    longest = cfg.max_position_embeddings - 1  # one new token must fit
    capped = max(settings.lengths) > longest
    if capped:  # measure at the model's limit rather than stop short of it
        settings.lengths = sorted({*settings.lengths, longest})
    torch_dtype = getattr(torch, dtype)
    report = {
        "model": m.name, "device": probe.device_name(device), "target": target, "dtype": dtype,
        "weights": m.weights, "quick": quick, "date": time.strftime("%Y-%m-%d"), "settings": asdict(settings),
        "threads": threads, "load_at_start": load,
        # How idle OpenMP threads wait, read by each OpenMP runtime as it loads (torch's and llama.cpp's alike, so the
        # same for every system): recorded, since on a shared machine it moves every figure.
        "openmp": {k: os.environ.get(k, "unset") for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "versions": {"llmc": llmc.__version__, "torch": torch.__version__, **_hf_version()},
        "config": cfg.to_dict(),
        "probes": {"copy_bytes_per_s": probe.copy_bandwidth(device),
                   "matmul_flops_per_s": probe.matmul_rate(device, torch_dtype), "matmul_dtype": dtype},
    }
    report["device_slug"] = probe.device_slug(report["device"])
    if m.gguf is not None:
        report["gguf_types"] = dict(m.gguf.quant_types())
    if capped:
        report["capped"] = (f"prompts longer than {longest} tokens skipped (the model's maximum is "
                            f"{cfg.max_position_embeddings}); measured at {longest} instead")
    return report


def _hf_version() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


def _measure(report: dict, m: BenchModel, settings: BenchSettings, device: str, wanted: list[str], tmp: Path,
             progress: bool) -> None:
    """Loads every wanted system, measures them alternated at each point, and fills report's rows."""
    cfg, s = m.config, settings
    dtype_bytes = torch.empty(0, dtype=getattr(torch, report["dtype"])).element_size()
    bandwidth, rate = report["probes"]["copy_bytes_per_s"], report["probes"]["matmul_flops_per_s"]
    prefill = [{"batch": 1, "length": n, "flops": probe.prefill_flops(cfg, 1, n),
                "floor_s": probe.prefill_floor_s(cfg, 1, n, rate)} for n in s.lengths]
    decode = [{"batch": b, "context": s.decode_context, "new_tokens": s.new_tokens,
               "bytes_per_step": probe.decode_step_bytes(cfg, b, s.decode_context, dtype_bytes),
               "floor_s": probe.decode_floor_s(cfg, b, s.decode_context, dtype_bytes, bandwidth)}
              for b in s.batches]
    floors = {}  # system -> its own decode floor by batch, where it reads other bytes than the bench dtype's
    bar = tqdm(total=len(wanted) * (1 + len(prefill) + len(decode)), desc=f"bench {m.name}", unit="point",
               disable=not progress)
    loaded, memory = {}, {}
    not_run = {p: "left out by --peers" for p in PEERS if p not in wanted}
    for name in wanted:
        bar.set_postfix_str(f"{name} load")
        found = _load_system(name, report, m, settings, device, tmp, not_run)
        if found is not None:
            loaded[name], memory[name] = found
            if name == "llama.cpp":
                stored = report["llama_cpp"]["weight_bytes"]
                kv = probe.kv_bytes_per_token(cfg, 2)  # its KV cache is f16
                floors[name] = {b: (stored + b * s.decode_context * kv) / bandwidth for b in s.batches}
        bar.update(1 + (0 if found else len(prefill) + len(decode)))  # its points will not run
    vocab = cfg.vocab_size
    points = _Points(cfg.max_position_embeddings, settings, cfg)
    for row in prefill:
        bar.set_postfix_str(f"prefill {row['length']}")
        active = {}
        for name, system in loaded.items():
            skip = points.prefill_skip(name, row["length"], dtype_bytes, device)
            if skip:
                row[name] = {"skipped": skip}
            else:
                active[name] = system.ttft
        samples = probe.alternate(active, lambda: torch.randint(0, vocab, (row["length"],)).tolist(), s.warmup,
                                  s.repeat)
        for name, times in samples.items():
            row[name] = _entry(times, row["floor_s"])
            points.record(name, row["length"], row[name]["seconds"])
        bar.update(len(loaded))
    for row in decode:
        bar.set_postfix_str(f"decode batch {row['batch']}")
        b, active = row["batch"], {}
        for name, system in loaded.items():
            if system.max_batch is not None and b > system.max_batch:
                row[name] = {"skipped": system.why_not_batch}
            else:
                active[name] = system.decode_step
        samples = probe.alternate(active, lambda: torch.randint(0, vocab, (b, s.decode_context)).tolist(),
                                  s.warmup, s.repeat)
        for name, times in samples.items():
            floor_s = floors.get(name, {}).get(b, row["floor_s"])
            row[name] = _entry(times, floor_s, batch=b)
            if name in floors:
                row[name]["floor_s"] = floor_s
        bar.update(len(loaded))
    bar.close()
    for system in loaded.values():
        system.close()
    gc.collect()
    for row in prefill + decode:
        for name in not_run:
            row[name] = {"skipped": "not run"}
        compare(row)
    report.update(prefill=prefill, decode=decode, memory=memory, not_run=not_run)


def _load_system(name: str, report: dict, m: BenchModel, settings: BenchSettings, device: str, tmp: Path,
                 not_run: dict) -> tuple[systems_.System, dict] | None:
    """(the system, its peak memory over loading and a first short generate), or None with not_run[name] set."""
    s, dtype = settings, report["dtype"]
    max_len = m.config.max_position_embeddings
    need = max(min(max(s.lengths) + 1, max_len), s.decode_context + s.new_tokens)
    # Room for the longest prompt alone, or for the largest decode batch at its context (never both at once).
    kv_tokens = max(_round_up(need), max(s.batches) * _round_up(s.decode_context + s.new_tokens)) + 16
    first_prompt = torch.randint(0, m.config.vocab_size, (min(s.lengths[0], need - 1),)).tolist()
    reason = _unavailable(name, m, device, dtype)
    if reason:
        not_run[name] = reason
        return None
    bundle = None
    if name in ("llmc", "onnxruntime"):
        bundle = _compile(name, report, m, device, need, tmp, not_run)
        if bundle is None:
            return None
    with probe.PeakMemory(device) as peak:
        t = time.perf_counter()
        if bundle is not None:
            system = systems_.llmc_system(bundle, device, kv_tokens, s.new_tokens)
        elif name == "llama.cpp":
            system, report["llama_cpp"] = systems_.llama_system(m.gguf, report["threads"], _round_up(need, 256),
                                                                s.new_tokens)
        else:
            system = systems_.hf_system(m.hf_args, getattr(torch, dtype), device, name == "torch.compile",
                                        s.new_tokens, report.setdefault("first_call_s", {}))
        system.ttft(first_prompt)
        probe.synchronize(device)
        if name == "llmc":
            report["cold_start_s"] = time.perf_counter() - t
            report["cold_start_note"] = "in-process: bundle load, KV allocation and warm-up to the first token"
    return system, peak.to_dict()


def _unavailable(name: str, m: BenchModel, device: str, dtype: str) -> str | None:
    if name == "onnxruntime":
        return systems_.onnx_unavailable(device, dtype)
    if name == "llama.cpp":
        return systems_.llama_unavailable(m.source if m.gguf else None, device)
    return None


def _compile(name: str, report: dict, m: BenchModel, device: str, need: int, tmp: Path, not_run: dict
             ) -> Path | None:
    """llmc's bundle (name "llmc") or its --backend onnx export (name "onnxruntime"), with the time and peak memory
    of the compile in the report; None (and why in not_run) where the onnx export fails on this model."""
    from llmc.codegen.onnx import OnnxExportError, OnnxValidationError

    backend = "onnx" if name == "onnxruntime" else "triton"
    t = time.perf_counter()
    try:
        with probe.PeakMemory(device) as peak:
            bundle = llmc_compile(m.source, report["target"], tmp / f"{backend}.llmc", dtype=report["dtype"],
                                  max_seq_len=need, backend=backend)
    except (OnnxExportError, OnnxValidationError) as e:
        not_run[name] = f"llmc's onnx export failed on this model: {e}"
        return None
    key = "compile" if name == "llmc" else "onnx_compile"
    report[f"{key}_s"] = time.perf_counter() - t
    report[f"{key}_memory"] = peak.to_dict()
    return bundle
