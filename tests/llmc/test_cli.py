"""The `llmc` command line as users run it: a subprocess, stdout and stderr captured.

One tiny Qwen3 checkpoint is compiled once for the module (--max-seq-len 16, so the same bundle serves the
too-long-prompt case); tests that tamper with a bundle copy it first. A user error must come out as exactly one
stderr line "llmc: error: ..." with exit code 1 and no traceback; any other exception is a bug and shows its
traceback and a line asking to report it.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmc
from llmc.cli import BUG_EXIT, BUG_REPORT, main
from llmc.common.errors import LlmcError
from llmc.common.targets import TARGETS
from llmc.runtime.engine import DEFAULT_PREFILL_CHUNK
from llmc.runtime.plan import plan_bundle
from tests.conftest import TINY_SHAPE, write_tiny_hf_checkpoint

MAX_SEQ_LEN = 16
# Qwen3: input, post-attention, q and k norms per layer, plus the final norm.
RMS_NORMS = 4 * TINY_SHAPE["num_hidden_layers"] + 1


def llmc_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, one stderr line "llmc: error: ..." holding every fragment, no traceback anywhere."""
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, everything
    assert len(lines) == 1 and lines[0].startswith("llmc: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="module")
def compiled(checkpoint, tmp_path_factory):
    """(the compile's CompletedProcess, the bundle path)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny.llmc"
    result = llmc_cli("compile", checkpoint.path, "--target", "cpu", "--dtype", "float32", "-o", out, "--explain",
                      "--max-seq-len", MAX_SEQ_LEN)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, out


@pytest.fixture
def bundle(compiled):
    return compiled[1]


def random_prompt(n: int) -> list[int]:
    return torch.randint(0, TINY_SHAPE["vocab_size"], (n,)).tolist()


# --- the happy path -----------------------------------------------------------------------------------------------

def test_compile_explain_prints_each_pass_and_writes_the_bundle(compiled):
    result, out = compiled
    assert "Traceback" not in result.stdout + result.stderr
    counts = [int(n) for n in re.findall(r"^\w+\s+fuse_rms_norm\s+(\d+)\s", result.stdout, re.MULTILINE)]
    assert counts == [RMS_NORMS, RMS_NORMS], result.stdout  # prefill and decode graphs
    assert re.search(r"^graph prefill$", result.stdout, re.MULTILINE) and "graph decode" in result.stdout
    assert f"-> {out}" in result.stdout.strip().splitlines()[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = [p["rewrites"] for p in manifest["passes"] if p["name"] == "fuse_rms_norm"]
    assert recorded == [RMS_NORMS, RMS_NORMS]
    assert manifest["has_weights"] and manifest["max_seq_len"] == MAX_SEQ_LEN
    assert any(name.startswith("weights/") for name in manifest["files"])


def test_inspect_describes_the_bundle(bundle):
    result = llmc_cli("inspect", bundle)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"qwen3: {TINY_SHAPE['num_hidden_layers']} layers, hidden {TINY_SHAPE['hidden_size']}" in text
    assert re.search(r"^target\s+cpu \(cpu\), dtype float32$", text, re.MULTILINE), text
    assert f"max {MAX_SEQ_LEN} tokens" in text and re.search(r"^weights\s+bound$", text, re.MULTILINE)
    assert f"prefill:fuse_rms_norm={RMS_NORMS}" in text and f"decode:fuse_rms_norm={RMS_NORMS}" in text
    as_json = llmc_cli("inspect", bundle, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == json.loads((bundle / "manifest.json").read_text())


UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def assert_bytes(printed: str, expected: int) -> None:
    """A figure as inspect prints it ("4.10 KiB"): equal to `expected` up to the printed rounding."""
    value, unit = printed.split()
    assert abs(float(value) * UNITS[unit] - expected) <= 0.005 * UNITS[unit], (printed, expected)


def test_inspect_reports_memory(bundle):
    result = llmc_cli("inspect", bundle)
    assert result.returncode == 0, result.stderr
    figure = r"(\d+(?:\.\d+)? (?:[KMG]i)?B)"
    context = -(-MAX_SEQ_LEN // 16) * 16  # whole KV blocks
    memory = re.search(rf"^memory\s+weights {figure}; KV cache {figure} per token, {figure} per 16-token block$",
                       result.stdout, re.MULTILINE)
    assert memory, result.stdout
    stored = sum(end - start for shard in bundle.glob("weights/*.safetensors")
                 for name, entry in safetensors_header(shard).items() if name != "__metadata__"
                 for start, end in [entry["data_offsets"]])
    assert_bytes(memory[1], stored)
    per_token = 2 * TINY_SHAPE["num_hidden_layers"] * TINY_SHAPE["num_key_value_heads"] * TINY_SHAPE["head_dim"] * 4
    assert_bytes(memory[2], per_token)
    assert_bytes(memory[3], per_token * 16)
    rows = re.findall(rf"^(?:activations)?\s+((?:prefill|decode) batch \d+(?: x \d+ tokens)?, context "
                      rf"{context} tokens): peak {figure} \({figure} without reuse\)$", result.stdout, re.MULTILINE)
    shapes = [shape for shape, _, _ in rows]
    assert shapes == [f"prefill batch 1 x {MAX_SEQ_LEN} tokens, context {context} tokens",
                      f"prefill batch 32 x {MAX_SEQ_LEN} tokens, context {context} tokens",
                      f"decode batch 1, context {context} tokens", f"decode batch 32, context {context} tokens"], \
        result.stdout
    # planned on the spot, at the engine's prefill chunk (longer than MAX_SEQ_LEN: a prompt is one chunk here)
    graph, manifest = (json.loads((bundle / name).read_text()) for name in ("graph.json", "manifest.json"))
    assert "memory" not in graph  # compile no longer stores a plan
    plans = plan_bundle(graph, manifest["model"], torch.float32, 16, MAX_SEQ_LEN, DEFAULT_PREFILL_CHUNK)
    for (_, peak, naive), plan in zip(rows, [*plans["prefill"], *plans["decode"]]):
        assert_bytes(peak, plan["peak_bytes"])
        assert_bytes(naive, plan["naive_bytes"])


def test_an_old_bundle_with_a_stored_memory_plan_loads_and_inspects(bundle, tmp_path):
    """Bundles of older llmc carry graph.json "memory" (planned for whole-prompt prefill): still read, not used."""
    from llmc.common.contract import sha256_file

    old = tmp_path / "old.llmc"
    shutil.copytree(bundle, old)
    graph = json.loads((old / "graph.json").read_text())
    graph["memory"] = {"weight_bytes": 1, "plans": {"prefill": [{"shape": {"batch": 1, "new_tokens": 7, "kv_blocks": 1},
                                                                 "peak_bytes": 3, "naive_bytes": 5}]}}
    (old / "graph.json").write_text(json.dumps(graph))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"]["graph.json"] = sha256_file(old / "graph.json")
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert llmc_cli("verify", old).returncode == 0
    fresh, stale = llmc_cli("inspect", bundle), llmc_cli("inspect", old)
    assert stale.returncode == 0, stale.stderr
    assert [line for line in stale.stdout.splitlines() if not line.startswith("bundle")] == \
        [line for line in fresh.stdout.splitlines() if not line.startswith("bundle")]
    assert llmc.load(old).generate([random_prompt(3)], max_new_tokens=2)


def test_verify_accepts_an_untouched_bundle(bundle):
    result = llmc_cli("verify", bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{bundle}: ok (format, every file's sha256)"


def test_run_prints_the_tokens_the_python_api_generates(bundle, checkpoint):
    prompt = random_prompt(3)
    result = llmc_cli("run", bundle, "--prompt", " ".join(map(str, prompt)), "--token-ids", "--max-new-tokens", 8)
    assert result.returncode == 0, result.stderr
    printed = [int(t) for t in result.stdout.split()]
    assert len(printed) == 8  # the tiny checkpoint declares no end-of-sequence token
    assert printed == llmc.load(bundle).generate([prompt], max_new_tokens=8)[0]
    ids = torch.tensor([prompt])
    want = checkpoint.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     pad_token_id=0)[0, len(prompt):].tolist()
    assert printed == want
    timing = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\[load \d+ ms; prefill 3 tokens in [\d.]+ ms, time to first token [\d.]+ ms; "
                        r"decode 7 tokens in [\d.]+ ms \([\d.]+ tok/s\)\]", timing), result.stderr


TIMING = (r"prefill \d+ tokens in [\d.]+ ms, time to first token [\d.]+ ms; "
          r"decode \d+ tokens in [\d.]+ ms \([\d.]+ tok/s\)")


def test_run_chat_prints_the_reply_the_python_api_gives(chat_bundle):
    message, system = "Écris une fonction, s'il te plaît: 中文 🙂", "You write Python."
    result = llmc_cli("run", chat_bundle, "--chat", message, "--system", system, "--max-new-tokens", 24)
    assert result.returncode == 0, result.stderr
    messages = [{"role": "system", "content": system}, {"role": "user", "content": message}]
    reply = llmc.load(chat_bundle).chat(messages, max_new_tokens=24)
    assert reply and result.stdout == reply + "\n"
    assert re.fullmatch(rf"\[load \d+ ms; {TIMING}\]", result.stderr.strip().splitlines()[-1]), result.stderr


def test_chat_reads_turns_until_exit_and_keeps_the_history(chat_bundle):
    """Two turns from stdin, then /exit (what follows is not read); the replies are those of a Python-API
    Conversation, whose second prompt holds the first reply (tests/runtime/test_chat.py)."""
    from llmc.runtime.chat import Conversation

    result = subprocess.run([sys.executable, "-m", "llmc.cli", "chat", str(chat_bundle), "--max-new-tokens", "16"],
                            input="def main(\n\nand then?\n/exit\nnot read\n", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    conversation = Conversation(llmc.load(chat_bundle))
    replies = [conversation.send(text, max_new_tokens=16) for text in ("def main(", "and then?")]
    assert result.stdout == "".join(reply + "\n" for reply in replies)
    timings = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(timings) == 2 and timings[0].startswith("[load ") and re.fullmatch(rf"\[{TIMING}\]", timings[1])
    ended = subprocess.run([sys.executable, "-m", "llmc.cli", "chat", str(chat_bundle), "--max-new-tokens", "4"],
                           input="hello\n", capture_output=True, text=True, timeout=300)  # end of input quits too
    assert ended.returncode == 0 and ended.stdout.endswith("\n") and "Traceback" not in ended.stderr, ended.stderr


# Slows each streamed token, so that SIGINT lands while a reply is being generated.
SLOW_CHAT = """
import sys, time
from llmc.runtime import chat
from llmc.cli import main
add = chat.IncrementalDetokenizer.add
def slow_add(self, token_id):
    time.sleep(0.1)
    return add(self, token_id)
chat.IncrementalDetokenizer.add = slow_add
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(chat_bundle):
    process = subprocess.Popen([sys.executable, "-c", SLOW_CHAT, "chat", str(chat_bundle), "--max-new-tokens", "30"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        process.stdin.write("import os\n")
        process.stdin.flush()
        first = process.stdout.read(1)  # the reply has begun
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate("and then?\n/exit\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stdout + stderr
    assert first and stdout.endswith("\n") and "Traceback" not in stderr, stderr
    # The stopped reply prints no timing; the next one, complete, does.
    notes = [line for line in stderr.splitlines() if line.startswith("[")]
    assert len(notes) == 2 and notes[0] == "[reply stopped]" and notes[1].startswith("[load "), stderr


def test_chat_needs_a_chat_template(no_template_bundle, bundle):
    assert_user_error(llmc_cli("run", no_template_bundle, "--chat", "hello"), "no chat template", "--prompt")
    assert_user_error(llmc_cli("chat", no_template_bundle), "no chat template", "--prompt")
    assert_user_error(llmc_cli("run", bundle, "--chat", "hello"), "no tokenizer", "--token-ids")
    assert_user_error(llmc_cli("run", bundle, "--chat", "3 5", "--token-ids"), "--token-ids goes with --prompt")
    assert_user_error(llmc_cli("run", bundle, "--prompt", "3 5", "--token-ids", "--system", "x"), "--system")


def test_targets_lists_every_target_through_the_console_script():
    script = Path(sys.executable).with_name("llmc")
    assert script.is_file(), f"the llmc console script is not installed next to {sys.executable}"
    result = subprocess.run([str(script), "targets"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:] if line and not line.startswith("*")]
    assert listed == list(TARGETS)
    assert re.search(r"^h100\s+sm_90\s", result.stdout, re.MULTILINE)


def test_passes_accepts_a_dash_name_as_its_value(checkpoint, tmp_path):
    """`--passes -fuse_rms_norm` as DESIGN.md spells it; argparse alone would read the value as an option.
    An unknown -name fails before anything is traced, so this costs no compile."""
    result = llmc_cli("compile", checkpoint.path, "--target", "cpu", "-o", tmp_path / "b.llmc",
                      "--passes", "-fuse_everything")
    assert_user_error(result, "unknown pass fuse_everything")


# --- user errors: one line, exit code 1 -------------------------------------------------------------------------

def test_unknown_model_name(tmp_path):
    result = llmc_cli("compile", "qwen9-77b", "--target", "cpu", "-o", tmp_path / "b.llmc")
    assert_user_error(result, "unknown model 'qwen9-77b'", "qwen3-8b")
    assert not (tmp_path / "b.llmc").exists()


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    result = llmc_cli("compile", tmp_path / "notes", "--target", "cpu", "-o", tmp_path / "b.llmc")
    assert_user_error(result, str(tmp_path / "notes"), "not a checkpoint directory")


def test_checkpoint_missing_a_tensor_names_it(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint.path, broken)
    tensors = load_file(broken / "model.safetensors")
    layer_names = sorted(n for n in tensors if ".layers." in n)
    removed = layer_names[torch.randint(len(layer_names), ()).item()]
    del tensors[removed]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = llmc_cli("compile", broken, "--target", "cpu", "-o", tmp_path / "b.llmc")
    assert_user_error(result, f"missing tensor {removed}")


def test_corrupt_safetensors_in_a_checkpoint(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint.path, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    result = llmc_cli("compile", broken, "--target", "cpu", "-o", tmp_path / "b.llmc")
    assert_user_error(result, "model.safetensors is not a valid safetensors file", "re-export the checkpoint")


def test_unknown_target_lists_the_targets(checkpoint, tmp_path):
    result = llmc_cli("compile", checkpoint.path, "--target", "tpu9", "-o", tmp_path / "b.llmc")
    assert_user_error(result, "unknown target 'tpu9'", ", ".join(TARGETS))


def test_unknown_pass_lists_the_passes(checkpoint, tmp_path):
    result = llmc_cli("compile", checkpoint.path, "--target", "cpu", "-o", tmp_path / "b.llmc",
                      "--passes", "fuse_rms_norm,fuse_everything")
    assert_user_error(result, "unknown pass fuse_everything", "strip_asserts", "fuse_rms_norm")


def test_bfloat16_on_t4_is_refused(checkpoint, tmp_path):
    result = llmc_cli("compile", checkpoint.path, "--target", "t4", "--dtype", "bfloat16", "-o", tmp_path / "b.llmc")
    assert_user_error(result, "t4 (sm_75) has no bfloat16", "--dtype float16")


def test_max_seq_len_below_one_is_refused(checkpoint, tmp_path):
    result = llmc_cli("compile", checkpoint.path, "--target", "cpu", "--max-seq-len", 0, "-o", tmp_path / "b.llmc")
    assert_user_error(result, "--max-seq-len must be at least 1")


def test_prompt_over_the_maximum_length_says_how_to_fix(bundle):
    prompt = " ".join(map(str, random_prompt(MAX_SEQ_LEN + 4)))
    result = llmc_cli("run", bundle, "--prompt", prompt, "--token-ids", "--max-new-tokens", 8)
    assert_user_error(result, f"has {MAX_SEQ_LEN + 4} tokens", f"maximum sequence length {MAX_SEQ_LEN}",
                      "--max-seq-len")


def test_token_ids_that_are_not_numbers(bundle):
    result = llmc_cli("run", bundle, "--prompt", "3 5 seven", "--token-ids")
    assert_user_error(result, "--token-ids", "'seven'")


# --- bugs: the traceback and a line asking to report it ---------------------------------------------------------

@pytest.mark.parametrize("error", [ValueError, KeyError, RuntimeError])
def test_a_bug_keeps_its_traceback_even_as_a_value_or_key_error(error, monkeypatch, capsys):
    """A ValueError or KeyError from inside llmc is no user's error (those are LlmcErrors): it is not worded as one."""
    def broken():
        raise error("an invariant of llmc's own broke")

    monkeypatch.setattr("llmc.common.targets.format_targets", broken)  # what `llmc targets` calls
    assert main(["targets"]) == BUG_EXIT
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):", captured.err
    assert f"{error.__name__}: " in captured.err and "in broken" in captured.err
    assert lines[-1] == BUG_REPORT == "llmc: this is a bug in llmc; please report it with the traceback above"
    assert "llmc: error:" not in captured.err and captured.out == ""


def test_a_user_error_raised_anywhere_is_one_line(monkeypatch, capsys):
    def refuse():
        raise LlmcError("the host has no such thing; give another")

    monkeypatch.setattr("llmc.common.targets.format_targets", refuse)
    assert main(["targets"]) == 1
    assert capsys.readouterr().err == "llmc: error: the host has no such thing; give another\n"


def test_changed_weights_byte_is_refused_by_verify_and_run(bundle, tmp_path):
    tampered = tmp_path / "tampered.llmc"
    shutil.copytree(bundle, tampered)
    weights = sorted((tampered / "weights").glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 + torch.randint(0, len(data) // 4, ()).item()] ^= 0x01
    weights.write_bytes(bytes(data))
    relative = f"weights/{weights.name}"
    assert_user_error(llmc_cli("verify", tampered), relative, "sha256 mismatch")
    assert_user_error(llmc_cli("run", tampered, "--prompt", "3 5 7", "--token-ids"), relative, "sha256 mismatch")


def test_gpu_bundle_is_refused_on_this_cpu_host(checkpoint, tmp_path):
    assert not torch.cuda.is_available(), "this test runs on a host without CUDA"
    out = tmp_path / "h100.llmc"
    compiled = llmc_cli("compile", checkpoint.path, "--target", "h100", "-o", out)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"  # h100's default
    result = llmc_cli("run", out, "--prompt", "3 5 7", "--token-ids")
    assert_user_error(result, "h100 (sm_90)", "no CUDA GPU (cpu)", "--target cpu")


def test_run_on_a_path_that_is_not_a_bundle(checkpoint, tmp_path):
    assert_user_error(llmc_cli("run", checkpoint.path, "--prompt", "3", "--token-ids"), "not an llmc bundle")
    assert_user_error(llmc_cli("run", tmp_path / "absent.llmc", "--prompt", "3", "--token-ids"), "does not exist")


def test_bundle_without_weights_is_refused_by_run(checkpoint, tmp_path):
    """Compiling qwen3-0.6b from its registry config takes ~100 s on this machine; --no-weights takes the same
    path (config -> meta model -> bundle without weights) at the tiny checkpoint's size."""
    out = tmp_path / "config-only.llmc"
    compiled = llmc_cli("compile", checkpoint.path, "--target", "cpu", "--no-weights", "-o", out)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert not json.loads((out / "manifest.json").read_text())["has_weights"]
    assert not (out / "weights").exists()
    inspected = llmc_cli("inspect", out)
    assert inspected.returncode == 0 and re.search(r"^weights\s+not bound$", inspected.stdout, re.MULTILINE)
    assert_user_error(llmc_cli("run", out, "--prompt", "3 5 7", "--token-ids"), "compiled without weights")


# --- interruption and file format -------------------------------------------------------------------------------

# Slows the weight writer so that SIGINT lands while tensors are being written, as it would for a large model.
SLOW_WRITER = """
import sys, time
from llmc.compiler import artifact
from llmc.cli import main
add = artifact._ShardWriter.add
def slow_add(self, name, tensor):
    time.sleep(0.2)
    return add(self, name, tensor)
artifact._ShardWriter.add = slow_add
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_while_writing_leaves_no_bundle(checkpoint, tmp_path):
    out = tmp_path / "interrupted.llmc"
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "compile", str(checkpoint.path), "--target",
                                "cpu", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any((staging / "weights").is_dir() for staging in tmp_path.glob(".interrupted.llmc.partial-*")):
            assert process.poll() is None, f"compile ended before writing weights: {process.communicate()}"
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1] == "llmc: interrupted"
    assert "Traceback" not in stdout + stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "a temporary directory was left behind"


PICKLE_PROTOCOLS = range(2, 6)  # protocol 2+ streams start with b"\x80" and the protocol number


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def test_bundle_holds_no_pickle(bundle):
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not data.startswith(b"PK\x03\x04"), f"{path} is a zip archive (torch.save format)"
        assert b"data.pkl" not in data, f"{path} holds a torch.save data.pkl entry"
        assert path.suffix not in (".pt", ".pth", ".bin", ".pkl", ".pickle"), path
        if path.suffix == ".safetensors":
            header = safetensors_header(path)  # a real safetensors file: JSON header, then raw tensor bytes
            assert all(set(v) == {"dtype", "shape", "data_offsets"} for k, v in header.items() if k != "__metadata__")
        else:
            assert not (data[:1] == b"\x80" and data[1] in PICKLE_PROTOCOLS), f"{path} is a pickle"
        if path.suffix == ".json":
            json.loads(data)


def test_eval_quant_and_build_engine_user_errors_are_one_line(bundle, checkpoint, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 20, encoding="utf-8")
    assert_user_error(llmc_cli("eval", bundle, "--perplexity", text), "no tokenizer to read the perplexity file")
    assert_user_error(llmc_cli("eval", bundle, "--perplexity", tmp_path / "missing.txt"), "missing.txt")
    out = tmp_path / "q.llmc"
    assert_user_error(llmc_cli("compile", checkpoint.path, "--target", "cpu", "-o", out, "--quant", "int3"),
                      "unknown quantization scheme 'int3'")
    assert_user_error(llmc_cli("compile", checkpoint.path, "--target", "cpu", "-o", out, "--quant", "fp8",
                               "--check-passes"), "judge them with llmc eval")
    assert_user_error(llmc_cli("compile", checkpoint.path, "--target", "cpu", "-o", out, "--quant", "int8"),
                      "--calibration FILE")
    assert not out.exists()
    assert_user_error(llmc_cli("build-engine", bundle), "TensorRT")
