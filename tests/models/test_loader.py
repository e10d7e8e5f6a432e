"""load_checkpoint / save_checkpoint against checkpoints transformers writes and reads."""
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmc.models import Transformer, loader
from llmc.models.loader import CheckpointError, load_checkpoint, read_config, save_checkpoint
from llmc.models.rope import rope_frequencies

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def random_ids(batch=2, seq=11):
    return torch.randint(0, 97, (batch, seq))


def logits_of(model, ids, positions=None):
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model(ids, positions)
        return model(ids, position_ids=positions).logits


def hf_state(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters()}


def ours_state_in_hf_names(model) -> dict:
    return {loader.hf_name(name): p.detach() for name, p in model.named_parameters()}


def rewrite_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("family,tied", [("qwen3", False), ("llama", True)])
def test_single_file_and_sharded_checkpoints_load(tiny_hf_checkpoint, family, tied, shard):
    ckpt = tiny_hf_checkpoint(family, tied=tied, max_shard_size=shard)
    shards = sorted(ckpt.path.glob("*.safetensors"))
    if shard:
        assert (ckpt.path / "model.safetensors.index.json").is_file() and len(shards) > 2
    else:
        assert [s.name for s in shards] == ["model.safetensors"]
    ours = load_checkpoint(ckpt.path)
    assert ours_state_in_hf_names(ours).keys() == hf_state(ckpt.model).keys()
    for name, tensor in hf_state(ckpt.model).items():
        assert torch.equal(ours_state_in_hf_names(ours)[name], tensor), name
    ids = random_ids()
    torch.testing.assert_close(logits_of(ours, ids), logits_of(ckpt.model, ids))


def test_bfloat16_checkpoint_loads_exactly(tiny_hf_checkpoint):
    ckpt = tiny_hf_checkpoint("llama", dtype=torch.bfloat16, rope=LLAMA3)
    assert json.loads((ckpt.path / "config.json").read_text())["dtype"] == "bfloat16"
    as_fp32 = load_checkpoint(ckpt.path, dtype=torch.float32)
    as_bf16 = load_checkpoint(ckpt.path, dtype=torch.bfloat16)
    stored = hf_state(ckpt.model)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    for name, got in ours_state_in_hf_names(as_fp32).items():
        assert got.dtype == torch.float32 and torch.equal(got, stored[name].float()), name
    for name, got in ours_state_in_hf_names(as_bf16).items():
        assert got.dtype == torch.bfloat16 and torch.equal(got, stored[name]), name
    # RoPE frequencies stay float32 in a bf16 model: rounded, they rotate by whole radians at long positions.
    expected_freq, _ = rope_frequencies(8, 10000.0, LLAMA3, 128)
    assert as_bf16.inv_freq.dtype == torch.float32 and torch.equal(as_bf16.inv_freq, expected_freq)

    ids = random_ids()
    positions = torch.arange(3000, 3011)[None].expand(2, 11)
    ours, theirs = logits_of(as_bf16, ids, positions).float(), logits_of(ckpt.model, ids, positions).float()
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    assert cosine >= 0.999


@pytest.mark.parametrize("spelling", ["hub", "hub-type"])
@pytest.mark.parametrize("family,rope", [("llama", LLAMA3), ("qwen3", None)])
def test_hub_spelled_config_loads_like_transformers5(tiny_hf_checkpoint, spelling, family, rope):
    written = tiny_hf_checkpoint(family, rope=rope)
    hub = tiny_hf_checkpoint(family, rope=rope, spelling=spelling)
    config = json.loads((hub.path / "config.json").read_text())
    assert "rope_parameters" not in config and "torch_dtype" in config and "rope_theta" in config
    assert read_config(hub.path) == read_config(written.path)
    # transformers reads the rewritten config too: the Hub spelling under test is one it accepts.
    theirs = AutoModelForCausalLM.from_pretrained(hub.path, dtype=torch.float32).eval()
    ids = random_ids()
    positions = torch.arange(40, 51)[None].expand(2, 11)
    expected = logits_of(hub.model, ids, positions)
    torch.testing.assert_close(logits_of(theirs, ids, positions), expected)
    torch.testing.assert_close(logits_of(load_checkpoint(hub.path), ids, positions), expected)


def test_rotary_inv_freq_in_checkpoint_is_recomputed(tiny_hf_checkpoint):
    ckpt = tiny_hf_checkpoint("llama")
    rewrite_weights(ckpt.path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(4)}))
    ids = random_ids()
    torch.testing.assert_close(logits_of(load_checkpoint(ckpt.path), ids), logits_of(ckpt.model, ids))


def drop(name):
    return lambda tensors: tensors.pop(name)


def reshape(name, shape):
    return lambda tensors: tensors.update({name: torch.randn(shape)})


def add(name, shape):
    return lambda tensors: tensors.update({name: torch.randn(shape)})


@pytest.mark.parametrize("edit,message", [
    (drop("model.layers.1.self_attn.k_norm.weight"), r"missing tensor model\.layers\.1\.self_attn\.k_norm\.weight"),
    (drop("lm_head.weight"), r"missing tensor lm_head\.weight"),
    (reshape("model.layers.0.mlp.up_proj.weight", (81, 48)),
     r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(81, 48\), expected \(80, 48\)"),
    (add("model.layers.0.mlp.up_proj.bias", (80,)), r"unexpected tensor model\.layers\.0\.mlp\.up_proj\.bias"),
    (add("model.layers.2.mlp.up_proj.weight", (80, 48)), r"unexpected tensor model\.layers\.2\."),
], ids=["missing", "missing-lm-head", "wrong-shape", "unexpected-bias", "unexpected-layer"])
def test_weights_not_matching_config_are_refused(tiny_hf_checkpoint, edit, message):
    ckpt = tiny_hf_checkpoint("qwen3")
    rewrite_weights(ckpt.path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(ckpt.path)
    assert "\n" not in str(info.value)


def no_config(path):
    (path / "config.json").unlink()


def unsupported_type(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))


def no_weights(path):
    for file in [*path.glob("*.safetensors"), path / "model.safetensors.index.json"]:
        file.unlink()


def missing_shard(path):
    sorted(path.glob("model-*.safetensors"))[1].unlink()


def broken_json(path):
    (path / "config.json").write_text('{"model_type": "qwen3",')


def bin_only(path):
    no_weights(path)
    (path / "pytorch_model.bin").write_bytes(b"not read")


@pytest.mark.parametrize("damage,message", [
    (no_config, "no config.json"), (unsupported_type, "model_type 'gpt_neox'"), (no_weights, "no model.safetensors"),
    (bin_only, "pickled"), (missing_shard, r"missing weight file model-00002-of-"), (broken_json, "config.json"),
], ids=["no-config", "unsupported-type", "no-weights", "bin-only", "missing-shard", "broken-json"])
def test_unusable_directories_are_refused(tiny_hf_checkpoint, damage, message):
    ckpt = tiny_hf_checkpoint("qwen3", max_shard_size="20KB")
    damage(ckpt.path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(ckpt.path)
    assert "\n" not in str(info.value)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nowhere")
    assert "\n" not in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "file")


def test_tensors_are_streamed_one_at_a_time(tiny_hf_checkpoint, monkeypatch):
    """Every tensor read from the files is released before the next is read: never a second copy of the model."""
    ckpt = tiny_hf_checkpoint("qwen3", max_shard_size="20KB")
    handed_out, most_alive = [], 0
    real_read = loader._read_tensor

    def counting_read(*args):
        nonlocal most_alive
        # The caller's loop variable still holds the previous tensor while it asks for the next one.
        most_alive = max(most_alive, sum(ref() is not None for ref in handed_out))
        tensor = real_read(*args)
        handed_out.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(loader, "_read_tensor", counting_read)
    model = load_checkpoint(ckpt.path, progress=True)
    assert len(handed_out) == len(hf_state(ckpt.model)) > 10
    assert most_alive <= 1
    ids = random_ids()
    torch.testing.assert_close(logits_of(model, ids), logits_of(ckpt.model, ids))


SAVE_CASES = [("qwen3", False, None), ("qwen3", True, {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32}),
              ("llama", True, LLAMA3), ("llama", False, None)]


@pytest.mark.parametrize("family,tied,scaling", SAVE_CASES)
def test_saved_checkpoint_loads_in_transformers(tiny_model, tmp_path, family, tied, scaling):
    model = tiny_model(family, tie_word_embeddings=tied, rope_scaling=scaling, num_kv_heads=3)
    save_checkpoint(model, tmp_path, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[family]
    ids = random_ids()
    positions = torch.arange(50, 61)[None].expand(2, 11)
    torch.testing.assert_close(logits_of(theirs, ids, positions), logits_of(model, ids, positions))
    reloaded = load_checkpoint(tmp_path)
    assert reloaded.config == model.config
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids), rtol=0, atol=0)


def test_saved_bfloat16_checkpoint_round_trips(tiny_model, tmp_path):
    model = tiny_model("qwen3", tie_word_embeddings=True)
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    reloaded = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    expected = ours_state_in_hf_names(model)
    for name, got in ours_state_in_hf_names(reloaded).items():
        assert torch.equal(got, expected[name].to(torch.bfloat16)), name
    assert reloaded.lm_head.weight is reloaded.embed_tokens.weight
