"""What `llmc bench` writes: the report as JSON, a markdown table and PNG plots (when matplotlib is installed).

The table has one row per figure, and each row names the device, dtype, batch and lengths, so that rows copied
out of it (into the README's performance section, bench/report.py) still say what they measured.
"""
from __future__ import annotations

import json
from pathlib import Path

SYSTEMS = ("llmc", "eager", "torch.compile")
HEADER = ("| device | dtype | figure | batch | tokens | llmc | HF eager | torch.compile | floor | llmc / floor "
          "| llmc vs eager | llmc vs compile |\n" + "|---" * 12 + "|")


def _time(entry: dict) -> str:
    if "skipped" in entry:
        return entry["skipped"].removeprefix("skipped: ").split(" (")[0].split(";")[0]
    s = entry["seconds"]
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _ratio(value) -> str:
    return f"{value:.2f}x" if value else "-"


def table_rows(report: dict) -> list[str]:
    device, dtype = report["device"], report["dtype"]
    rows = []
    for row in report["prefill"]:
        llmc = row["llmc"]
        rows.append(f"| {device} | {dtype} | time to first token | {row['batch']} | prompt {row['length']} | "
                    + " | ".join(_time(row[s]) for s in SYSTEMS)
                    + f" | {row['floor_s'] * 1e3:.2f} ms | {_fraction(llmc)} | "
                    f"{_ratio(row.get('llmc_speedup_vs_eager'))} | {_ratio(row.get('llmc_speedup_vs_torch.compile'))} |")
    for row in report["decode"]:
        cells = []
        for s in SYSTEMS:
            entry = row[s]
            cells.append(_time(entry) if "skipped" in entry else f"{entry['seconds'] * 1e3:.2f} ms "
                         f"({entry['tokens_per_s']:.0f} tok/s)")
        rows.append(f"| {device} | {dtype} | decode step | {row['batch']} | context {row['context']}, "
                    f"{row['new_tokens']} new | " + " | ".join(cells)
                    + f" | {row['floor_s'] * 1e3:.2f} ms | {_fraction(row['llmc'])} | "
                    f"{_ratio(row.get('llmc_speedup_vs_eager'))} | {_ratio(row.get('llmc_speedup_vs_torch.compile'))} |")
    return rows


def _fraction(entry: dict) -> str:
    return f"{entry['fraction_of_floor'] * 100:.1f}%" if "fraction_of_floor" in entry else "-"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def summary_lines(report: dict) -> list[str]:
    probes, memory = report["probes"], report["memory"]
    peaks = ", ".join(f"{s} {_bytes(memory[s]['peak_bytes'])} (+{_bytes(memory[s]['delta_bytes'])})" for s in SYSTEMS)
    lines = [
        f"{report['model']} on {report['device']}, {report['dtype']}, "
        f"{'random weights' if report.get('weights', 'random') == 'random' else 'its checkpoint weights'}"
        f"{' (quick mode)' if report['quick'] else ''}; {report['date']}; torch {report['versions']['torch']}, "
        f"transformers {report['versions']['transformers']}.",
        f"Floors from measured copy bandwidth {probes['copy_bytes_per_s'] / 1e9:.1f} GB/s and {probes['matmul_dtype']} "
        f"matmul rate {probes['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s.",
        f"llmc compile {report['compile_s']:.1f} s; cold start (load to first token) {report['cold_start_s']:.2f} s; "
        "torch.compile first calls (compilation) "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report.get("first_call_s", {}).items()) + ".",
        f"Peak memory ({memory['llmc']['method']}; + over the start of each system's run): {peaks}.",
    ]
    if report.get("capped"):
        lines.append(f"Capped: {report['capped']}.")
    return lines


def markdown(report: dict) -> str:
    return "\n".join([*(f"{line}  " for line in summary_lines(report)), "", HEADER, *table_rows(report), ""])


def plot(report: dict, directory: Path) -> list[Path]:
    """Time to first token against prompt length, and decode tokens/s against batch; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # plots are optional (pip install llmc[bench])
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figures = (("prefill", "length", "prompt tokens", "time to first token (s)", lambda e, r: e["seconds"],
                lambda r: r["floor_s"]),
               ("decode", "batch", "batch", "decode tokens/s", lambda e, r: e["tokens_per_s"],
                lambda r: r["batch"] / r["floor_s"]))
    for kind, key, xlabel, ylabel, value, floor in figures:
        rows = report[kind]
        fig, ax = plt.subplots(figsize=(6, 4))
        for system in SYSTEMS:
            points = [(r[key], value(r[system], r)) for r in rows if "seconds" in r[system]]
            if points:
                ax.plot(*zip(*points), marker="o", label=system)
        ax.plot([r[key] for r in rows], [floor(r) for r in rows], linestyle="--", color="gray", label="floor")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel,
               title=f"{report['model']} {kind}, {report['dtype']}\n{report['device']}")
        ax.legend()
        fig.tight_layout()
        path = directory / f"{report['model']}-{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_results(report: dict, directory: str | Path) -> list[Path]:
    """Writes <model>.json, <model>.md and the plots into DIRECTORY; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = report["model"]
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    return [json_path, md_path, *plot(report, directory)]
