"""Model configuration: one dataclass for the Qwen3 and Llama-3 dense decoder family.

Reads and writes config.json both as the Hub publishes it (rope_theta, rope_scaling, torch_dtype) and as
transformers 5 writes it (rope_parameters, dtype).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .rope import ROPE_TYPES

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class ModelConfig:
    family: str  # "qwen3" | "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3" | "yarn", ...}; None = default
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    attention_bias: bool = False  # Llama's flag: bias on q, k, v and o (Qwen2 has q, k, v bias always, o never)
    dtype: str = "bfloat16"  # the dtype the checkpoint is published in
    extra: dict = field(default_factory=dict)  # untouched keys of config.json, kept for round trips

    def __post_init__(self):
        if self.family not in ARCHITECTURES:
            raise ValueError(f"unknown model family {self.family!r}; known: {', '.join(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (llmc supports {', '.join(ROPE_TYPES)})")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.family == "qwen2"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def same_model(self, other: ModelConfig) -> bool:
        """Same architecture and shapes; the dtype a checkpoint happens to be stored in does not count."""
        return dataclasses.replace(self, dtype=other.dtype) == other

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """From a Hugging Face config.json dict (Hub or transformers-5 spelling)."""
        model_type = hf.get("model_type", "")
        family = model_type if model_type in ARCHITECTURES else None
        if family is None:
            raise ValueError(f"unsupported model_type {model_type!r} (llmc supports {', '.join(ARCHITECTURES)})")
        # Variants the model definition does not implement: refusing beats loading a silently different model.
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (llmc supports silu)")
        for flag in ("mlp_bias", "use_sliding_window"):
            if hf.get(flag):
                raise ValueError(f"unsupported {flag}=true (llmc implements dense full attention without MLP bias)")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or None
        if scaling:
            rope.update(scaling)
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope.pop("type", None)
        scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        heads = hf["num_attention_heads"]
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            attention_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
            dtype=str(dtype).removeprefix("torch."),
        )

    def to_hf(self) -> dict:
        """A config.json transformers (4.5x and 5.x) loads, in the Hub spelling."""
        out = {
            "architectures": [ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "torch_dtype": self.dtype,
        }
        return out

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h
