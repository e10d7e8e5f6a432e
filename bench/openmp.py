"""OpenMP wait policies for llmc's CPU decode, on an idle host and on a busy one (llmc/openmp.py's choice).

Each policy runs in its own process (libgomp reads the policy when it loads): it loads the SmolLM2-135M-Instruct
bundle, warms up, and decodes --new-tokens tokens after a chat prompt. "busy" runs the same while one other
process spins a core (what a shared host does to us). The policies and conditions alternate within each of
--repeat rounds; medians and min-max of decode tokens/s. A run started on a busy machine is refused.

    python bench/openmp.py [--threads 2] [--repeat 5]   -> bench/results/<device>/openmp.{json,md}
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
POLICIES = {"libgomp default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}, "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"}}
CHILD = """
import sys, torch, llmc
torch.set_num_threads(int(sys.argv[2]))
engine = llmc.load(sys.argv[1], prefix_caching=False)
prompt = engine.chat_prompt([{"role": "user", "content": "Write a short poem about the sea."}])
engine.generate([prompt], max_new_tokens=8)
engine.generate([prompt], max_new_tokens=int(sys.argv[3]))
print(engine.timing.decode_tokens / engine.timing.decode_s)
"""
SPIN = "import time\nwhile True: pass"


def decode_rate(bundle: Path, env: dict, threads: int, new_tokens: int, busy: bool) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    # llmc sets its own spin count where the user set none: "libgomp default" spells out libgomp's (300000).
    child_env = {**clean, **(env or {"GOMP_SPINCOUNT": "300000"})}
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(threads), str(new_tokens)],
                             env=child_env, capture_output=True, text=True, check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return float(out.stdout.split()[-1])


def main() -> None:
    import llmc  # before torch: the children set their own policies, this process only compiles
    from llmc.bench import probe

    p = probe.script_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    load = probe.quiet_or_exit(a.force)

    bundle = llmc.compile("smollm2-135m-instruct", target="cpu", dtype=a.dtype,
                          out=Path(tempfile.mkdtemp(prefix="llmc-openmp-")) / "smol.llmc")
    samples = {(policy, cond): [] for cond in ("idle", "busy") for policy in POLICIES}
    for _ in range(a.repeat):
        for (policy, cond), runs in samples.items():
            runs.append(decode_rate(bundle, POLICIES[policy], a.threads, a.new_tokens, cond == "busy"))
    report = {"device": probe.device_name(), "threads": a.threads, "repeat": a.repeat, "load_at_start": load,
              "dtype": a.dtype, "new_tokens": a.new_tokens, "llmc_spin_count": llmc.openmp.SPIN_COUNT,
              "results": [{"policy": p_, "condition": c, "decode_tok_s": statistics.median(s), "min": min(s),
                           "max": max(s), "samples": s} for (p_, c), s in samples.items()]}
    out = a.out or RESULTS / probe.device_slug(report["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "openmp.json").write_text(json.dumps(report, indent=2))
    (out / "openmp.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    rows = {}
    for x in r["results"]:
        rows.setdefault(x["policy"], {})[x["condition"]] = f"{x['decode_tok_s']:.1f} ({x['min']:.1f}-{x['max']:.1f})"
    lines = [f"SmolLM2-135M-Instruct llmc {r['dtype']} bundle, decode tokens/s ({r['new_tokens']} new), {r['device']}, "
             f"{r['threads']} threads, median (min-max) of {r['repeat']}; busy: one other process spins a core. "
             f"llmc's default: GOMP_SPINCOUNT={r['llmc_spin_count']}. `python bench/openmp.py`", "",
             "| OpenMP wait policy | idle host | busy host |", "| --- | --- | --- |"]
    lines += [f"| {policy} | {v.get('idle', '-')} | {v.get('busy', '-')} |" for policy, v in rows.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
