"""ModelConfig from config.json in the Hub and transformers-5 spellings, and back."""
import json

import pytest
from transformers import LlamaConfig, Qwen3Config

from llmc.models import ModelConfig
from llmc.models.registry import CONFIGS, get_config

# config.json as published on the Hub (Qwen/Qwen3-8B, meta-llama/Llama-3.2-1B), trimmed of tokenizer ids.
QWEN3_8B_HUB = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
LLAMA32_1B_HUB = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}


def transformers5_spelling(hub: dict) -> dict:
    """The same config as transformers 5 writes it: theta inside rope_parameters, dtype instead of torch_dtype."""
    out = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    scaling = dict(hub["rope_scaling"] or {"rope_type": "default"})
    scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type"))
    out["rope_parameters"] = {"rope_theta": hub["rope_theta"], **scaling}
    out["dtype"] = hub["torch_dtype"]
    return out


def legacy_type_key(hub: dict) -> dict:
    """Older Hub configs name the scaling kind "type" instead of "rope_type"."""
    out = dict(hub)
    if out["rope_scaling"]:
        scaling = dict(out["rope_scaling"])
        scaling["type"] = scaling.pop("rope_type")
        out["rope_scaling"] = scaling
    return out


YARN_QWEN = {**QWEN3_8B_HUB, "max_position_embeddings": 131072,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
LINEAR_LLAMA = {**LLAMA32_1B_HUB, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
PUBLISHED = {"qwen3-8b": QWEN3_8B_HUB, "llama3.2-1b": LLAMA32_1B_HUB, "qwen3-yarn": YARN_QWEN,
             "llama-linear": LINEAR_LLAMA}


@pytest.mark.parametrize("name", PUBLISHED)
def test_spellings_give_the_same_config(name):
    hub = PUBLISHED[name]
    # Through JSON, as the loader sees it.
    spellings = [hub, legacy_type_key(hub), transformers5_spelling(hub), transformers5_spelling(legacy_type_key(hub))]
    configs = [ModelConfig.from_hf(json.loads(json.dumps(s))) for s in spellings]
    assert all(c == configs[0] for c in configs[1:])
    assert configs[0].dtype == "bfloat16"
    assert configs[0].rope_theta == float(hub["rope_theta"])


@pytest.mark.parametrize("name", PUBLISHED)
def test_config_reads_as_transformers_reads_it(name):
    hub = PUBLISHED[name]
    ours = ModelConfig.from_hf(hub)
    theirs = {"qwen3": Qwen3Config, "llama": LlamaConfig}[hub["model_type"]].from_dict(legacy_type_key(hub))
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.hidden_size) == (
        theirs.num_hidden_layers, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim,
        theirs.hidden_size)
    rope = dict(theirs.rope_parameters)
    assert ours.rope_theta == rope.pop("rope_theta")
    rope.pop("type", None)
    if rope["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        # transformers may fill in defaults (original_max_position_embeddings); every key we read agrees.
        assert ours.rope_scaling.items() <= rope.items()


def test_published_configs_match_registry():
    assert ModelConfig.from_hf(QWEN3_8B_HUB) == get_config("qwen3-8b")
    assert ModelConfig.from_hf(LLAMA32_1B_HUB) == get_config("llama3.2-1b")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_to_hf_round_trips(name):
    cfg = get_config(name)
    hf = json.loads(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(hf) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_missing_optional_keys_take_transformers_defaults():
    hf = {k: v for k, v in LLAMA32_1B_HUB.items()
          if k not in ("num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "torch_dtype")}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.num_kv_heads == 32 and cfg.head_dim == 2048 // 32
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None and cfg.dtype == "float32"


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"num_key_value_heads": 5}, "not a multiple"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**LLAMA32_1B_HUB, **change})


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="gpt2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=4)


def test_same_model_ignores_only_the_storage_dtype():
    import dataclasses

    from llmc.models.registry import get_config

    base = get_config("qwen3-0.6b")
    assert base.same_model(dataclasses.replace(base, dtype="float32"))
    assert not base.same_model(dataclasses.replace(base, num_layers=base.num_layers + 1))
    assert not base.same_model(dataclasses.replace(base, rope_theta=10000.0))
