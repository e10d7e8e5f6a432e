"""rope_frequencies against transformers' RoPE initialisation, bit for bit."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from llmc.models import ModelConfig, Transformer
from llmc.models.rope import rope_frequencies

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "llama3-tight": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
                     "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn-betas-untruncated": {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 64,
                               "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
                    "mscale": 0.9, "mscale_all_dim": 0.6},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                              "attention_factor": 0.75},
    # No factor: transformers derives it from max_position_embeddings / original (DeepSeek-style configs).
    "yarn-no-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096},
}
SHAPES = [(128, 1e6, 131072), (64, 5e5, 16384), (6, 10000.0, 100), (18, 12345.0, 4096)]


def hf_config(head_dim, theta, max_positions, scaling=None):
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_positions,
                       rope_parameters={"rope_type": "default", "rope_theta": theta, **(scaling or {})})


@pytest.mark.parametrize("head_dim,theta,max_positions", SHAPES)
@pytest.mark.parametrize("kind", SCALINGS)
def test_scaled_frequencies_equal_transformers(kind, head_dim, theta, max_positions):
    scaling = SCALINGS[kind]
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config(head_dim, theta, max_positions,
                                                                                   scaling))
    ours, scale = rope_frequencies(head_dim, theta, dict(scaling), max_positions)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert scale == expected_scale


@pytest.mark.parametrize("head_dim,theta,max_positions", SHAPES)
def test_default_frequencies_equal_transformers(head_dim, theta, max_positions):
    config = hf_config(head_dim, theta, max_positions)
    ours, scale = rope_frequencies(head_dim, theta, None, max_positions)
    for rotary in (LlamaRotaryEmbedding, Qwen3RotaryEmbedding):
        expected, expected_scale = rotary.compute_default_rope_parameters(config)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        assert scale == expected_scale == 1.0


def test_scaling_changes_frequencies():
    base, _ = rope_frequencies(64, 5e5, None, 8192)
    for kind, scaling in SCALINGS.items():
        scaled, _ = rope_frequencies(64, 5e5, dict(scaling), 8192)
        assert not torch.equal(base, scaled), kind


@pytest.mark.parametrize("scaling", [None, SCALINGS["yarn-mscale"], SCALINGS["llama3-tight"]],
                         ids=["default", "yarn", "llama3"])
def test_model_cos_sin_equal_transformers(scaling):
    """The model's cos/sin (attention scaling applied) equal transformers' rotary embedding at random positions."""
    config = hf_config(16, 10000.0, 2048, scaling)
    model = Transformer(ModelConfig(family="llama", vocab_size=11, hidden_size=32, intermediate_size=8, num_layers=1,
                                    num_heads=2, num_kv_heads=2, head_dim=16, rope_scaling=scaling,
                                    max_position_embeddings=2048))
    positions = torch.randint(0, 4096, (3, 7))
    x = torch.randn(3, 7, 32)
    expected_cos, expected_sin = LlamaRotaryEmbedding(config)(x, positions)
    cos, sin = model.rope(positions, x.dtype)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=0)


def test_unsupported_scaling_raises():
    with pytest.raises(ValueError, match="dynamic"):
        rope_frequencies(64, 1e4, {"rope_type": "dynamic", "factor": 2.0}, 4096)
