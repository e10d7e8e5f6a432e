"""Chat: templates render and tokenize exactly as transformers' apply_chat_template; the incremental detokenizer
streams exactly tokenizer.decode's text; Engine.chat and Conversation on the embedded model compiled with a
ChatML template (tests/conftest.py: chat_bundle)."""
import bisect
import dataclasses
import json
import random

import pytest
import torch
from tokenizers import Tokenizer

import llmc
from llmc.runtime.chat import ChatTemplate, Conversation, IncrementalDetokenizer
from llmc.runtime.engine import PromptTooLongError
from tests.conftest import CHATML_TEMPLATE, EMBEDDED_DIR

# Loop controls, namespace(), raise_exception, tojson, strftime_now, the special tokens as variables, and block tags
# on indented lines of their own: trim_blocks and lstrip_blocks decide the whitespace of what it renders.
FANCY_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system=none, turns=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% set ns.system = message.content %}
        {% continue %}
    {% endif %}
    {% if message.role not in ('user', 'assistant') %}
        {{ raise_exception('roles must be user or assistant, not ' + message.role) }}
    {% endif %}
    {% if message.content == '/end' %}
        {% break %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|{{ message.role }}|> {{ message.content | trim }}{{ eos_token }}
    {% if message.meta is defined %}
  meta: {{ message.meta | tojson }}
    {% endif %}
{% endfor %}
{% if ns.system is not none %}
[system {{ ns.system | tojson }} after {{ ns.turns }} turns, {{ strftime_now('%Y') }}]
{% endif %}
{% if add_generation_prompt %}
    <|assistant|>
{% endif %}"""

# Text the byte-level BPE splits inside characters: 2-, 3- and 4-byte UTF-8 among ASCII.
ALPHABET = list("abcdefgh xyz\n\t.,:()_=") + list("éüßñ") + list("中文字节") + ["🙂", "🚀", "𝄞"]


def random_text(rng: random.Random, low: int = 1, high: int = 40) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))


def random_chats(rng: random.Random) -> list[list[dict]]:
    """One user message; a system message and several turns; a chat whose system message comes later (the ChatML
    template then adds its default one); each with fresh random text, non-ASCII included."""
    def turns(n):
        return [{"role": ("user", "assistant")[i % 2], "content": random_text(rng)} for i in range(n)]

    return [turns(1), [{"role": "system", "content": random_text(rng)}, *turns(5)],
            [*turns(2), {"role": "system", "content": random_text(rng)}, *turns(1)]]


def write_tokenizer_dir(path, template, where="config", special=False):
    """The embedded model's tokenizer.json and a tokenizer_config.json, with `template` in the config ("config"),
    as a named list in it ("list"), or in chat_template.jinja ("file"). special: <|im_start|> and <|im_end|> are
    added special tokens (the end of turn is <|im_end|>) instead of plain text."""
    path.mkdir()
    tokenizer = Tokenizer.from_file(str(EMBEDDED_DIR / "tokenizer.json"))
    config = json.loads((EMBEDDED_DIR / "tokenizer_config.json").read_text())
    # A special token in the form transformers serialises AddedToken objects.
    config["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    if special:
        tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        config["eos_token"] = "<|im_end|>"
    tokenizer.save(str(path / "tokenizer.json"))
    if where == "file":
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif where == "list":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                   {"name": "default", "template": template}]
    elif template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def transformers_ids(hf_tokenizer, messages) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("template, where, special", [
    (CHATML_TEMPLATE, "config", False), (CHATML_TEMPLATE, "file", True), (FANCY_TEMPLATE, "config", True),
    (FANCY_TEMPLATE, "list", False), (FANCY_TEMPLATE, "file", False)])
def test_render_and_ids_match_transformers(tmp_path, template, where, special):
    from transformers import AutoTokenizer

    directory = write_tokenizer_dir(tmp_path / "tok", template, where, special)
    ours, theirs = ChatTemplate.from_dir(directory), AutoTokenizer.from_pretrained(directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    rng = random.Random()
    chats = random_chats(rng)
    if template is FANCY_TEMPLATE:  # tojson of non-ASCII and HTML characters; a break before the last turns
        chats[0][0]["meta"] = {"html": "<b>&'</b>", "text": random_text(rng), "n": rng.randint(0, 9)}
        chats[1][3]["content"] = "/end"
    for messages in chats:
        text = ours.render(messages)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.encode(tokenizer, messages) == transformers_ids(theirs, messages)
        assert ours.render(messages, add_generation_prompt=False) == theirs.apply_chat_template(messages,
                                                                                                tokenize=False)
    if special:  # the template's control tokens are single special tokens, not text
        ids = ours.encode(tokenizer, chats[1])
        # ChatML ends each of the system message and 5 turns; the fancy template breaks after 2 turns.
        assert ids.count(tokenizer.token_to_id("<|im_end|>")) == (6 if template is CHATML_TEMPLATE else 2)
    if template is FANCY_TEMPLATE:
        assert "<b>&'</b>" in ours.render(chats[0])  # jinja2's own tojson would write \\u003cb\\u003e
        assert chats[1][4]["content"] not in ours.render(chats[1])
        with pytest.raises(ValueError, match="roles must be user or assistant, not tool"):
            ours.render([{"role": "tool", "content": "x"}])


def test_template_sources_and_special_tokens(tmp_path):
    # chat_template.jinja wins over the config's entry, as in transformers.
    both = write_tokenizer_dir(tmp_path / "both", "{{ 'from the config' }}")
    (both / "chat_template.jinja").write_text("{{ bos_token }}{{ eos_token }}{{ pad_token }} from the file")
    template = ChatTemplate.from_dir(both)
    assert template.render([{"role": "user", "content": "x"}]) == "<|endoftext|>" * 3 + " from the file"
    assert template.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                       "pad_token": "<|endoftext|>"}
    assert ChatTemplate.from_dir(write_tokenizer_dir(tmp_path / "none", None)) is None
    unnamed = write_tokenizer_dir(tmp_path / "unnamed", None)
    config = json.loads((unnamed / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}]
    (unnamed / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="none named 'default'"):
        ChatTemplate.from_dir(unnamed)
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ValueError, match="at least one message"):
        template.render([])
    # Templates are untrusted: the sandbox refuses internals.
    with pytest.raises(ValueError, match="unsafe|cannot set"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="cannot set"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": "x"}])


# --- the incremental detokenizer ---------------------------------------------------------------------------------

class CountingTokenizer:
    """A tokenizer whose decode calls are recorded (how many ids each decoded)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.windows = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.windows.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(tokenizer, ids) -> list[str]:
    """The pieces an IncrementalDetokenizer gives for ids; after each token, what it has given is all of the
    text so far whenever that text is complete (does not end in U+FFFD)."""
    detokenizer, pieces = IncrementalDetokenizer(tokenizer), []
    for n, token in enumerate(ids, 1):
        pieces.append(detokenizer.add(token))
        so_far = tokenizer.decode(ids[:n])
        if not so_far.endswith("\ufffd"):
            assert "".join(pieces) == so_far, f"text held back after token {n}"
    pieces.append(detokenizer.finish())
    return pieces


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(EMBEDDED_DIR / "tokenizer.json"))


def test_detokenizer_streams_the_decoded_text_of_multibyte_text(tokenizer):
    rng = random.Random()
    for _ in range(20):
        text = random_text(rng, 50, 200)
        ids = tokenizer.encode(text).ids
        pieces = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces), "half a character was printed"
    ascii_ids = tokenizer.encode("def main(argv):\n    return len(argv)\n").ids
    assert all(stream(tokenizer, ascii_ids)[:-1]), "an ASCII token was held back"


def test_detokenizer_matches_decode_on_random_ids(tokenizer):
    vocab = tokenizer.get_vocab_size()
    for _ in range(20):
        ids = torch.randint(0, vocab, (int(torch.randint(1, 120, ())),)).tolist()  # 0 is <|endoftext|>: special
        ids[int(torch.randint(0, len(ids), ()))] = 0
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_detokenizer_decodes_a_window_not_the_whole_text(tokenizer):
    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)
    ids = tokenizer.encode(random_text(random.Random(), 400, 400)).ids
    assert len(ids) > 200
    text = "".join(detokenizer.add(token) for token in ids) + detokenizer.finish()
    assert text == tokenizer.decode(ids)
    # Each decode covers the piece handed out last and the tokens since (a character is at most 4 byte tokens
    # here), whatever the length of the text so far.
    assert max(counting.windows) <= 8, max(counting.windows)
    assert len(counting.windows) <= 2 * len(ids) + 2


# --- Engine.chat and Conversation on a compiled bundle -------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(chat_bundle):
    return llmc.load(chat_bundle)


def test_chat_prompt_is_transformers_apply_chat_template_of_the_bundles_tokenizer(engine):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(engine.bundle.tokenizer_dir)
    for messages in random_chats(random.Random()):
        assert engine.chat_prompt(messages) == transformers_ids(theirs, messages)


def test_chat_reply_is_the_decoded_generation_streamed_in_pieces(engine):
    messages = [{"role": "system", "content": "Answer in Python."},
                {"role": "user", "content": random_text(random.Random(), 5, 30)}]
    pieces = []
    reply = engine.chat(messages, max_new_tokens=40, on_text=pieces.append)
    tokens = engine.generate([engine.chat_prompt(messages)], max_new_tokens=40)[0]
    assert reply == "".join(pieces) == engine.decode([t for t in tokens if t not in engine.eos_token_ids])
    assert len(pieces) > 5 and all(pieces)
    sampled = engine.chat(messages, max_new_tokens=20, temperature=0.9, seed=3)
    assert engine.chat(messages, max_new_tokens=20, temperature=0.9, seed=3) == sampled
    others = [engine.chat(messages, max_new_tokens=20, temperature=0.9, seed=s) for s in range(4, 8)]
    assert any(o != sampled for o in others), "different seeds never changed the reply"


def test_chat_replies_within_the_bundles_context(engine):
    rng = random.Random()
    words = [random_text(rng, 3, 8).replace(" ", "") or "x" for _ in range(400)]

    def messages(n):
        return [{"role": "user", "content": " ".join(words[:n])}]

    with pytest.raises(PromptTooLongError, match="no room for a reply"):
        engine.chat(messages(len(words)))
    # The longest message that leaves room: the reply ends at the end of the context, without an error.
    n = bisect.bisect_left(range(len(words) + 1), True,
                           key=lambda n: len(engine.chat_prompt(messages(n))) >= engine.max_seq_len) - 1
    room = engine.max_seq_len - len(engine.chat_prompt(messages(n)))
    engine.chat(messages(n), max_new_tokens=100)
    assert 1 <= room < 100 and engine.timing.decode_tokens <= room - 1, (room, engine.timing)


def test_conversation_keeps_the_history(engine, monkeypatch):
    conversation = Conversation(engine, system="You write Python.")
    first = conversation.send("def hello(", max_new_tokens=12)
    assert first, "the model ended its turn at once: pick another message"
    prompts = []
    generate = engine.generate

    def spy(batch, *args, **kwargs):
        prompts.extend(batch)
        return generate(batch, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    second = conversation.send("and again", max_new_tokens=12)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[2]["content"] == first and conversation.messages[4]["content"] == second
    assert prompts == [engine.chat_prompt(conversation.messages[:4])]
    assert first in engine.decode(prompts[0])


def test_a_stopped_reply_stays_as_far_as_it_got(engine):
    conversation = Conversation(engine)
    printed = []

    def interrupt_after_three(piece):
        printed.append(piece)
        if len(printed) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conversation.send("import os", max_new_tokens=100, on_text=interrupt_after_three)
    assert conversation.messages[-1] == {"role": "assistant", "content": "".join(printed)}
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks
    conversation.send("go on", max_new_tokens=4)
    assert len(conversation.messages) == 4
    # A turn that fails (here: a prompt too long for the bundle) leaves no trace.
    with pytest.raises(PromptTooLongError):
        conversation.send("x " * 2000)
    assert len(conversation.messages) == 4


def test_a_bundle_without_a_template_cannot_chat(no_template_bundle):
    plain = llmc.load(no_template_bundle)
    with pytest.raises(ValueError, match=r"no chat template.*--prompt"):
        plain.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"no tokenizer.*--token-ids"):
        Conversation(dataclasses.replace(plain, tokenizer=None))
