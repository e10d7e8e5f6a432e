"""Reads GGUF files (llama.cpp's format) with the `gguf` package: model config, tokenizer and weights.

- Config from the metadata of the `llama`, `qwen2` and `qwen3` architectures (`{arch}.block_count`, ...).
- Tokenizer: the byte-level BPE (`tokenizer.ggml.model = gpt2`) that Llama 3, Qwen and SmolLM ship, rebuilt as a
  `tokenizers` tokenizer from the vocabulary, merges, token types and llama.cpp's pre-tokenizer name
  (`tokenizer.ggml.pre`: the text splits its merges were learned on), plus the chat template and special tokens,
  written as the files a Hugging Face checkpoint has (tokenizer.json, tokenizer_config.json, generation_config.json).
- Weights: streamed one tensor at a time from the memory-mapped file and dequantized by `gguf`'s own dequantizer
  (so the values are exactly what llama.cpp's reference gives). llama.cpp's converter permutes the rows of the
  llama architecture's q and k projections (interleaved RoPE pairs); they are permuted back here. Every block
  format is dequantized to the bundle's dtype, and the report says so: llmc's int4 storage keeps integer zero
  points (Q4_1's minimum is a float) and its int8 keeps one scale per row (Q8_0 has one per 32 weights), and the
  fusion passes fold norm gains into the weights, which would round a kept block format a second time.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .loader import CheckpointError

ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Types whose dequantization gguf implements and the tests cover (F32 .. K-quants).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")

_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names (llama-vocab.cpp) -> the regexes it splits with, in order; a merge table is only
# right on the splits it was learned on. Llama 3's vocabulary also takes a whole split that is a token (ignore_merges).
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), ([_GPT2_SPLIT], False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), ([r"\p{N}", _GPT2_SPLIT], False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"), ([_LLAMA3_SPLIT], True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), ([_QWEN2_SPLIT], False)),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


class GGUFFile:
    """An opened GGUF file: metadata read, tensors memory-mapped (nothing dequantized until streamed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist")
        gguf = _gguf()
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, IndexError, OSError, KeyError, TypeError) as e:  # numpy / struct errors on bad bytes
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({e}); re-download or re-convert it") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:  # the reader maps past a truncated end without complaint
            if t.data.nbytes != t.n_bytes or t.data_offset + t.n_bytes > self.path.stat().st_size:
                raise CheckpointError(f"{self.path} is truncated: tensor {t.name} ends past the end of the file; "
                                      f"re-download it")
        self.architecture = str(self.get("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(f"{self.path}: unsupported GGUF architecture {self.architecture!r} "
                                  f"(llmc reads {', '.join(ARCHITECTURES)})")

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch(self, key: str, default=None):
        return self.get(f"{self.architecture}.{key}", default)

    def require(self, key: str):
        value = self.arch(key)
        if value is None:
            raise CheckpointError(f"{self.path}: missing metadata {self.architecture}.{key}")
        return value

    # -- config ------------------------------------------------------------------------------------------------

    def config(self) -> ModelConfig:
        if "rope_freqs.weight" in self.tensors:
            raise CheckpointError(f"{self.path}: per-dimension RoPE factors (rope_freqs.weight, Llama 3.1-style "
                                  f"scaling) are not supported yet")
        heads = int(self.require("attention.head_count"))
        hidden = int(self.require("embedding_length"))
        vocab = self.arch("vocab_size") or len(self.get("tokenizer.ggml.tokens") or []) or None
        if vocab is None:
            vocab = int(self.tensors["token_embd.weight"].shape[1])
        head_dim = self.arch("attention.key_length") or self.arch("rope.dimension_count") or hidden // heads
        scaling = None
        kind = self.arch("rope.scaling.type")
        if kind not in (None, "none"):
            if kind not in ("linear", "yarn"):
                raise CheckpointError(f"{self.path}: unsupported RoPE scaling {kind!r} (llmc reads linear and yarn)")
            scaling = {"rope_type": kind, "factor": float(self.arch("rope.scaling.factor"))}
            if kind == "yarn":
                scaling["original_max_position_embeddings"] = int(self.arch("rope.scaling.original_context_length"))
        types = self.quant_types()  # the published dtype: a file wholly in F16 or BF16, else float32
        dtype = next((name for t, name in (("BF16", "bfloat16"), ("F16", "float16"))
                      if types.get(t) == sum(types.values())), "float32")
        try:
            return ModelConfig(
                family="llama" if self.architecture == "llama" else self.architecture,
                vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(self.require("feed_forward_length")),
                num_layers=int(self.require("block_count")), num_heads=heads,
                num_kv_heads=int(self.arch("attention.head_count_kv") or heads), head_dim=int(head_dim),
                rope_theta=float(self.arch("rope.freq_base", 10000.0)), rope_scaling=scaling,
                rms_norm_eps=float(self.require("attention.layer_norm_rms_epsilon")),
                max_position_embeddings=int(self.arch("context_length", 4096)),
                tie_word_embeddings="output.weight" not in self.tensors,
                qk_norm=self.architecture == "qwen3",
                attention_bias="blk.0.attn_output.bias" in self.tensors, dtype=dtype)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def quant_types(self) -> Counter:
        """How many tensors of each GGUF type the file holds."""
        return Counter(t.tensor_type.name for t in self.reader.tensors)

    # -- weights -----------------------------------------------------------------------------------------------

    def our_name(self, gguf_name: str) -> str | None:
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        parts = gguf_name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[1].isdigit():
            return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        return None

    def stream_weights(self, cfg: ModelConfig, dtype: torch.dtype, progress: bool = False
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """(our parameter name, tensor in dtype) for every weight, dequantized one tensor at a time. Names, shapes
        and types are all checked before the first tensor is dequantized."""
        from .transformer import Transformer

        with torch.device("meta"):
            params = dict(Transformer(cfg).named_parameters(remove_duplicate=False))
        wanted = {n for n in params if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
        plan = []
        for t in self.reader.tensors:
            name = self.our_name(t.name)
            if name is None or name not in params:
                raise CheckpointError(f"{self.path}: unexpected tensor {t.name} for the {cfg.family} model its "
                                      f"metadata describes")
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which llmc does "
                                      f"not read (supported: {', '.join(SUPPORTED_TYPES)})")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
            if shape != tuple(params[name].shape):
                raise CheckpointError(f"{self.path}: tensor {t.name} has shape {shape}, expected "
                                      f"{tuple(params[name].shape)}")
            plan.append((t, name))
        missing = sorted(wanted - {name for _, name in plan})
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor for {missing[0]} ({len(missing)} in all)")
        from tqdm import tqdm

        def stream():
            for t, name in tqdm(plan, desc="loading weights", unit="tensor", disable=not progress):
                yield name, self._unpermute(name, self.dequantize(t)).to(dtype)

        return stream()

    def dequantize(self, tensor) -> torch.Tensor:
        """float32 values of a tensor in its logical shape (rows first), as gguf's dequantizer gives them."""
        gguf = _gguf()
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # Block formats dequantize into a fresh array; float types come back as a view of the read-only map.
        values = values.astype(np.float32, copy=not values.flags.writeable)
        return torch.from_numpy(values).reshape(shape)

    def _unpermute(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Undoes llama.cpp's convert_hf_to_gguf `permute` of q / k rows (llama architecture only): it regroups
        each head's rows from halves (rotate_half pairs) to interleaved pairs."""
        if self.architecture != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                               "k_proj.bias")):
            return w
        heads = int(self.require("attention.head_count"))
        if ".k_proj." in name:
            heads = int(self.arch("attention.head_count_kv") or heads)
        rest = w.shape[1:]
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)

    def weight_notes(self, dtype: str) -> list[str]:
        """One report line per tensor type: what llmc did with it."""
        why = {"Q4_1": "llmc's int4 keeps integer zero points and Q4_1's minimum is a float",
               "Q4_0": "the fusion passes fold norm gains into the weights, which would round them again",
               "Q8_0": "llmc's int8 keeps one scale per row, Q8_0 one per 32 weights"}
        notes = []
        for kind, count in sorted(self.quant_types().items()):
            if kind in FLOAT_TYPES:
                notes.append(f"{count} {kind} tensors cast to {dtype}")
            else:
                reason = why.get(kind, "llmc has no storage for this block format")
                notes.append(f"{count} {kind} tensors dequantized to {dtype} ({reason})")
        return notes

    # -- tokenizer ---------------------------------------------------------------------------------------------

    def eos_token_ids(self) -> list[int]:
        """End-of-sequence and end-of-turn ids (a chat model stops at either)."""
        ids = [self.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def write_tokenizer(self, directory: Path) -> None:
        """tokenizer.json, tokenizer_config.json (chat template, special tokens) and generation_config.json."""
        tokenizer = self.tokenizer()
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(directory / "tokenizer.json"))
        tokens = self.get("tokenizer.ggml.tokens")
        special = {}
        for name in ("bos", "eos", "unknown", "padding"):
            token_id = self.get(f"tokenizer.ggml.{name}_token_id")
            key = {"unknown": "unk_token", "padding": "pad_token"}.get(name, f"{name}_token")
            special[key] = tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "add_bos_token": bool(self.get("tokenizer.ggml.add_bos_token", False)),
                  "clean_up_tokenization_spaces": False}
        template = self.get("tokenizer.chat_template")
        if template is not None:
            config["chat_template"] = str(template)
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        generation = {"eos_token_id": self.eos_token_ids()}
        bos = self.get("tokenizer.ggml.bos_token_id")
        if bos is not None:
            generation["bos_token_id"] = int(bos)
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))

    def tokenizer(self):
        """The byte-level BPE tokenizer the metadata describes, as a `tokenizers.Tokenizer`."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        model = self.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer model {model!r} is not supported (llmc reads the "
                                  f"byte-level BPE 'gpt2' tokenizers of Llama 3, Qwen and SmolLM)")
        pre = str(self.get("tokenizer.ggml.pre", "default"))
        if pre not in PRE_TOKENIZERS:
            raise CheckpointError(f"{self.path}: pre-tokenizer {pre!r} is not supported (known: "
                                  f"{', '.join(sorted(PRE_TOKENIZERS))})")
        splits, ignore_merges = PRE_TOKENIZERS[pre]
        tokens = [str(t) for t in self.get("tokenizer.ggml.tokens")]
        merges = [tuple(str(m).split(" ", 1)) for m in self.get("tokenizer.ggml.merges") or []]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        types = self.get("tokenizer.ggml.token_type") or []
        tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                                for i, kind in enumerate(types) if kind == CONTROL])
        tok.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                        for i, kind in enumerate(types) if kind == USER_DEFINED])
        bos = self.get("tokenizer.ggml.bos_token_id")
        if self.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            bos_token = tokens[int(bos)]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
                special_tokens=[(bos_token, int(bos))])
        return tok


def is_gguf(path: str | Path) -> bool:
    """A file whose first bytes are GGUF's magic (so a renamed file is still recognised)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
