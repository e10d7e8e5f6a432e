"""Registry names: each builds on the meta device with the published shape, like transformers' own model."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from llmc.models import Transformer
from llmc.models.registry import CONFIGS, EMBEDDED_NAME, PACKAGED, get_config, names

# Parameter counts as published on each model card (billions, embeddings included).
PUBLISHED_PARAMS = {"qwen3-0.6b": 0.596, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19, "qwen3-14b": 14.77,
                    "qwen3-32b": 32.76, "llama3-8b": 8.03, "llama3.2-1b": 1.24}
HF_CLASSES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def test_every_registry_name_is_listed():
    assert set(CONFIGS) == set(PUBLISHED_PARAMS)
    assert names() == sorted([*CONFIGS, EMBEDDED_NAME, *PACKAGED])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_builds_on_meta_like_transformers(name):
    cfg = get_config(name)
    config_class, model_class = HF_CLASSES[cfg.family]
    with torch.device("meta"):
        ours = Transformer(cfg)
        theirs = model_class(config_class.from_dict(cfg.to_hf()))
    assert all(p.is_meta for p in ours.parameters())
    ours_shapes = {("lm_head.weight" if n == "lm_head.weight" else f"model.{n}"): tuple(p.shape)
                   for n, p in ours.named_parameters()}
    theirs_shapes = {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    assert ours_shapes == theirs_shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == cfg.num_params == sum(p.numel() for p in theirs.parameters())
    assert count / 1e9 == pytest.approx(PUBLISHED_PARAMS[name], abs=0.005)


def test_qwen3_8b_has_the_published_shape():
    cfg = get_config("qwen3-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (36, 4096, 32, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (12288, 151936, 1e6)
    assert cfg.qk_norm and not cfg.tie_word_embeddings and cfg.rope_scaling is None


def test_llama3_8b_has_the_published_shape():
    cfg = get_config("llama3-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 4096, 32, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (14336, 128256, 5e5)
    assert not cfg.qk_norm and not cfg.tie_word_embeddings


def test_names_are_case_insensitive_and_configs_fresh():
    a, b = get_config("Qwen3-8B"), get_config("qwen3-8b")
    assert a == b and a is not b
    a.extra["touched"] = True
    assert "touched" not in get_config("qwen3-8b").extra


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="qwen3-8b.*llama3-8b|llama3-8b.*qwen3-8b") as info:
        get_config("qwen9-1t")
    assert "qwen9-1t" in str(info.value)
