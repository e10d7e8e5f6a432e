"""The floors against DESIGN.md's Qwen3-8B / H100 figures, and the probes on this host."""
from __future__ import annotations

import time

import pytest
import torch

from llmc.bench.probe import (BusyMachineError, PeakMemory, alternate, check_quiet, copy_bandwidth,
                              decode_floor_s, decode_step_bytes, device_slug, matmul_rate, median_of, prefill_floor_s,
                              prefill_flops, spread, time_call)
from llmc.models.registry import get_config

H100_BYTES_PER_S = 3.35e12  # HBM3 bandwidth the design's floor uses
H100_BF16_FLOPS = 989e12  # dense bf16 peak


def qwen3_8b():
    return get_config("qwen3-8b")


def test_decode_floor_is_the_design_figure():
    assert decode_floor_s(qwen3_8b(), 1, 0, 2, H100_BYTES_PER_S) * 1e3 == pytest.approx(4.52, abs=0.005)


def test_prefill_flops_and_floor_are_the_design_figures():
    shapes = qwen3_8b()
    assert prefill_flops(shapes, 1, 16384) == pytest.approx(3.07e14, rel=2e-3)
    assert prefill_floor_s(shapes, 1, 16384, H100_BF16_FLOPS) * 1e3 == pytest.approx(310, rel=0.01)


def test_decode_bytes_grow_by_each_sequence_kv():
    shapes = qwen3_8b()
    per_token = 2 * 36 * 8 * 128 * 2  # k and v, layers, kv heads, head_dim, bf16
    extra = decode_step_bytes(shapes, 8, 1000, 2) - decode_step_bytes(shapes, 1, 1000, 2)
    assert extra == 7 * 1000 * per_token


def test_prefill_flops_scale_with_batch():
    shapes = qwen3_8b()
    assert prefill_flops(shapes, 3, 100) == 3 * prefill_flops(shapes, 1, 100)


def test_timing_helpers_take_the_median():
    values = iter([9.0, 3.0, 1.0, 2.0])  # the first is the warm-up
    assert median_of(lambda: next(values), warmup=1, repeat=3) == 2.0
    calls = []
    result = time_call(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5 and len(result["samples_s"]) == 3 and result["median_s"] >= result["min_s"] > 0


def test_alternate_gives_every_system_each_rounds_input_and_rotates_the_order():
    calls = []
    inputs = iter(range(100, 200))

    def system(name, seconds):
        return lambda x: calls.append((name, x)) or seconds[x - 100]

    samples = alternate({"a": system("a", [9, 1, 2, 3]), "b": system("b", [8, 4, 5, 6]),
                         "c": system("c", [7, 7, 8, 9])}, lambda: next(inputs), warmup=1, repeat=3)
    assert samples == {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9]}  # round 0 (the warm-up) dropped
    rounds = [calls[i:i + 3] for i in range(0, 12, 3)]
    assert [[name for name, _ in r] for r in rounds] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert all(len({x for _, x in r}) == 1 for r in rounds)  # one input per round, the same for every system
    with pytest.raises(ValueError):
        alternate({"a": lambda x: 1.0}, lambda: None, repeat=0)


def test_spread_is_the_median_and_range():
    assert spread([3.0, 1.0, 2.0, 10.0, 4.0]) == {"seconds": 3.0, "min_s": 1.0, "max_s": 10.0,
                                                  "samples_s": [3.0, 1.0, 2.0, 10.0, 4.0]}


def test_a_busy_machine_is_refused_unless_forced(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (0.62, 0.3, 0.1))
    with pytest.raises(BusyMachineError, match="1-minute load is 0.62: wait for a quiet machine"):
        check_quiet()
    assert check_quiet(force=True) == 0.62
    monkeypatch.setattr("os.getloadavg", lambda: (0.49, 3.0, 3.0))
    assert check_quiet() == 0.49


def test_peak_memory_sees_a_torch_allocation_freed_inside_the_block():
    with PeakMemory("cpu", interval_s=0.001) as peak:
        big = torch.randn(64 << 20)  # 64 Mi fresh random floats: 256 MiB
        big.add_(torch.randn(1))
        del big
    # Exact from the kernel's high-water mark, whether or not the sampler thread ever ran meanwhile.
    assert peak.to_dict()["method"] == "rss_high_water"
    assert peak.delta_bytes > 200 << 20


def test_peak_memory_falls_back_to_sampling_where_the_mark_cannot_be_reset(monkeypatch):
    import llmc.bench.probe as bench

    monkeypatch.setattr(bench, "_reset_rss_high_water", lambda: False)
    with PeakMemory("cpu", interval_s=0.001) as peak:
        big = torch.randn(64 << 20)
        deadline = time.monotonic() + 30  # hold it until the sampler has seen it (it may be scheduled late)
        while peak.peak_bytes - peak._start < 200 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        del big
    assert peak.to_dict()["method"] == "sampled_rss"
    assert peak.delta_bytes > 200 << 20


def test_probes_return_plausible_rates():
    assert 1e8 < copy_bandwidth("cpu", nbytes=16 << 20, repeat=2) < 1e13
    assert 1e8 < matmul_rate("cpu", torch.float32, n=256, repeat=2) < 1e14


def test_device_slug():
    assert device_slug("AMD EPYC 7B13 (2 cores)") == "amd-epyc-7b13-2-cores"
