"""The comparisons and the publishing rule of `llmc bench` reports, on recorded numbers (nothing is timed here):
ratios to the best peer, fractions of the floor, min-max ranges, the table and summary, and which reports the
README may show."""
from __future__ import annotations

import copy

import pytest

from llmc.bench.report import END, START, best_peer, compare, markdown, unpublishable, write_results
from llmc.bench.report import main as report_main
from llmc.bench.run import _entry

DECODE_FLOOR = 0.002  # seconds per step at batch 1
LLAMA_FLOOR = 0.0005  # its stored Q4_1 bytes: a quarter of the float32 floor's


def recorded() -> dict:
    """A report as run_bench writes it, with figures recorded on a 2-core machine."""
    prefill = {"batch": 1, "length": 64, "flops": 1e9, "floor_s": 0.001,
               "llmc": _entry([0.010, 0.012, 0.011, 0.013, 0.010], 0.001),
               "eager": _entry([0.008, 0.009, 0.008, 0.010, 0.008], 0.001),
               "torch.compile": _entry([0.006, 0.007, 0.006, 0.006, 0.009], 0.001),
               "onnxruntime": {"skipped": "not run"},
               "llama.cpp": _entry([0.004, 0.004, 0.005, 0.004, 0.006], 0.001)}
    decode = {"batch": 1, "context": 64, "new_tokens": 32, "bytes_per_step": 5e7, "floor_s": DECODE_FLOOR,
              "llmc": _entry([0.020, 0.025, 0.021, 0.022, 0.020], DECODE_FLOOR, batch=1),
              "eager": _entry([0.030, 0.031, 0.030, 0.032, 0.030], DECODE_FLOOR, batch=1),
              "torch.compile": _entry([0.025, 0.025, 0.026, 0.027, 0.025], DECODE_FLOOR, batch=1),
              "onnxruntime": {"skipped": "not run"},
              "llama.cpp": {**_entry([0.010, 0.011, 0.010, 0.012, 0.010], LLAMA_FLOOR, batch=1),
                            "floor_s": LLAMA_FLOOR}}
    decode8 = {"batch": 8, "context": 64, "new_tokens": 32, "bytes_per_step": 6e7, "floor_s": 0.003,
               "llmc": _entry([0.05] * 5, 0.003, batch=8), "eager": _entry([0.04] * 5, 0.003, batch=8),
               "torch.compile": _entry([0.045] * 5, 0.003, batch=8), "onnxruntime": {"skipped": "not run"},
               "llama.cpp": {"skipped": "skipped: llama-cpp-python's Llama decodes one sequence"}}
    for row in (prefill, decode, decode8):
        compare(row)
    mem = {"peak_bytes": 600 << 20, "delta_bytes": 40 << 20, "method": "rss_high_water"}
    return {
        "model": "smollm2-135m-instruct", "device": "Intel Xeon (2 cores)", "device_slug": "intel-xeon-2-cores",
        "target": "cpu", "dtype": "float32", "weights": "gguf", "gguf_types": {"Q4_1": 210, "F32": 61},
        "quick": False, "date": "2026-12-04",
        "settings": {"lengths": [64], "batches": [1, 8], "decode_context": 64, "new_tokens": 32, "warmup": 1,
                     "repeat": 5, "point_budget_s": 120.0},
        "threads": 2, "load_at_start": 0.12,
        "openmp": {"OMP_WAIT_POLICY": "unset", "GOMP_SPINCOUNT": "10000"},
        "versions": {"llmc": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.25.0"},
        "probes": {"copy_bytes_per_s": 27e9, "matmul_flops_per_s": 4e11, "matmul_dtype": "float32"},
        "compile_s": 20.0, "compile_memory": mem, "cold_start_s": 0.2, "first_call_s": {"prefill 64": 3.0},
        "memory": {"llmc": mem, "eager": mem, "torch.compile": mem, "llama.cpp": mem},
        "llama_cpp": {"version": "0.3.36", "weight_bytes": 80 << 20, "n_ctx": 256, "n_batch": 256, "n_threads": 2,
                      "n_threads_batch": 2},
        "not_run": {"onnxruntime": "onnxruntime's CPU provider has no bfloat16 kernels"},
        "prefill": [prefill], "decode": [decode, decode8],
    }


def test_entry_is_the_median_with_its_range_and_fraction_of_floor():
    e = _entry([0.02, 0.01, 0.04], 0.005, batch=2)
    assert (e["seconds"], e["min_s"], e["max_s"]) == (0.02, 0.01, 0.04)
    assert e["fraction_of_floor"] == pytest.approx(0.25)
    assert (e["tokens_per_s"], e["tokens_per_s_min"], e["tokens_per_s_max"]) == pytest.approx((100, 50, 200))


def test_each_figure_is_set_against_the_fastest_peer_that_ran():
    prefill, decode, decode8 = (r := recorded())["prefill"][0], *r["decode"]
    assert prefill["best_peer"] == "llama.cpp" and decode["best_peer"] == "llama.cpp"
    assert prefill["llmc"]["vs_best_peer"] == pytest.approx(0.004 / 0.011)
    assert decode["llmc"]["vs_best_peer"] == pytest.approx(0.010 / 0.021)
    assert decode["eager"]["vs_best_peer"] == pytest.approx(0.010 / 0.030)
    assert decode["llama.cpp"]["vs_best_peer"] == 1.0
    assert decode["llmc_speedup_vs_eager"] == pytest.approx(0.030 / 0.021)
    assert decode["llmc_speedup_vs_onnxruntime"] is None  # it did not run
    # Batch 8: llama.cpp skipped, so the best peer is the best of those that ran.
    assert decode8["best_peer"] == "eager" and decode8["llmc"]["vs_best_peer"] == pytest.approx(0.8)


def test_no_peer_no_ratio():
    row = {"llmc": _entry([0.01], 0.001), "eager": {"skipped": "not run"}}
    compare(row)
    assert best_peer(row) is None and row["llmc"]["vs_best_peer"] is None


def test_llama_cpp_is_held_to_the_floor_of_the_bytes_it_reads():
    decode = recorded()["decode"][0]
    assert decode["llama.cpp"]["fraction_of_floor"] == pytest.approx(LLAMA_FLOOR / 0.010)
    assert decode["llmc"]["fraction_of_floor"] == pytest.approx(DECODE_FLOOR / 0.021)


def test_what_may_be_published():
    report = recorded()
    assert unpublishable(report) is None
    assert "busy" in unpublishable({**report, "load_at_start": 0.5})
    assert "quick mode" in unpublishable({**report, "quick": True})
    few = copy.deepcopy(report)
    few["settings"]["repeat"] = 3
    assert "at least 5" in unpublishable(few)
    legacy = {k: v for k, v in report.items() if k != "load_at_start"}  # reports from before the load was recorded
    assert unpublishable(legacy) is None


def test_table_and_summary_say_the_method_ratios_ranges_and_floors():
    text = markdown(recorded())
    assert "NOT FOR PUBLISHING" not in text
    assert "2 threads each (OMP_WAIT_POLICY unset, GOMP_SPINCOUNT 10000); systems alternated" in text
    assert "median [min-max] of 5 rounds" in text
    assert "| 0.36x (llama.cpp) |" in text and "| 0.48x (llama.cpp) |" in text and "| 0.80x (HF eager) |" in text
    assert "47.6 tok/s [40.0-50.0], 9.5% of floor" in text  # llmc decode: median 21 ms, range 20-25 ms
    assert "100.0 tok/s [83.3-100.0], 5.0% of floor" in text  # llama.cpp against its own floor
    assert "11.00 ms [10.00-13.00], 9.1% of floor" in text
    assert "Not run: onnxruntime (onnxruntime's CPU provider has no bfloat16 kernels)." in text
    assert "decodes one sequence" in text and "80 MiB of matmul weights as stored in the GGUF" in text
    busy = markdown({**recorded(), "load_at_start": 1.7})
    assert busy.startswith("NOT FOR PUBLISHING: the machine was busy at the start (1-minute load 1.70")


def test_a_report_from_before_the_peers_still_renders():
    report = recorded()
    for row in report["prefill"] + report["decode"]:
        for system in ("onnxruntime", "llama.cpp", "best_peer"):
            row.pop(system)
        for system in ("llmc", "eager", "torch.compile"):
            for key in ("min_s", "max_s", "samples_s", "tokens_per_s_min", "tokens_per_s_max", "vs_best_peer"):
                row[system].pop(key, None)
    for key in ("load_at_start", "threads", "openmp", "not_run", "llama_cpp", "compile_memory"):
        report.pop(key)
    report["memory"].pop("llama.cpp")
    text = markdown(report)
    assert "Older method: systems run one after another" in text
    assert "| 47.6 tok/s, 9.5% of floor | 33.3 tok/s, 6.7% of floor | 40.0 tok/s, 8.0% of floor | - | - | " \
           "1.19x (torch.compile) |" in text


def test_readme_shows_only_publishable_reports(tmp_path, capsys):
    results = tmp_path / "results" / "intel-xeon-2-cores"
    write_results(recorded(), results)
    write_results({**recorded(), "model": "busy-run", "load_at_start": 0.93}, results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{START}\nSTALE-SECTION\n{END}\n\n## After\n")
    report_main(["--results", str(tmp_path / "results"), "--readme", str(readme)])
    text = readme.read_text()
    assert "STALE-SECTION" not in text and "## After" in text
    assert "**smollm2-135m-instruct**" in text and "0.48x (llama.cpp)" in text and "busy-run" not in text
    assert "left out of the README: " in capsys.readouterr().out
