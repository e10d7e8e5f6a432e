"""The `llmc` command line. User errors print one line and exit 1; no tracebacks."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _compile(a) -> None:
    import llmc
    from llmc.compiler.api import compile

    t = time.perf_counter()
    out = compile(a.model, a.target, a.output, weights=a.weights, dtype=a.dtype, passes=a.passes,
                  max_seq_len=a.max_seq_len, check_passes=a.check_passes, progress=True)
    report = llmc.last_report()
    if a.explain:
        print(report.format())
    checked = " (every pass checked numerically)" if a.check_passes else ""
    print(f"compiled {report.model} for {report.target} ({report.dtype}) -> {out} in {time.perf_counter() - t:.1f}s{checked}")


def _run(a) -> None:
    from llmc.runtime.engine import load

    t = time.perf_counter()
    engine = load(a.bundle)
    load_s = time.perf_counter() - t
    if a.token_ids:
        prompt = [int(x) for x in a.prompt.replace(",", " ").split()]
    else:
        prompt = engine.encode(a.prompt)
    out = engine.generate([prompt], max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                          seed=a.seed)[0]
    text = " ".join(map(str, out)) if a.token_ids or engine.tokenizer is None else a.prompt + engine.decode(out)
    print(text)
    print(f"[load {load_s * 1e3:.0f} ms; {engine.timing.summary()}]", file=sys.stderr)


def _inspect(a) -> None:
    from llmc.runtime.bundle import open_bundle

    b = open_bundle(a.bundle, verify_hashes=False, check_host=False)
    m = b.manifest
    if a.json:
        print(json.dumps(m, indent=2))
        return
    cfg = m["model"]
    size = sum((b.path / f).stat().st_size for f in m["files"])
    lines = [
        f"bundle      {b.path} (format v{m['format_version']}, llmc {m['llmc_version']}, {size / 1e6:.1f} MB)",
        f"model       {cfg.get('name')} ({cfg['family']}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_heads']} heads / {cfg['num_kv_heads']} kv, vocab {cfg['vocab_size']})",
        f"target      {m['target']['name']} ({m['target']['arch']}), dtype {m['dtype']}",
        f"sequence    max {m['max_seq_len']} tokens, KV block {m['block_size']} tokens",
        f"weights     {'bound' if m['has_weights'] else 'not bound'}",
        "passes      " + ", ".join(f"{p['graph']}:{p['name']}={p['rewrites']}" for p in m["passes"]),
        f"toolchain   " + ", ".join(f"{k} {v}" for k, v in m["toolchain"].items()),
    ]
    print("\n".join(lines))


def _verify(a) -> None:
    from llmc.runtime.bundle import verify_bundle

    verify_bundle(a.bundle)
    print(f"{a.bundle}: ok (format, every file's sha256)")


def _targets(a) -> None:
    from llmc.targets import format_targets

    print(format_targets())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmc", description="Ahead-of-time compiler for LLM inference.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model into a bundle")
    c.add_argument("model", help="registry name (llmc-tiny, qwen3-8b, ...) or a Hugging Face checkpoint directory")
    c.add_argument("--target", required=True, help="cpu, t4, a10, rtx3090, a100, l4, rtx4090, h100, h200")
    c.add_argument("-o", "--output", help="bundle directory to write (default MODEL-TARGET.llmc)")
    c.add_argument("--weights", help="checkpoint directory whose weights to bind now")
    c.add_argument("--dtype", help="float32, bfloat16, float16 (default: the target's)")
    c.add_argument("--passes", help="comma list of passes to run, or -name to drop one from the default list")
    c.add_argument("--max-seq-len", type=int, help="longest prompt + generation the bundle serves")
    c.add_argument("--explain", action="store_true", help="print what each pass did")
    c.add_argument("--check-passes", action="store_true", help="run sample inputs after every pass and compare")
    c.set_defaults(fn=_compile)
    r = sub.add_parser("run", help="load a bundle and generate")
    r.add_argument("bundle")
    r.add_argument("--prompt", required=True)
    r.add_argument("--token-ids", action="store_true", help="the prompt is token ids, and so is the output")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.set_defaults(fn=_run)
    i = sub.add_parser("inspect", help="describe a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(fn=_inspect)
    v = sub.add_parser("verify", help="check a bundle's format and hashes")
    v.add_argument("bundle")
    v.set_defaults(fn=_verify)
    t = sub.add_parser("targets", help="list compile targets")
    t.set_defaults(fn=_targets)
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user can cause; anything else is a bug and keeps its traceback."""
    from llmc.runtime.bundle import BundleError
    from llmc.runtime.kv_cache import CacheFullError

    return (ValueError, KeyError, BundleError, CacheFullError, FileNotFoundError, FileExistsError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.environ.get("LLMC_DEBUG"):  # developers: full tracebacks
        args.fn(args)
        return 0
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("llmc: interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"llmc: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
