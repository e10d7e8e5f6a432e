"""The `llmc` command line. User errors (llmc.common.errors.LlmcError) print one line and exit 1; any other
exception is a bug: its traceback, a line asking to report it, exit 70."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

from llmc.common.contract import BACKENDS
from llmc.common.errors import LlmcError, UsageError


def _compile(a) -> None:
    import llmc
    from llmc.compiler.api import compile
    from llmc.passes.options import CompileOptions

    t = time.perf_counter()
    options = CompileOptions.from_flags(**{name: getattr(a, name) for name in CompileOptions.flag_names()})
    weights = False if a.no_weights else a.weights
    # Progress bars only on a terminal: in a log or a pipe their carriage returns are noise around the result.
    out = compile(a.model, out=a.output, weights=weights, progress=sys.stderr.isatty(), options=options)
    report = llmc.last_report()
    if a.explain:
        print(report.format())
    else:
        for note in report.notes:
            print(f"weights: {note}")
    checked = " (every pass checked numerically)" if a.check_passes else ""
    seconds = time.perf_counter() - t
    print(f"compiled {report.model} for {report.target} ({report.dtype}) -> {out} in {seconds:.1f}s{checked}")


def _bind(a) -> None:
    from llmc.compiler.api import bind

    t = time.perf_counter()
    out = bind(a.bundle, a.weights, a.output, progress=True)
    print(f"bound {a.weights} -> {out} in {time.perf_counter() - t:.1f}s")


def _load_engine(a):
    """The engine of `run` and `chat`, and the seconds it took to load."""
    from llmc.runtime.engine import load

    t = time.perf_counter()
    engine = load(a.bundle, kv_cache_memory=a.kv_cache_memory, kv_cache_fraction=a.kv_cache_fraction,
                  kv_offload_memory=a.kv_offload_memory or 0, prefix_caching=not a.no_prefix_caching,
                  **({"prefill_chunk": a.prefill_chunk} if a.prefill_chunk is not None else {}))
    load_s = time.perf_counter() - t
    if a.verbose:
        print(engine.cache.describe(), file=sys.stderr)
    return engine, load_s


def _sampling(a) -> dict:
    # A chat reply ends at the model's end of turn: it gets room for a whole answer; a plain prompt a short sample.
    new = a.max_new_tokens if a.max_new_tokens is not None else 256 if getattr(a, "chat", True) is not None else 64
    return dict(max_new_tokens=new, temperature=a.temperature, top_p=a.top_p, seed=a.seed)


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_timing(engine, load_s: float | None, verbose: bool) -> None:
    if verbose:
        print(f"KV {engine.kv_stats.summary()}", file=sys.stderr)
    load = f"load {load_s * 1e3:.0f} ms; " if load_s is not None else ""
    print(f"[{load}{engine.timing.summary()}]", file=sys.stderr)


def _run(a) -> None:
    from llmc.runtime.chat import Conversation

    if a.chat is not None and a.token_ids:
        raise UsageError("--token-ids goes with --prompt: a --chat message is text")
    if a.system is not None and a.chat is None:
        raise UsageError("--system goes with --chat: a --prompt is continued as it is, without a chat template")
    engine, load_s = _load_engine(a)
    if a.chat is not None:
        Conversation(engine, a.system).send(a.chat, on_text=_print_piece, **_sampling(a))
        print(flush=True)
    else:
        prompt = parse_token_ids(a.prompt) if a.token_ids else engine.encode(a.prompt)
        out = engine.generate([prompt], **_sampling(a))[0]
        text = " ".join(map(str, out)) if a.token_ids or engine.tokenizer is None else a.prompt + engine.decode(out)
        print(text, flush=True)
    _print_timing(engine, load_s, a.verbose)


def _chat(a) -> None:
    """Multi-turn chat on stdin / stdout: /exit or end of input quits; Ctrl-C during a reply stops that reply."""
    from llmc.runtime.chat import Conversation

    engine, load_s = _load_engine(a)
    conversation = Conversation(engine, a.system)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"chatting with {a.bundle}: /exit or Ctrl-D quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if not line.strip():
            continue
        try:
            conversation.send(line, on_text=_print_piece, **_sampling(a))
        except KeyboardInterrupt:  # the reply so far stays in the conversation
            print(flush=True)
            print("[reply stopped]", file=sys.stderr)
            continue
        print(flush=True)
        _print_timing(engine, load_s, a.verbose)
        load_s = None
    if interactive:
        print()


def parse_token_ids(text: str) -> list[int]:
    words = text.replace(",", " ").split()
    bad = next((w for w in words if not w.isdigit()), None)
    if bad is not None or not words:
        found = f"found {bad!r}" if bad is not None else "it is empty"
        raise UsageError(f"--token-ids expects the prompt as token ids such as \"3 5 7\", but {found}")
    return [int(w) for w in words]


def _inspect(a) -> None:
    from llmc.runtime.bundle import open_bundle
    from llmc.runtime.inspect import describe

    b = open_bundle(a.bundle, verify_hashes=False, check_host=False)
    print(json.dumps(b.manifest, indent=2) if a.json else "\n".join(describe(b)))


def _eval(a) -> None:
    from llmc.runtime.engine import load
    from llmc.runtime.evaluate import perplexity, read_text, token_ids

    if a.seq_len < 1 or a.batch < 1:
        raise UsageError("--seq-len and --batch must be at least 1")
    text = read_text(a.perplexity)  # before the bundle loads: a wrong path fails fast
    # Room for one batch of windows, whatever the bundle's default pool (which must hold one max-length sequence).
    from llmc.runtime.bundle import open_bundle

    manifest = open_bundle(a.bundle, verify_hashes=False).manifest
    block = manifest["block_size"]
    tokens = max(a.batch * -(-a.seq_len // block) * block, manifest["max_seq_len"])
    engine = load(a.bundle, kv_cache_tokens=tokens, prefix_caching=False)
    result = perplexity(engine, token_ids(engine, text), a.seq_len, a.windows, a.batch)
    if a.json:
        print(json.dumps({"bundle": str(a.bundle), "file": str(a.perplexity), "dtype": engine.bundle.dtype,
                          "quant": engine.bundle.manifest.get("quant"), **result.to_dict()}))
    else:
        print(f"{a.bundle}: {result.format()}")


def _build_engine(a) -> None:
    from llmc.runtime.tensorrt import build_engine_cli

    print(build_engine_cli(a.bundle))


def _verify(a) -> None:
    from llmc.runtime.bundle import verify_bundle

    verify_bundle(a.bundle)
    print(f"{a.bundle}: ok (format, every file's sha256)")


def _bench(a) -> None:
    from llmc.bench.report import markdown, write_results
    from llmc.bench.run import run_bench

    report = run_bench(a.model, quick=a.quick, device=a.device, lengths=a.lengths, batches=a.batches,
                       target=a.target, dtype=a.dtype, progress=True, threads=a.threads, repeat=a.repeat,
                       peers=a.peers, force=a.force)
    out = a.out or os.path.join("bench", "results", report["device_slug"])
    written = write_results(report, out)
    print(markdown(report))
    print("wrote " + ", ".join(map(str, written)))


def _targets(a) -> None:
    from llmc.common.targets import format_targets

    print(format_targets())


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    """The options `run` and `chat` share: the bundle, the system message, sampling and the KV cache."""
    p.add_argument("bundle")
    p.add_argument("--system", metavar="TEXT", help="a system message to begin the chat with (run: with --chat)")
    p.add_argument("--max-new-tokens", type=int, help="default 256 for a chat reply, 64 for --prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--kv-cache-memory", metavar="SIZE",
                   help="device KV cache budget: bytes or 512MiB, 2GiB ... (default: room for 4 max-length "
                        "sequences, at most 90%% of free GPU memory)")
    p.add_argument("--kv-cache-fraction", type=float, metavar="F",
                   help="device KV cache budget as a fraction of the GPU memory free after loading weights (CUDA)")
    p.add_argument("--kv-offload-memory", metavar="SIZE",
                   help="host memory that preempted sequences are swapped to (default none: they are recomputed)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share cached prompt blocks")
    p.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="prefill long prompts N tokens at a time (default 512)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the KV cache's size and what it did")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmc", description="Ahead-of-time compiler for LLM inference.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model into a bundle")
    c.add_argument("model", help="registry name (llmc-tiny, qwen3-8b, ...) or a Hugging Face checkpoint directory")
    c.add_argument("--target", required=True, help="cpu, t4, a10, rtx3090, a100, l4, rtx4090, h100, h200")
    c.add_argument("-o", "--output", "--out", dest="output",
                   help="bundle directory to write (default MODEL-TARGET.llmc)")
    c.add_argument("--weights", help="checkpoint directory whose weights to bind now")
    c.add_argument("--no-weights", action="store_true",
                   help="compile from config.json alone; bind weights later with llmc bind")
    c.add_argument("--dtype", help="float32, bfloat16, float16 (default: the target's)")
    c.add_argument("--passes", help="comma list of passes to run, or -name,-other to drop some from the default list")
    c.add_argument("--max-seq-len", type=int, help="longest prompt + generation the bundle serves")
    c.add_argument("--sliding-window", type=int, default=0, metavar="N",
                   help="attention sees only the last N positions (default 0: full attention)")
    c.add_argument("--backend", default="triton", choices=BACKENDS,
                   help="triton (default): graph + Triton kernels; onnx: an ONNX model for onnxruntime; tensorrt: "
                        "that ONNX + TensorRT build settings (engine built on the GPU host: llmc build-engine)")
    c.add_argument("--quant", metavar="SCHEME",
                   help="fp8, fp8-w8a16, int8 (SmoothQuant), int8-rtn, int8-w8a16 (weight-only), int4, "
                        "int4-awq, w4a8, mixed")
    c.add_argument("--quant-group-size", type=int, metavar="N", help="int4 group size (default 128)")
    c.add_argument("--quant-policy", metavar="FILE", help="TOML policy: a scheme per layer kind (see passes/policies)")
    c.add_argument("--calibration", metavar="FILE", help="text for SmoothQuant / AWQ / calibration-aware pruning")
    c.add_argument("--sparsity", metavar="PATTERN", help="2:4: prune the linear layers to 2 of every 4 weights")
    c.add_argument("--attention-keep", type=float, default=0.0, metavar="F",
                   help="block-sparse attention: keep this fraction of key blocks per query block (default 0: dense)")
    c.add_argument("--attention-block", type=int, default=64, metavar="N",
                   help="tokens per block of --attention-keep (default 64)")
    c.add_argument("--explain", action="store_true", help="print what each pass did")
    c.add_argument("--check-passes", action="store_true", help="run sample inputs after every pass and compare")
    c.add_argument("--dump-after", nargs=2, metavar=("PHASE", "DIR"),
                   help="write each graph as readable text after PHASE (cleanup, canonicalize, fold, fusion, "
                        "quantize, lower) or after a pass, into DIR")
    c.set_defaults(fn=_compile)
    b = sub.add_parser("bind", help="bind a checkpoint's weights to a bundle compiled without them")
    b.add_argument("bundle")
    b.add_argument("--weights", required=True, help="checkpoint directory")
    b.add_argument("-o", "--output", help="write the bound bundle here (default: replace BUNDLE)")
    b.set_defaults(fn=_bind)
    r = sub.add_parser("run", help="load a bundle and generate")
    text = r.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text to continue")
    text.add_argument("--chat", metavar="MESSAGE", help="a user message to reply to, with the model's chat template")
    r.add_argument("--token-ids", action="store_true", help="the prompt is token ids, and so is the output")
    _add_generation_options(r)
    r.set_defaults(fn=_run)
    ch = sub.add_parser("chat", help="chat with a bundle's model on the terminal (multi-turn)")
    _add_generation_options(ch)
    ch.set_defaults(fn=_chat)
    i = sub.add_parser("inspect", help="describe a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(fn=_inspect)
    e = sub.add_parser("eval", help="measure a bundle's quality: held-out perplexity of a text file")
    e.add_argument("bundle")
    e.add_argument("--perplexity", required=True, metavar="FILE", help="UTF-8 text to score")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    e.add_argument("--windows", type=int, help="score at most this many windows (default: all the text holds)")
    e.add_argument("--batch", type=int, default=16, help="windows per step (default 16)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(fn=_eval)
    be = sub.add_parser("build-engine", help="build a --backend tensorrt bundle's engine on this GPU host")
    be.add_argument("bundle")
    be.set_defaults(fn=_build_engine)
    v = sub.add_parser("verify", help="check a bundle's format and hashes")
    v.add_argument("bundle")
    v.set_defaults(fn=_verify)
    bn = sub.add_parser("bench", help="measure llmc against its peers: transformers eager, torch.compile, "
                        "onnxruntime, llama.cpp")
    bn.add_argument("model", help="llmc-tiny, a registry name (random weights), a checkpoint directory or a GGUF file")
    bn.add_argument("--quick", action="store_true", help="one short prompt, batch 1, a few tokens (CI)")
    bn.add_argument("--out", help="results directory (default bench/results/<device>)")
    bn.add_argument("--lengths", type=int, nargs="+", help="prompt lengths for time to first token")
    bn.add_argument("--batches", type=int, nargs="+", help="batch sizes for decode")
    bn.add_argument("--device", default="cpu", help="cpu or cuda")
    bn.add_argument("--target", help="llmc target (default: the host's)")
    bn.add_argument("--dtype", help="float32, bfloat16, float16 (default: the target's)")
    bn.add_argument("--threads", type=int, help="threads for every system (default: the cores this process may use)")
    bn.add_argument("--repeat", type=int, help="recorded rounds per point (default 5; publishing takes 5 or more)")
    bn.add_argument("--peers", nargs="+", metavar="PEER",
                    help="eager, torch.compile, onnxruntime, llama.cpp (default: all that can run)")
    bn.add_argument("--force", action="store_true",
                    help="measure on a busy machine (1-minute load >= 0.5); the results are marked not for publishing")
    bn.set_defaults(fn=_bench)
    t = sub.add_parser("targets", help="list compile targets")
    t.set_defaults(fn=_targets)
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user can cause; anything else is a bug and keeps its traceback (llmc.common.errors).

    LlmcError: what llmc refuses, worded for the user. OSError: paths, permissions, a full disk.
    SafetensorError: a truncated or corrupt weights file.
    """
    from safetensors import SafetensorError

    return (LlmcError, OSError, SafetensorError)


def describe_error(error: BaseException) -> str:
    from safetensors import SafetensorError

    if isinstance(error, SafetensorError):  # its message names neither the file nor a remedy
        return f"a weights file is not valid safetensors ({error}); re-download or re-export the checkpoint"
    return str(error)


BUG_REPORT = "llmc: this is a bug in llmc; please report it with the traceback above"
BUG_EXIT = 70  # EX_SOFTWARE (sysexits.h): an internal error, as opposed to 1, a user's


def join_option_values(argv: list[str]) -> list[str]:
    """`--passes -fold_rope` as `--passes=-fold_rope`: argparse reads a value that starts with "-" as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--passes" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            out.append(f"--passes={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(join_option_values(sys.argv[1:] if argv is None else list(argv)))
    # torch.export's run_decompositions deep-copies pytree specs and trips torch's own LeafSpec deprecation:
    # noise a user can do nothing about, eight times per compile.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    if os.environ.get("LLMC_DEBUG"):  # developers: full tracebacks
        args.fn(args)
        return 0
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("llmc: interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        print(f"llmc: error: {describe_error(e)}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return BUG_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
