"""What `llmc bench` writes, and the README's performance section rebuilt from what is committed.

A report is written as JSON, a markdown table and PNG plots (when matplotlib is installed), with the comparisons
every figure carries: against the best peer that ran, and as a fraction of its floor. The table has one row per
figure, and each row names the device, dtype, batch and lengths, so that rows copied out of it (into the README)
still say what they measured. Reports written before the peers were alternated (no "load_at_start") render too,
and say they used the older method.

Run as a script, it regenerates each committed report's table and plots beside its JSON, and the README's
"## Performance" section (between <!-- bench:start --> and <!-- bench:end -->) from every model report under
bench/results/ that may be published: a quick run, one started on a busy machine or one with fewer than 5 rounds
per point is left out of the README (unpublishable below), and said so.

    python bench/report.py                 # all of bench/results/, then README.md
    python bench/report.py --no-readme     # tables and plots only
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmc.bench.probe import BUSY_LOAD

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

MIN_REPEAT = 5  # fewer recorded rounds than this are not published
SYSTEMS = ("llmc", "eager", "torch.compile", "onnxruntime", "llama.cpp")
PEERS = SYSTEMS[1:]
LABELS = {"llmc": "llmc", "eager": "HF eager", "torch.compile": "torch.compile", "onnxruntime": "onnxruntime",
          "llama.cpp": "llama.cpp"}
HEADER = ("| device | dtype | figure | batch | tokens | floor | "
          + " | ".join(LABELS[s] for s in SYSTEMS) + " | llmc vs best peer |\n"
          + "|---" * (7 + len(SYSTEMS)) + "|")


def _seconds(entry: dict | None) -> float | None:
    return entry.get("seconds") if entry else None


def best_peer(row: dict) -> str | None:
    """The fastest peer measured at this row (lowest median time), or None when no peer ran."""
    times = {p: _seconds(row.get(p)) for p in PEERS}
    times = {p: t for p, t in times.items() if t}
    return min(times, key=times.get) if times else None


def compare(row: dict) -> None:
    """Adds to a row of measured entries: its best peer; to each measured entry vs_best_peer (the best peer's time
    over its own: above 1 it is faster than every peer); and llmc's speed-up over each peer (None where either
    did not run)."""
    best = best_peer(row)
    row["best_peer"] = best
    best_s = _seconds(row.get(best))
    for system in SYSTEMS:
        t = _seconds(row.get(system))
        if t:
            row[system]["vs_best_peer"] = best_s / t if best_s else None
    ours = _seconds(row.get("llmc"))
    for peer in PEERS:
        theirs = _seconds(row.get(peer))
        row[f"llmc_speedup_vs_{peer}"] = theirs / ours if ours and theirs else None


def unpublishable(report: dict) -> str | None:
    """Why a report must not be published (bench/report.py leaves it out of the README), or None."""
    if report.get("quick"):
        return "quick mode (one short prompt, a few new tokens)"
    if "load_at_start" not in report:  # the older method recorded no load; its summary says which method it used
        return None
    if report["load_at_start"] >= BUSY_LOAD:
        return f"the machine was busy at the start (1-minute load {report['load_at_start']:.2f} >= {BUSY_LOAD})"
    if report["settings"]["repeat"] < MIN_REPEAT:
        return f"{report['settings']['repeat']} rounds per point (publishing takes at least {MIN_REPEAT})"
    return None


def _duration(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _range(entry: dict, low: str, high: str, fmt: str) -> str:
    return f" [{fmt.format(entry[low])}-{fmt.format(entry[high])}]" if low in entry else ""


def _cell(entry: dict | None, decode: bool) -> str:
    if not entry:
        return "-"  # a report from before this system was a peer
    if "skipped" in entry:
        return entry["skipped"].removeprefix("skipped: ").split(" (")[0].split(";")[0]
    if decode:
        text = f"{entry['tokens_per_s']:.1f} tok/s" + _range(entry, "tokens_per_s_min", "tokens_per_s_max", "{:.1f}")
    else:
        scale = 1e3 if entry["seconds"] < 1 else 1  # the range in the median's unit
        text = _duration(entry["seconds"]) + _range({k: entry[k] * scale for k in ("min_s", "max_s") if k in entry}, "min_s", "max_s",
                                                    "{:.2f}")
    return f"{text}, {entry['fraction_of_floor']:.1%} of floor" if "fraction_of_floor" in entry else text


def _versus_best(row: dict) -> str:
    best, ours = best_peer(row), _seconds(row.get("llmc"))
    if not best or not ours:
        return "-"
    return f"{_seconds(row[best]) / ours:.2f}x ({LABELS[best]})"


def table_rows(report: dict) -> list[str]:
    device, dtype = report["device"], report["dtype"]
    rows = []
    for row in report["prefill"]:
        rows.append(f"| {device} | {dtype} | time to first token | {row['batch']} | prompt {row['length']} | "
                    f"{_duration(row['floor_s'])} | " + " | ".join(_cell(row.get(s), False) for s in SYSTEMS)
                    + f" | {_versus_best(row)} |")
    for row in report["decode"]:
        rows.append(f"| {device} | {dtype} | decode | {row['batch']} | context {row['context']}, "
                    f"{row['new_tokens']} new | {row['batch'] / row['floor_s']:.0f} tok/s | "
                    + " | ".join(_cell(row.get(s), True) for s in SYSTEMS) + f" | {_versus_best(row)} |")
    return rows


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _weights(report: dict) -> str:
    kind = report.get("weights", "random")
    if kind == "gguf":
        types = ", ".join(f"{n} {t}" for t, n in sorted(report.get("gguf_types", {}).items()))
        return f"its GGUF file's weights ({types} tensors; llama.cpp runs them as stored, the others as {report['dtype']})"
    return "random weights" if kind == "random" else "its checkpoint weights"


def _method(report: dict) -> str:
    s = report["settings"]
    if "load_at_start" not in report:
        return (f"Older method: systems run one after another, median of {s['repeat']} after {s['warmup']} warm-up; "
                "no load check.")
    openmp = ", ".join(f"{k} {v}" for k, v in report["openmp"].items())
    return (f"{report['threads']} threads each ({openmp}); systems alternated at "
            f"each point on shared prompts; median [min-max] of {s['repeat']} round{'s' * (s['repeat'] != 1)} after "
            f"{s['warmup']} warm-up; "
            f"1-minute load {report['load_at_start']:.2f} at the start.")


def summary_lines(report: dict) -> list[str]:
    probes, memory = report["probes"], report["memory"]
    peaks = ", ".join(f"{s} {_bytes(m['peak_bytes'])} (+{_bytes(m['delta_bytes'])})" for s, m in memory.items())
    why_not = unpublishable(report)
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "llmc")
    lines = [f"NOT FOR PUBLISHING: {why_not}."] if why_not else []
    lines += [
        f"{report['model']} on {report['device']}, {report['dtype']}, {_weights(report)}"
        f"{' (quick mode)' if report['quick'] else ''}; {report['date']}; {versions}.",
        _method(report),
        f"Floors from measured copy bandwidth {probes['copy_bytes_per_s'] / 1e9:.1f} GB/s and {probes['matmul_dtype']} "
        f"matmul rate {probes['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s.",
    ]
    compile_line = f"llmc compile {report['compile_s']:.1f} s"
    if "compile_memory" in report:
        compile_line += f" (peak +{_bytes(report['compile_memory']['delta_bytes'])})"
    compile_line += f"; cold start (load to first token) {report['cold_start_s']:.2f} s"
    if "onnx_compile_s" in report:
        compile_line += f"; llmc --backend onnx compile {report['onnx_compile_s']:.1f} s"
    lines.append(compile_line + "; torch.compile first calls (compilation) "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in report.get("first_call_s", {}).items()) + ".")
    if "load_at_start" in report:
        lines.append(f"Peak memory over loading and a first generate ({next(iter(memory.values()))['method']}; + "
                     f"over what the process held before: the systems stay loaded together): {peaks}.")
    else:
        lines.append(f"Peak memory ({memory['llmc']['method']}; + over the start of each system's run): {peaks}.")
    llama = report.get("llama_cpp")
    if llama:
        lines.append(f"llama.cpp: llama-cpp-python {llama['version']}, n_ctx {llama['n_ctx']}, n_batch "
                     f"{llama['n_batch']}; its decode floor counts the {_bytes(llama['weight_bytes'])} of matmul "
                     "weights as stored in the GGUF and an f16 KV cache.")
    not_run = report.get("not_run") or {}
    if not_run:
        lines.append("Not run: " + "; ".join(f"{LABELS[s]} ({why})" for s, why in not_run.items()) + ".")
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
            points = [(r[key], value(r[system], r)) for r in rows if _seconds(r.get(system))]
            if points:
                ax.plot(*zip(*points), marker="o", label=LABELS[system])
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


def model_reports(results: Path) -> list[tuple[Path, dict]]:
    """Every `llmc bench` report under RESULTS (the kernel microbenchmarks' JSON there is left out)."""
    found = []
    for path in sorted(results.glob("*/*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "prefill" in data and "decode" in data:
            found.append((path, data))
    return found


def performance_section(reports: list[tuple[Path, dict]], root: Path = ROOT) -> str:
    if not reports:
        return "No benchmark results yet: run `llmc bench MODEL`, then `python bench/report.py`."
    parts = ["Generated by `python bench/report.py` from bench/results/; each block says its weights (llmc-tiny's "
             "own trained ones, random for registry shapes, a GGUF file's) and its method; all systems in one "
             "process. Floors: prefill FLOPs over the measured matmul rate, decode bytes read per step over the "
             "measured copy bandwidth. Ratios: llmc's speed over the fastest peer at that row (above 1x: llmc is "
             "faster)."]
    for path, report in reports:
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        parts.append(f"**{report['model']}** ({rel})  \n" + "  \n".join(summary_lines(report)))
        parts.append("\n".join([HEADER, *table_rows(report)]))
    return "\n\n".join(parts)


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{readme} lacks the {START} ... {END} markers; add them where the section belongs")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{section}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild bench tables, plots and the README performance section.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    reports = model_reports(args.results)
    for path, report in reports:
        write_results(report, path.parent)
    published = []
    for path, report in reports:
        why_not = unpublishable(report)
        if why_not:
            print(f"left out of the README: {path} ({why_not})")
        else:
            published.append((path, report))
    if not args.no_readme:
        update_readme(args.readme, performance_section(published, args.readme.resolve().parent))
    print(f"{len(reports)} report(s) under {args.results}" + ("" if args.no_readme else f"; updated {args.readme}"))


if __name__ == "__main__":
    main()
