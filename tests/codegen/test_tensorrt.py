"""TensorRT build settings per target: precision flags, optimization profiles, refusals."""
import json
import random

import pytest

from llmc.codegen.tensorrt import TensorRTSettingsError, build_settings
from llmc.common.targets import get_target

INPUTS = {"input_ids", "positions", "k_cache", "v_cache", "block_table", "past_lens", "last_index"}


def settings(target="a100", dtype="bfloat16", **kwargs):
    shape = dict(max_batch=random.randint(2, 40), max_seq_len=random.randint(17, 5000), block_size=16,
                 num_layers=3, num_kv_heads=2, head_dim=64)
    return build_settings(get_target(target), dtype, **{**shape, **kwargs}), shape


@pytest.mark.parametrize("target, dtype, flags", [
    ("a100", "bfloat16", ["bf16"]),
    ("a100", "float16", ["fp16"]),
    ("t4", "float16", ["fp16"]),
    ("t4", "float32", []),
    ("h100", "bfloat16", ["bf16", "fp8"]),  # fp8 only where the target has fp8 GEMMs
    ("l4", "float16", ["fp16", "fp8"]),
    ("h100", "float8_e4m3fn", ["fp8", "bf16"]),
])
def test_precision_flags_follow_the_target(target, dtype, flags):
    got, _ = settings(target, dtype)
    assert got["precision_flags"] == flags
    assert got["compute_capability"] == list(get_target(target).capability)
    assert got["strongly_typed"] is True
    json.dumps(got)  # written into the bundle as tensorrt/settings.json


@pytest.mark.parametrize("target, dtype, match", [
    ("t4", "bfloat16", "t4 \\(sm_75\\) has no bfloat16 \\(Turing has no bf16 arithmetic\\); use --dtype float16"),
    ("a100", "float8_e4m3fn", "a100 \\(sm_80\\) has no float8_e4m3fn; use --dtype bfloat16"),
    ("cpu", "float32", "needs a GPU target"),
])
def test_what_the_target_lacks_is_refused(target, dtype, match):
    with pytest.raises(TensorRTSettingsError, match=match):
        settings(target, dtype)


def test_profiles_cover_decode_and_prefill_up_to_the_limits():
    got, shape = settings("h100", max_cache_blocks=None)
    batch, seq, block = shape["max_batch"], shape["max_seq_len"], shape["block_size"]
    width = -(-seq // block)
    decode, prefill = got["profiles"]
    assert (decode["name"], prefill["name"]) == ("decode", "prefill")
    for profile in (decode, prefill):
        shapes = profile["shapes"]
        assert set(shapes) == INPUTS
        for name, s in shapes.items():
            assert all(lo <= opt <= hi for lo, opt, hi in zip(s["min"], s["opt"], s["max"])), (profile["name"], name)
        assert shapes["block_table"]["max"] == [batch, width]
        assert shapes["past_lens"]["max"] == shapes["last_index"]["max"] == [batch]
        assert shapes["k_cache"] == shapes["v_cache"]
        assert [shapes["k_cache"][k][i] for k in ("min", "max") for i in (0, 2, 3, 4)] == [3, 16, 2, 64] * 2
        # The cache holds at most what the target's memory does (keys and values together).
        max_blocks = shapes["k_cache"]["max"][1]
        assert 2 * max_blocks * 3 * 16 * 2 * 64 * 2 <= 80 * (1 << 30) < 2 * (max_blocks + 1) * 3 * 16 * 2 * 64 * 2
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [batch, 1], "max": [batch, 1]}
    assert prefill["shapes"]["input_ids"]["max"] == [batch, seq]
    assert prefill["shapes"]["input_ids"]["opt"] == [1, min(512, seq)]


def test_options_and_their_refusals():
    got, _ = settings("a100", hardware_compatibility="ampere_plus", builder_optimization_level=5,
                      workspace_bytes=1 << 30, max_cache_blocks=100)
    assert got["hardware_compatibility_level"] == "ampere_plus" and got["builder_optimization_level"] == 5
    assert got["workspace_bytes"] == 1 << 30
    assert {p["shapes"]["k_cache"]["max"][1] for p in got["profiles"]} == {100}
    assert settings("a100")[0]["hardware_compatibility_level"] == "none"
    with pytest.raises(TensorRTSettingsError, match="older than Ampere"):
        settings("t4", "float16", hardware_compatibility="ampere_plus")
    with pytest.raises(TensorRTSettingsError, match="unknown hardware compatibility level 'hopper'"):
        settings(hardware_compatibility="hopper")
    with pytest.raises(TensorRTSettingsError, match="0 to 5"):
        settings(builder_optimization_level=6)
    with pytest.raises(TensorRTSettingsError, match="max_batch must be at least 1"):
        settings(max_batch=0)
