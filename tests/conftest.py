"""Shared fixtures: tiny Qwen3 / Llama checkpoints written by transformers' save_pretrained (the reference), and
tiny random models of our own.

`tiny_hf_checkpoint(family, tied=..., dtype=..., rope=..., max_shard_size=..., spelling=..., **config)` writes a
checkpoint directory under the test's tmp_path and returns a `TinyCheckpoint(path, model)`: `model` is the
transformers model (eval mode) holding exactly the weights written, in the stored dtype. Every parameter,
norms included, is freshly random, so a swapped or skipped weight changes the logits.

`tiny_model(family, **config)` is our `Transformer` at the same tiny shape with fresh random weights (eval mode).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# A fresh compile cache per test session: dynamo keeps state across processes there (automatic-dynamic profiles),
# and a cache left by earlier runs made the torch.compile backend fail in a later run (a NameError inside the nested
# export of a pattern trace; see the issue note). Set before torch compiles anything.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="llmc-tests-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from llmc.models import ModelConfig, Transformer

# The tests' models are tiny: a second thread buys nothing, and when other processes share the cores OpenMP's
# spinning threads slow each op down a hundredfold.
torch.set_num_threads(1)

# Odd sizes on purpose: nothing divides evenly by accident, and kv heads < heads exercises GQA.
# head_dim is explicit: Qwen3Config would otherwise default it to 128.
TINY_SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


@dataclass
class TinyCheckpoint:
    path: Path
    model: torch.nn.Module  # transformers *ForCausalLM with the written weights, in the stored dtype


def randomize_parameters_(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Random weights in a range that keeps logits O(1); norm weights around 1 so they matter but stay sane."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + scale * torch.randn_like(param))
            else:
                param.copy_(scale * torch.randn_like(param))


def hub_spelling(hf: dict, scaling_key: str = "rope_type") -> dict:
    """A transformers-5 config.json dict rewritten as the Hub publishes it: rope_theta at the top level,
    rope_scaling (type under `scaling_key`, or null for default RoPE), torch_dtype instead of dtype."""
    out = dict(hf)
    rope = dict(out.pop("rope_parameters", None) or {})
    out["rope_theta"] = rope.pop("rope_theta", 10000.0)
    kind = rope.pop("rope_type", "default")
    out["rope_scaling"] = None if kind == "default" else {**rope, scaling_key: kind}
    out["torch_dtype"] = out.pop("dtype")
    return out


def write_tiny_hf_checkpoint(path: Path, family: str = "qwen3", *, tied: bool = False,
                             dtype: torch.dtype = torch.float32, rope: dict | None = None,
                             max_shard_size: str | None = None, spelling: str = "transformers5",
                             **config) -> TinyCheckpoint:
    """`rope`: rope_parameters beyond the theta (e.g. {"rope_type": "yarn", "factor": 4.0, ...}); `config`:
    overrides of TINY_SHAPE and any other config field; `spelling`: "transformers5", "hub" or "hub-type"
    (the older rope_scaling {"type": ...} key)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_class, model_class = classes[family]
    theta = config.pop("rope_theta", 10000.0)
    hf_config = config_class(**{**TINY_SHAPE, **config}, tie_word_embeddings=tied,
                             rope_parameters={"rope_type": "default", "rope_theta": theta, **(rope or {})})
    model = model_class(hf_config).eval()
    randomize_parameters_(model)
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if spelling != "transformers5":
        config_file = path / "config.json"
        hf = json.loads(config_file.read_text())
        config_file.write_text(json.dumps(hub_spelling(hf, "type" if spelling == "hub-type" else "rope_type")))
    if dtype != torch.float32:
        # Reloaded, as users get it: `.to(bfloat16)` also rounded the RoPE buffer, from_pretrained keeps it fp32.
        model = model_class.from_pretrained(path, dtype=dtype).eval()
    return TinyCheckpoint(path, model)


@pytest.fixture
def tiny_hf_checkpoint(tmp_path):
    """Factory: `tiny_hf_checkpoint("llama", tied=True, ...)`; each call writes a new directory."""
    count = 0

    def make(family: str = "qwen3", **kwargs) -> TinyCheckpoint:
        nonlocal count
        count += 1
        return write_tiny_hf_checkpoint(tmp_path / f"{family}-{count}", family, **kwargs)

    return make


def tiny_config(family: str = "qwen3", **overrides) -> ModelConfig:
    shape = dict(vocab_size=TINY_SHAPE["vocab_size"], hidden_size=TINY_SHAPE["hidden_size"],
                 intermediate_size=TINY_SHAPE["intermediate_size"], num_layers=TINY_SHAPE["num_hidden_layers"],
                 num_heads=TINY_SHAPE["num_attention_heads"], num_kv_heads=TINY_SHAPE["num_key_value_heads"],
                 head_dim=TINY_SHAPE["head_dim"],
                 max_position_embeddings=TINY_SHAPE["max_position_embeddings"], qk_norm=family == "qwen3",
                 dtype="float32")
    return ModelConfig(family=family, **{**shape, **overrides})


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model("llama", num_kv_heads=3, tie_word_embeddings=True)` -> random `Transformer`."""

    def make(family: str = "qwen3", **overrides) -> Transformer:
        model = Transformer(tiny_config(family, **overrides))
        randomize_parameters_(model)
        return model.eval()

    return make


@pytest.fixture(scope="module")
def module_hf_checkpoint(tmp_path_factory):
    """Module-scoped variant of `tiny_hf_checkpoint`, for tests that share one compiled bundle."""

    def make(family: str = "qwen3", **kwargs) -> TinyCheckpoint:
        return write_tiny_hf_checkpoint(tmp_path_factory.mktemp(family), family, **kwargs)

    return make


def greedy_reference(model, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy continuation, ending at its end-of-sequence token as llmc's does."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0)[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    stop = next((i for i, t in enumerate(out) if t in eos), None)
    return out if stop is None else out[: stop + 1]


@pytest.fixture
def hf_greedy():
    """greedy_reference(model, prompt ids, new tokens): what llmc's greedy generation must reproduce."""
    return greedy_reference


@pytest.fixture(scope="module")
def export_each_shape_once():
    """torch.export of the paged step takes ~90% of a tiny compile (3.5 s) and depends only on the model's config,
    dtype and KV block size (it traces a meta-device model; weights are bound afterwards, quantization comes
    later): while this fixture is active, compiles reuse one export per model, each on its own deep copy. For test
    modules that compile one model many ways; the export itself is tested without it (tests/compiler)."""
    from llmc.compiler import trace as trace_module

    real, exported = trace_module.export_step, {}

    def export_step(model, block_size):
        key = (json.dumps(model.config.to_dict(), sort_keys=True), str(next(model.parameters()).dtype), block_size)
        if key not in exported:
            exported[key] = real(model, block_size)
        return copy.deepcopy(exported[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trace_module, "export_step", export_step)
        yield


# ---- Chat: the embedded model with a chat template -------------------------------------------------------------

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "models" / "embedded"
# SmolLM2-Instruct's template (ChatML): a default system message when the chat has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def embedded_model_with_template(path: Path, template: str) -> Path:
    """A copy of the embedded model (llmc-tiny) whose tokenizer_config.json holds a chat template."""
    path.mkdir(parents=True)
    for source in EMBEDDED_DIR.iterdir():
        if source.name != "tokenizer_config.json":
            os.symlink(source, path / source.name)  # 8 MB of weights: linked, not copied
    config = json.loads((EMBEDDED_DIR / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}, indent=2))
    return path


@pytest.fixture(scope="session")
def chat_bundle(tmp_path_factory):
    """The embedded model compiled for the CPU with a ChatML chat template (its end of turn: <|endoftext|>)."""
    root = tmp_path_factory.mktemp("chat")
    model = embedded_model_with_template(root / "llmc-tiny-chat", CHATML_TEMPLATE)
    from llmc.compiler.api import compile

    return compile(model, "cpu", root / "chat.llmc", dtype="float32")


@pytest.fixture(scope="session")
def no_template_bundle(tmp_path_factory):
    """The embedded model compiled as it ships: a tokenizer, but no chat template."""
    from llmc.compiler.api import compile

    return compile("llmc-tiny", "cpu", tmp_path_factory.mktemp("plain") / "plain.llmc", dtype="float32")


# ---- Attention test helpers (tests/codegen: the references and the Triton kernels) ---------------------------------

def dense_attention_float64(q, keys, values, scale, query_positions, key_positions, window):
    """One sequence: q [S, H, D], keys / values [T, Hkv, D] at their positions -> [S, H, D] float64, softmax over
    the keys each query may see (causal, and within `window` if > 0)."""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("shd,thd->hst", q.double(), keys) * scale
    offset = query_positions[:, None] - key_positions[None, :]
    visible = (offset >= 0) & (offset < window) if window > 0 else offset >= 0
    return torch.einsum("hst,thd->shd", scores.masked_fill(~visible, float("-inf")).softmax(-1), values)


def paged_step_inputs(dtype, past_lens, seq, heads=4, kv_heads=2, head_dim=16, block_size=4, device="cpu") -> list:
    """[q, k, v, k_cache, v_cache, block_table, past_lens, scale] of a paged step: each sequence's blocks (room for
    past + seq tokens) at shuffled ids of a cache with spare blocks; spare blocks and the table's padding entries
    hold NaN, so reading past a sequence's blocks shows."""
    needed = [-(-(past + seq) // block_size) for past in past_lens]
    num_blocks = sum(needed) + 2
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(2))
    order = torch.randperm(num_blocks).tolist()
    spare = order[sum(needed):]
    k_cache[spare], v_cache[spare] = float("nan"), float("nan")
    block_table = torch.full((len(past_lens), max(needed) + 1), spare[0])
    for b, count in enumerate(needed):
        block_table[b, :count], order = torch.tensor(order[:count]), order[count:]
    q = torch.randn(len(past_lens), seq, heads, head_dim).to(dtype)
    k, v = (torch.randn(len(past_lens), seq, kv_heads, head_dim).to(dtype) for _ in range(2))
    tensors = [q, k, v, k_cache, v_cache, block_table, torch.tensor(past_lens)]
    return [t.to(device) for t in tensors] + [head_dim ** -0.5]


# ---- a Triton source file: tests/codegen/triton/test_aot.py cross-compiles it, tests/runtime/test_kernels.py ships
# and loads it (the tests name their own specs; the source is one so the two read the same kernels).

TEST_KERNEL_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x * alpha + y, mask=mask)


@triton.jit
def square(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x * x, mask=mask)
'''
SCALED_ADD_SIGNATURE = {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "alpha": "fp32",
                        "BLOCK": "constexpr"}


@pytest.fixture(scope="module")
def kernel_source(tmp_path_factory) -> Path:
    """TEST_KERNEL_SOURCE as a file (what a KernelSpec names)."""
    path = tmp_path_factory.mktemp("kernels") / "kernels.py"
    path.write_text(TEST_KERNEL_SOURCE)
    return path
