"""`llmc bench --quick` on the embedded model: every field of the report, llmc and its peers measured (HF eager,
torch.compile, onnxruntime; llama.cpp only runs a GGUF file: tests/compiler/test_bench_systems.py), the floors and
ratios, the files written, and the command line's one-line refusals. Checks what was measured, never how fast."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llmc.bench.report import PEERS, unpublishable, write_results
from llmc.bench.run import run_bench
from llmc.cli import main as cli_main

MEASURED = ("llmc", "eager", "torch.compile", "onnxruntime")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_bench("llmc-tiny", quick=True, workdir=tmp_path_factory.mktemp("work"), progress=False, threads=1,
                     dtype="float32")  # float32: onnxruntime's CPU provider runs nothing else


def _measured(entry: dict) -> bool:
    return ("skipped" not in entry and entry["min_s"] <= entry["seconds"] <= entry["max_s"]
            and 0 < entry["fraction_of_floor"] < math.inf)


@pytest.mark.slow  # the quick sweep compiles llmc twice (graph and ONNX) and inductor once: about a minute
def test_report_names_what_was_measured_and_how(report):
    assert report["model"] == "llmc-tiny" and report["target"] == "cpu" and report["quick"] is True
    assert report["device"] and report["device_slug"] and report["threads"] == 1
    assert report["compile_s"] > 0 and report["cold_start_s"] > 0 and report["onnx_compile_s"] > 0
    assert report["compile_memory"]["peak_bytes"] > 0 and report["load_at_start"] >= 0
    assert report["probes"]["copy_bytes_per_s"] > 0 and report["probes"]["matmul_flops_per_s"] > 0
    assert set(report["first_call_s"]) == {"prefill 64", "decode batch 1"}
    assert set(report["not_run"]) == {"llama.cpp"} and "GGUF" in report["not_run"]["llama.cpp"]
    assert "quick mode" in unpublishable(report)


@pytest.mark.slow
def test_every_system_measured_against_the_floor_and_the_best_peer(report):
    assert [r["length"] for r in report["prefill"]] == [64]
    assert [r["batch"] for r in report["decode"]] == [1]
    for row in report["prefill"] + report["decode"]:
        assert row["floor_s"] > 0 and row["llama.cpp"] == {"skipped": "not run"}
        for system in MEASURED:
            assert _measured(row[system]), (system, row[system])
        best = min(MEASURED[1:], key=lambda s: row[s]["seconds"])
        assert row["best_peer"] == best
        assert row["llmc"]["vs_best_peer"] == pytest.approx(row[best]["seconds"] / row["llmc"]["seconds"])
        assert row["llmc_speedup_vs_eager"] == pytest.approx(row["eager"]["seconds"] / row["llmc"]["seconds"])
        assert row["llmc_speedup_vs_llama.cpp"] is None
    decode = report["decode"][0]
    for system in MEASURED:
        assert decode[system]["tokens_per_s"] == pytest.approx(1 / decode[system]["seconds"])
        assert report["memory"][system]["peak_bytes"] > 0


def test_lengths_beyond_the_model_are_capped_and_skipped():
    # Only the skip decisions: every point past the embedded model's 512 tokens is skipped, never run.
    from llmc.bench.run import BenchSettings, _Points
    from llmc.models.loader import read_config
    from llmc.models.registry import EMBEDDED_DIR

    cfg = read_config(EMBEDDED_DIR)
    points = _Points(cfg.max_position_embeddings, BenchSettings(), cfg)
    assert points.prefill_skip("eager", 1024, 4, "cpu").startswith("skipped: beyond the model's maximum of 512")
    assert points.prefill_skip("eager", 511, 4, "cpu") is None
    points.record("eager", 128, 100.0)  # pretend 128 tokens took 100 s: 511 must be judged over budget
    assert "budget" in points.prefill_skip("eager", 511, 4, "cpu")


@pytest.mark.slow
def test_results_written(report, tmp_path):
    written = write_results(report, tmp_path / report["device_slug"])
    assert {"llmc-tiny.json", "llmc-tiny.md"} <= {p.name for p in written}
    assert json.loads((tmp_path / report["device_slug"] / "llmc-tiny.json").read_text()) == report
    table = (tmp_path / report["device_slug"] / "llmc-tiny.md").read_text()
    assert table.startswith("NOT FOR PUBLISHING: quick mode")
    assert "time to first token | 1 | prompt 64" in table and "decode | 1 | context 64" in table
    assert " | ".join(["llmc", "HF eager", "torch.compile", "onnxruntime", "llama.cpp"]) in table


def test_cli_bench_help():
    out = subprocess.run([sys.executable, "-m", "llmc.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--quick", "--lengths", "--threads", "--repeat", "--peers", "--force"):
        assert option in out.stdout


def test_cli_refuses_a_busy_machine_and_a_bad_peer_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr("os.getloadavg", lambda: (0.9, 0.9, 0.9))
    assert cli_main(["bench", "llmc-tiny"]) == 1
    err = capsys.readouterr().err
    assert err == ("llmc: error: 1-minute load is 0.90: wait for a quiet machine (< 0.5) or pass --force (the results "
                   "are then marked not for publishing)\n")
    assert cli_main(["bench", "llmc-tiny", "--peers", "vllm"]) == 1
    assert capsys.readouterr().err == f"llmc: error: unknown peer 'vllm'; choose from {', '.join(PEERS)}\n"

