"""`llmc bench --quick` on the embedded model: every field of the report, all three systems measured, floors,
and the files (JSON, table, README section) written. Checks what was measured, never how fast."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.report import END, START, main as report_main
from llmc.compiler.bench import SYSTEMS, run_bench
from llmc.compiler.bench_report import write_results


pytestmark = pytest.mark.slow  # the quick sweep compiles with llmc and inductor: about a minute on 2 cores


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_bench("llmc-tiny", quick=True, workdir=tmp_path_factory.mktemp("work"), progress=False)


def _measured(entry: dict) -> bool:
    return "skipped" not in entry and entry["seconds"] > 0 and 0 < entry["fraction_of_floor"] < math.inf


def test_report_names_what_was_measured(report):
    assert report["model"] == "llmc-tiny" and report["dtype"] == "float32" and report["target"] == "cpu"
    assert report["device"] and report["device_slug"] and report["quick"] is True
    assert report["compile_s"] > 0 and report["cold_start_s"] > 0
    assert report["probes"]["copy_bytes_per_s"] > 0 and report["probes"]["matmul_flops_per_s"] > 0
    assert set(report["first_call_s"]) == {"prefill 64", "decode batch 1"}


def test_all_three_systems_measured_against_the_floor(report):
    assert [r["length"] for r in report["prefill"]] == [64]
    assert [r["batch"] for r in report["decode"]] == [1]
    for row in report["prefill"] + report["decode"]:
        assert row["floor_s"] > 0
        for system in SYSTEMS:
            assert _measured(row[system]), (system, row[system])
        assert row["llmc_speedup_vs_eager"] == pytest.approx(row["eager"]["seconds"] / row["llmc"]["seconds"])
        assert row["llmc_speedup_vs_torch.compile"] > 0
    decode = report["decode"][0]
    for system in SYSTEMS:
        assert decode[system]["tokens_per_s"] == pytest.approx(1 / decode[system]["seconds"])
        assert report["memory"][system]["peak_bytes"] > 0


def test_lengths_beyond_the_model_are_capped_and_skipped(tmp_path):
    # Only the skip decisions: every point past the embedded model's 512 tokens is skipped, never run.
    from llmc.compiler.bench import BenchSettings, _Points
    from llmc.models.loader import read_config
    from llmc.models.registry import EMBEDDED_DIR
    from llmc.runtime.bench import Shapes

    cfg = read_config(EMBEDDED_DIR)
    points = _Points(cfg.max_position_embeddings, BenchSettings(), Shapes.from_config(cfg.to_dict()))
    assert points.prefill_skip("eager", 1024, 4, "cpu").startswith("skipped: beyond the model's maximum of 512")
    assert points.prefill_skip("eager", 511, 4, "cpu") is None
    points.record("eager", 128, 100.0)  # pretend 128 tokens took 100 s: 511 must be judged over budget
    assert "budget" in points.prefill_skip("eager", 511, 4, "cpu")


def test_results_and_readme_written(report, tmp_path):
    written = write_results(report, tmp_path / "results" / report["device_slug"])
    names = {p.name for p in written}
    assert {"llmc-tiny.json", "llmc-tiny.md"} <= names
    assert json.loads((tmp_path / "results" / report["device_slug"] / "llmc-tiny.json").read_text()) == report
    table = (tmp_path / "results" / report["device_slug"] / "llmc-tiny.md").read_text()
    assert "time to first token | 1 | prompt 64" in table and "decode step | 1 | context 64" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{START}\nSTALE-SECTION\n{END}\n\n## After\n")
    report_main(["--results", str(tmp_path / "results"), "--readme", str(readme)])
    text = readme.read_text()
    assert "STALE-SECTION" not in text and "## After" in text and report["device"] in text and "prompt 64" in text


def test_cli_bench_help():
    out = subprocess.run([sys.executable, "-m", "llmc.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--quick" in out.stdout and "--lengths" in out.stdout
