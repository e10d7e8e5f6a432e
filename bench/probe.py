"""Measurement helpers for `llmc bench`: timing loops, peak memory, device probes and the floors.

Only the runtime's needs (torch, the standard library): an inference host can measure a bundle without the
compiler. The floors are the time no implementation can beat on the measured device:

- prefill: FLOPs of the prompt / measured matmul rate. FLOPs count every matmul weight once per prompt token,
  the LM head once per sequence (only the last position's logits are needed), and causal attention
  (QK^T and PV over the lower triangle: 2 * S^2 * head_dim FLOP per head and layer).
- decode: bytes one step must read (every matmul weight once, plus each sequence's cached keys and values)
  / measured copy bandwidth. The embedding table is not counted: a step reads one row of it per token.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from llmc.common.errors import LlmcError
from llmc.models import ModelConfig

T = TypeVar("T")

# A 1-minute load average at or above this means other work shares the cores: what is measured then says more about
# that work than about the systems, so such a run is refused (or, forced, marked not for publishing).
BUSY_LOAD = 0.5


class BusyMachineError(LlmcError, ValueError):
    """A measurement was started on a busy machine."""


def script_parser(doc: str, repeat: int = 5) -> argparse.ArgumentParser:
    """A bench script's parser (described by its docstring's first paragraph) with the options every script takes:
    --threads (pinned, equal for every system), --repeat, --force (measure on a busy machine, not for
    publishing), --out (default bench/results/<device>)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=repeat)
    p.add_argument("--force", action="store_true", help="measure even on a busy machine (not for publishing)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<device>)")
    return p


def quiet_or_exit(force: bool = False) -> float:
    """check_quiet for a script: a busy machine ends it with the one-line reason."""
    try:
        return check_quiet(force)
    except BusyMachineError as e:
        raise SystemExit(str(e)) from None


def check_quiet(force: bool = False) -> float:
    """The 1-minute load average at the start of a measurement. At or above BUSY_LOAD it raises BusyMachineError
    (one line), unless `force`: the caller then records the load and does not publish what it measures."""
    load = os.getloadavg()[0]
    if load >= BUSY_LOAD and not force:
        raise BusyMachineError(f"1-minute load is {load:.2f}: wait for a quiet machine (< {BUSY_LOAD}) or pass --force "
                               "(the results are then marked not for publishing)")
    return load


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 1,
              repeat: int = 3) -> dict:
    """Median wall time of fn() over `repeat` runs after `warmup` untimed ones (seconds)."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def median_of(measure: Callable[[], float], warmup: int = 1, repeat: int = 3) -> float:
    """Median of what measure() returns (a time it took itself) over `repeat` calls after `warmup` ones."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    for _ in range(warmup):
        measure()
    return statistics.median(measure() for _ in range(repeat))


def alternate(measures: dict[str, Callable[[T], float]], make_input: Callable[[], T], warmup: int = 1,
              repeat: int = 5) -> dict[str, list[float]]:
    """What each measure returns (a time it took itself), the systems alternated: each round draws one input and
    runs every measure on it once, so all systems see the same inputs and the same drift of the machine. Each round
    starts one system further on, so no system always runs first (after the input was drawn) or always right after
    the same other one. The first `warmup` rounds are not recorded."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    names = list(measures)
    samples = {name: [] for name in names}
    for r in range(warmup + repeat):
        x = make_input()
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            seconds = measures[name](x)
            if r >= warmup:
                samples[name].append(seconds)
    return samples


def spread(samples: list[float]) -> dict:
    """The median (`seconds`) and the min-max range of a measurement's samples, and the samples themselves."""
    return {"seconds": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": list(samples)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_high_water() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM); False where the kernel does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_high_water() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) << 10


class PeakMemory:
    """Peak memory over a `with` block: torch.cuda's allocator peak on a GPU, the resident set's peak on CPU.

    On CPU, tracemalloc does not see torch's allocations and ru_maxrss cannot be reset, so the kernel's own
    high-water mark (VmHWM, reset through /proc/self/clear_refs on Linux >= 4.0) gives the exact peak. Where
    that reset is refused, a thread samples /proc/self/statm every `interval_s` instead, and a spike shorter
    than that (or one while the sampler is not scheduled) can be missed. The high-water mark is per process:
    do not nest two. `peak_bytes` is the absolute figure, `delta_bytes` the peak over what the process held
    when the block began.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.delta_bytes = 0
        self.method = "cuda_max_memory_allocated" if self.device.type == "cuda" else "sampled_rss"
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        if _reset_rss_high_water():
            self.method = "rss_high_water"
        self._start = self.peak_bytes = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            if self.method == "rss_high_water":
                self.peak_bytes = max(self.peak_bytes, _rss_high_water())
        self.delta_bytes = max(0, self.peak_bytes - self._start)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "delta_bytes": self.delta_bytes, "method": self.method}


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Bytes per second of a device-to-same-device copy, counting both the read and the write."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, warmup=2, repeat=repeat)["min_s"]
    return 2 * n * 4 / t


def matmul_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                repeat: int = 5) -> float:
    """FLOP per second of an n x n x n matmul in `dtype` (the best of `repeat` runs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_call(lambda: a @ b, device, warmup=2, repeat=repeat)["min_s"]
    return 2 * n ** 3 / t


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the q, k, v, o projections and the gated MLP of all layers."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * h * cfg.intermediate_size)


def matmul_params(cfg: ModelConfig) -> int:
    return layer_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def prefill_flops(cfg: ModelConfig, batch: int, prompt_len: int) -> float:
    tokens = batch * prompt_len
    linear = 2 * layer_matmul_params(cfg) * tokens + 2 * cfg.vocab_size * cfg.hidden_size * batch
    attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * prompt_len ** 2 * batch
    return float(linear + attention)


def decode_step_bytes(cfg: ModelConfig, batch: int, context_len: int, dtype_bytes: int) -> float:
    """Bytes one decode step over `batch` sequences of `context_len` cached tokens must read."""
    return float(matmul_params(cfg) * dtype_bytes + batch * context_len * kv_bytes_per_token(cfg, dtype_bytes))


def prefill_floor_s(cfg: ModelConfig, batch: int, prompt_len: int, flops_per_s: float) -> float:
    return prefill_flops(cfg, batch, prompt_len) / flops_per_s


def decode_floor_s(cfg: ModelConfig, batch: int, context_len: int, dtype_bytes: int, bytes_per_s: float) -> float:
    """Seconds per decode step (one new token for each of the batch's sequences)."""
    return decode_step_bytes(cfg, batch, context_len, dtype_bytes) / bytes_per_s


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's model name with the number of cores this process may use."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:  # not Linux: the platform's processor string is the best we have
        import platform

        model = platform.processor() or model
    return f"{model} ({len(os.sched_getaffinity(0))} cores)"


def device_slug(name: str) -> str:
    """A directory name for a device: 'AMD EPYC (2 cores)' -> 'amd-epyc-2-cores'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
