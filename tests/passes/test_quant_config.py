"""Quantization configs, scheme names, the policy file and the manifest serialisation."""
import json

import pytest

from llmc.passes.quant_config import (POLICY_DIR, SCHEME_NAMES, Float8Config, Int4W4A8Config, Int4WeightOnlyConfig,
                                      Int8Config, QuantConfigError, QuantPolicy, config_for_scheme, config_from_dict,
                                      config_to_dict, layer_kind, load_policy)

MIXED = QuantPolicy(rules={"default": None, "mlp": Int4W4A8Config(128), "attention": Float8Config(), "lm_head": None},
                    sparsity={"default": None, "mlp": None, "attention": None, "lm_head": None})


def test_scheme_names_give_the_documented_configs():
    assert config_for_scheme("fp8") == Float8Config(activations=True)
    assert config_for_scheme("fp8-w8a16") == Float8Config(activations=False)
    assert config_for_scheme("int8") == Int8Config(smooth_alpha=0.5)
    assert config_for_scheme("int8-rtn") == Int8Config(smooth_alpha=0.0)
    assert config_for_scheme("int4") == Int4WeightOnlyConfig(group_size=128, awq=False)
    assert config_for_scheme("int4-awq") == Int4WeightOnlyConfig(group_size=128, awq=True)
    assert config_for_scheme("w4a8") == Int4W4A8Config(group_size=128)
    assert config_for_scheme("none") is None
    with pytest.raises(QuantConfigError, match="unknown quantization scheme 'int3'.*int4-awq"):
        config_for_scheme("int3")


def test_mixed_is_the_shipped_policy_file():
    policy = config_for_scheme("mixed")
    assert policy == load_policy(POLICY_DIR / "mixed.toml") == MIXED
    assert policy.config_for("mlp") == Int4W4A8Config(128)
    assert policy.config_for("attention") == Float8Config()
    assert policy.config_for("lm_head") is None and policy.config_for("other") is None
    assert all(policy.sparsity_for(kind) is None for kind in ("attention", "mlp", "lm_head", "other"))


def test_default_rule_covers_every_kind_but_lm_head():
    int8 = Int8Config(0.0)
    policy = QuantPolicy({"default": int8, "mlp": None}, {"mlp": "2:4"})
    assert policy.config_for("attention") == int8 and policy.config_for("other") == int8
    assert policy.config_for("mlp") is None and policy.config_for("lm_head") is None
    assert policy.sparsity_for("mlp") == "2:4" and policy.sparsity_for("attention") is None
    named = QuantPolicy({"default": int8, "lm_head": Int4WeightOnlyConfig()})
    assert named.config_for("lm_head") == Int4WeightOnlyConfig()
    with pytest.raises(QuantConfigError, match="both quantization and sparsity"):
        QuantPolicy({"mlp": int8}, {"default": "2:4"})
    sparse = QuantPolicy({"attention": int8}, {"mlp": "2:4"})
    assert sparse.sparsity_for("mlp") == "2:4" and sparse.sparsity_for("attention") is None
    assert sparse.sparsity_for("lm_head") is None


@pytest.mark.parametrize("name,kind", [
    ("layers_0_self_attn_q_k_v_proj_weight__layers_0_input_layernorm_weight", "attention"),
    ("layers_3_self_attn_o_proj_weight", "attention"),
    ("model_layers_0_self_attn_k_proj_weight", "attention"),
    ("layers_1_mlp_gate_up_proj_weight__layers_1_post_attention_layernorm_weight", "mlp"),
    ("model.layers.2.mlp.down_proj", "mlp"),
    ("lm_head_weight__norm_weight", "lm_head"),
    ("model_embed_tokens_weight__model_norm_weight", "lm_head"),  # a tied head folds the embedding
    ("vision_proj_weight", "other"),
])
def test_layer_kinds_come_from_the_weight_names(name, kind):
    assert layer_kind(name) == kind


def test_every_config_and_policy_round_trips_through_json():
    configs = [config_for_scheme(n) for n in SCHEME_NAMES]
    configs += [Int4WeightOnlyConfig(group_size=32, awq=True), Int8Config(0.25),
                QuantPolicy({"default": Int8Config(0.0), "lm_head": Int4W4A8Config(64)}, {"mlp": None})]
    for config in configs:
        stored = json.loads(json.dumps(config_to_dict(config)))
        assert stored["version"] == 1 and stored["type"] == type(config).__name__
        back = config_from_dict(stored)
        assert back == config and type(back) is type(config)


def test_stored_configs_from_elsewhere_are_refused_clearly():
    with pytest.raises(QuantConfigError, match="unknown quantization config type 'Int2Config'"):
        config_from_dict({"type": "Int2Config", "version": 1})
    with pytest.raises(QuantConfigError, match="Int8Config version 2 is not supported"):
        config_from_dict({"type": "Int8Config", "version": 2, "smooth_alpha": 0.5})
    with pytest.raises(QuantConfigError, match="unknown field 'alpha'"):
        config_from_dict({"type": "Int8Config", "version": 1, "alpha": 0.5})
    with pytest.raises(QuantConfigError, match="QuantPolicy"):
        config_from_dict({"type": "QuantPolicy", "version": 9, "rules": {}, "sparsity": {}})


def test_invalid_config_values_are_refused():
    with pytest.raises(QuantConfigError, match="smooth_alpha 1.5"):
        Int8Config(smooth_alpha=1.5)
    with pytest.raises(QuantConfigError, match="group_size 33"):
        Int4WeightOnlyConfig(group_size=33)
    with pytest.raises(QuantConfigError, match="group_size 0"):
        Int4W4A8Config(group_size=0)
    with pytest.raises(QuantConfigError, match="unknown layer kind 'norm'"):
        QuantPolicy({"norm": Int8Config()})


def test_policy_file_overrides_config_fields(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('version = 1\n[default]\nquant = "int8"\nsmooth_alpha = 0.8\n'
                    '[mlp]\nquant = "int4-awq"\ngroup_size = 64\n[attention]\nsparsity = "2:4"\n')
    policy = load_policy(path)
    assert policy.config_for("other") == Int8Config(0.8)
    assert policy.config_for("mlp") == Int4WeightOnlyConfig(64, awq=True)
    assert policy.config_for("attention") is None and policy.sparsity_for("attention") == "2:4"
    assert policy.sparsity_for("mlp") is None  # a section states its kind completely


@pytest.mark.parametrize("text,message", [
    ('[mlp]\nquant = "w4a8"\n', "missing key 'version'"),
    ('version = 2\n', "version 2 is not supported"),
    ('version = 1\n[feed_forward]\nquant = "w4a8"\n', "unknown key 'feed_forward'"),
    ('version = 1\nmlp = "w4a8"\n', "'mlp' must be a \\[mlp\\] section"),
    ('version = 1\n[mlp]\nquant = "int3"\n', "\\[mlp\\] quant = 'int3' is not a scheme"),
    ('version = 1\n[mlp]\nquant = "mixed"\n', "\\[mlp\\] quant = 'mixed' is not a scheme"),
    ('version = 1\n[mlp]\nquant = "w4a8"\ngroupsize = 64\n', "\\[mlp\\] unknown key 'groupsize'"),
    ('version = 1\n[mlp]\nquant = "fp8"\ngroup_size = 64\n', "\\[mlp\\] unknown key 'group_size'"),
    ('version = 1\n[mlp]\nquant = "w4a8"\ngroup_size = "64"\n', "\\[mlp\\] group_size = '64' must be a int"),
    ('version = 1\n[mlp]\nquant = "w4a8"\ngroup_size = 63\n', "\\[mlp\\] Int4W4A8Config group_size 63"),
    ('version = 1\n[mlp]\nsparsity = "1:4"\n', "\\[mlp\\] sparsity = '1:4'"),
    ('version = 1\n[mlp]\nquant = "w4a8"\nsparsity = "2:4"\n', "both quantization and sparsity"),
    ('version = 1\n[mlp\n', "not valid TOML"),
])
def test_policy_file_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(QuantConfigError, match=message) as error:
        load_policy(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_policy_file_is_named(tmp_path):
    with pytest.raises(QuantConfigError, match="cannot read quantization policy .*nope.toml"):
        load_policy(tmp_path / "nope.toml")
