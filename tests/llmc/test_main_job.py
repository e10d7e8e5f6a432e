"""The embedded model through the command line: compile llmc-tiny for this machine and generate readable text, with
timing (the README's main job, SmolLM2, runs in .ci/run itself and in tests/models/test_smollm2.py)."""
import re
import string
import subprocess
import sys


def llmc(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_compile_and_run_embedded_model(tmp_path):
    bundle = tmp_path / "tiny.llmc"
    done = llmc("compile", "llmc-tiny", "--target", "cpu", "-o", str(bundle), "--explain")
    assert done.returncode == 0, done.stderr
    assert re.search(r"fuse_rms_norm\s+\d+", done.stdout)
    prompt = "def fibonacci(n):"
    run = llmc("run", str(bundle), "--prompt", prompt, "--max-new-tokens", "40")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(prompt)
    new = run.stdout[len(prompt):]
    assert len(new.strip()) >= 20, run.stdout
    printable = sum(c in string.printable for c in new) / len(new)
    assert printable > 0.95, f"unreadable output: {new!r}"
    assert re.search(r"time to first token [\d.]+ ms; decode \d+ tokens in [\d.]+ ms \([\d.]+ tok/s\)", run.stderr)
