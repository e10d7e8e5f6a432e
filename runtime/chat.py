"""Chat: a model's own chat template rendered as transformers renders it, and text streamed token by token.

`ChatTemplate.from_dir(tokenizer_dir)` reads the template (`chat_template.jinja`, else tokenizer_config.json's
`chat_template`) and the special tokens the template may name (`bos_token`, `eos_token`, ...). `render(messages)`
gives the text `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` gives, in the
same jinja2 sandbox with the same filters and globals (transformers' `_compile_jinja_template` and
`render_jinja_template` in transformers/utils/chat_template_utils.py); `encode` tokenizes it as apply_chat_template
does, without adding special tokens: the template writes those itself.

`IncrementalDetokenizer` turns token ids into printable text one token at a time; `stream_text` generates with
it (Engine.chat's streaming), and `Conversation` keeps a multi-turn chat's history (llmc chat).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from llmc.common.errors import UsageError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# The special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of an incomplete UTF-8 sequence


class ChatTemplate:
    """A chat template and the variables transformers renders it with."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _compile(source)
        except jinja2.TemplateError as e:
            raise UsageError(f"the chat template does not compile: {e}") from None

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of a tokenizer folder, or None when it has none."""
        directory = Path(directory)
        config = _read_json(directory / CONFIG_FILE)
        if (directory / TEMPLATE_FILE).is_file():
            # As in transformers: a template file takes priority over the config's entry.
            source = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
                named = {entry["name"]: entry["template"] for entry in source}
                if "default" not in named:
                    raise UsageError(f"{directory / CONFIG_FILE} has chat templates {sorted(named)} but none named "
                                     f"'default'")
                source = named["default"]
        if not source:
            return None
        return cls(source, special_tokens(directory, config))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text for messages ([{"role": "user", "content": "..."}, ...]); with add_generation_prompt it
        ends where the assistant's reply begins. variables: extra template variables (tools, documents, ...)."""
        if not messages:
            raise UsageError("a chat needs at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise UsageError(f"message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        # transformers drops None values (content=None from OpenAI-style clients), which templates handle badly.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self.special_tokens, **variables}
        try:
            return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise UsageError(f"the chat template refused the messages: {e}") from None

    def encode(self, tokenizer, messages: list[dict], **variables) -> list[int]:
        """render(messages) as token ids of `tokenizer` (a tokenizers.Tokenizer)."""
        return tokenizer.encode(self.render(messages, **variables), add_special_tokens=False).ids


def special_tokens(directory: Path, config: dict) -> dict[str, str]:
    """The named special tokens of a tokenizer folder whose tokenizer_config.json holds config, as strings, under
    the names templates use."""
    # Model-specific names (image_token, ...) join the standard ones when given as plain strings, as in transformers.
    found = {k: v for k, v in config.items()
             if k in SPECIAL_TOKEN_NAMES or (k.endswith("_token") and isinstance(v, str))}
    if "added_tokens_decoder" not in config:  # the legacy file counts only for configs that predate that key
        legacy = _read_json(directory / LEGACY_SPECIAL_TOKENS_FILE)
        found.update({k: v for k, v in legacy.items() if k in SPECIAL_TOKEN_NAMES})
    tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in found.items()}
    return {k: v for k, v in tokens.items() if isinstance(v, str)}


class IncrementalDetokenizer:
    """Token ids in, printable text out, one token at a time; special tokens print nothing.

    The pieces joined equal `tokenizer.decode(all ids)`. Each token decodes a window, not the whole text (as in
    vLLM and TGI): the tokens not yet handed out as text (from `read`) after those of the last piece handed out
    (from `prefix`), whose text is known; the new text is what the window's text adds to the known text. Context
    before the new tokens matters to decoders that treat a first token apart (SentencePiece's leading space).
    Text is held back while it ends in U+FFFD, which is what decoding gives for the first bytes of a multi-byte
    character that the next token completes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: a token boundary the text before which was complete when handed out
        self.read = 0  # tokens before this have been handed out as text

    def add(self, token_id: int) -> str:
        """The text token_id completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """What is still held back, U+FFFD included: the end of a reply that stopped mid-character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        known = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix, len(self.ids))
        if len(text) <= len(known) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(known):]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""


class Conversation:
    """A multi-turn chat with an engine: the messages so far, each reply joining them."""

    def __init__(self, engine, system: str | None = None):
        engine.chat_template  # raises here, not at the first message, when the bundle cannot chat
        self.engine = engine
        self.messages = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, on_text: Callable[[str], None] | None = None, **sampling) -> str:
        """The reply to the user's text (sampling: Engine.chat's options), streamed to on_text. A reply stopped
        by Ctrl-C stays in the conversation as far as it got; a turn that failed otherwise leaves no trace."""
        self.messages.append({"role": "user", "content": text})
        pieces = []

        def collect(piece: str) -> None:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

        try:
            self.engine.chat(self.messages, on_text=collect, **sampling)
        except KeyboardInterrupt:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            raise
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        return self.messages[-1]["content"]


def stream_text(engine, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float,
                seed: int | None, on_text: Callable[[str], None] | None) -> str:
    """engine.generate of one prompt as text, handed to on_text in printable pieces as the tokens come; the end
    of sequence token that stops it is not part of the text. Returns the pieces joined."""
    detokenizer, pieces = IncrementalDetokenizer(engine.tokenizer), []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    def on_token(_: int, token: int) -> None:
        # Not only special tokens are skipped: an end of turn that the tokenizer does not mark special is no text.
        if token not in engine.eos_token_ids:
            emit(detokenizer.add(token))

    engine.generate([prompt], max_new_tokens, temperature, top_p, seed, on_token=on_token)
    emit(detokenizer.finish())
    return "".join(pieces)


def bundle_template(engine) -> ChatTemplate:
    """An engine's chat template, from its bundle's tokenizer folder; ValueError when it has none."""
    if engine.tokenizer is None:
        raise UsageError(f"{engine.bundle.path} has no tokenizer, so it cannot chat; generate from token ids "
                         f"instead (llmc run --prompt IDS --token-ids)")
    template = ChatTemplate.from_dir(engine.bundle.tokenizer_dir)
    if template is None:
        raise UsageError(f"{engine.bundle.path} has no chat template (its model's tokenizer defines none); "
                         f"generate from plain text instead (llmc run --prompt TEXT)")
    return template


def reply(engine, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
          on_text: Callable[[str], None] | None) -> str:
    """Engine.chat: the reply ends at the model's end of turn (an eos_token_ids token, not part of the text), after
    max_new_tokens, or where the conversation reaches the bundle's max_seq_len. on_text(piece) receives it as it is
    generated, in pieces that are whole characters; joined, they are the reply."""
    from llmc.runtime.engine import PromptTooLongError  # engine imports this module

    prompt = engine.chat_prompt(messages)
    room = engine.max_seq_len - len(prompt)
    if room < 1:
        raise PromptTooLongError(f"the conversation has {len(prompt)} tokens, which leaves no room for a reply "
                                 f"within the bundle's maximum sequence length {engine.max_seq_len} (start a new "
                                 f"chat, or recompile with a larger --max-seq-len)")
    return stream_text(engine, prompt, min(max_new_tokens, room), temperature, top_p, seed, on_text)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore names: templates come from the Hub, untrusted, and transformers
    refuses them for that reason (they reach CPython internals)."""

    def __init__(*args, **kwargs):  # jinja2's own signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _Dict:
    """dict() for templates without the dict type itself (no type-hackery from an untrusted template)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML; transformers' writes plain JSON, and so must we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # The environment transformers renders chat templates in; its whitespace settings change the output.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)
