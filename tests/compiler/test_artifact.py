import json
import struct
from datetime import datetime

import pytest
import torch
from safetensors import safe_open

from llmc.common.targets import get_target
from llmc.compiler.artifact import BundleWriteError, sha256_file, write_bundle
from llmc.models import ModelConfig
from llmc.runtime.bundle import BundleError, HostInfo, open_bundle

CPU_HOST = HostInfo("cpu", None, "cpu")
PICKLE_MAGIC = [bytes([0x80, protocol]) for protocol in range(2, 6)]


def manifest_for(target="cpu", dtype="float32"):
    config = ModelConfig(family="qwen3", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
    return {"model": config.to_dict(), "target": get_target(target).to_dict(), "dtype": dtype, "max_seq_len": 128,
            "block_size": 16, "eos_token_ids": [1, 2],
            "passes": [{"name": "fuse_norm_linear", "rewrites": 3, "nodes_before": 40, "nodes_after": 31}]}


def random_weights():
    embed = torch.randn(64, 16)
    qkv = torch.randn(8, 16)
    return [
        ("embed.weight", embed),
        ("layers.0.norm.weight", torch.rand(16) + 0.5),
        ("layers.0.q.weight", qkv[:4]),  # two slices of one storage: safetensors refuses them together
        ("layers.0.k.weight", qkv[4:]),
        ("layers.0.mlp.weight", torch.randn(16, 32).t()),  # not contiguous
        ("layers.0.half.weight", torch.randn(8, 8, dtype=torch.bfloat16)),
        ("lm_head.weight", embed),  # tied
    ]


def make_tokenizer(tmp_path):
    source = tmp_path / "checkpoint"
    source.mkdir()
    (source / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "seed": torch.randn(1).item()}))
    (source / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    (source / "model.safetensors").write_bytes(b"not a tokenizer file")
    return source


def test_round_trip_of_weights_graph_tokenizer_and_manifest(tmp_path):
    weights = random_weights()
    graph = {"nodes": [{"op": "llmc::rms_norm", "args": [1, 2]}], "outputs": ["logits"]}
    out = write_bundle(tmp_path / "b", manifest_for(), graph, iter(weights), make_tokenizer(tmp_path),
                       shard_bytes=2048)
    bundle = open_bundle(out, host=CPU_HOST)

    loaded = bundle.load_weights()
    assert sorted(loaded) == sorted(name for name, _ in weights)
    for name, tensor in weights:
        assert loaded[name].dtype == tensor.dtype
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert bundle.graph == graph
    assert sorted(p.name for p in bundle.tokenizer_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert (bundle.tokenizer_dir / "tokenizer.json").read_text() == (tmp_path / "checkpoint/tokenizer.json").read_text()

    shards = sorted(p.name for p in (out / "weights").iterdir())
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    shard_of = {}
    for shard in shards:
        with safe_open(str(out / "weights" / shard), framework="pt") as f:
            names = list(f.keys())
            tensor_bytes = sum(f.get_tensor(name).nbytes for name in names)
        assert tensor_bytes <= 2048 or len(names) == 1
        shard_of.update(dict.fromkeys(names, shard))
    assert shard_of["layers.0.q.weight"] == shard_of["layers.0.k.weight"], "slices of one storage share a shard"
    assert "lm_head.weight" not in shard_of, "the tied tensor is saved once"
    assert len(shard_of) == len(weights) - 1

    m = bundle.manifest
    assert (m["format"], m["format_version"], m["llmc_version"]) == ("llmc-bundle", 1, "0.1.0")
    assert datetime.fromisoformat(m["created"]).utcoffset().total_seconds() == 0
    assert m["model"] == manifest_for()["model"] and bundle.config == m["model"]
    assert bundle.target == get_target("cpu").to_dict() and bundle.dtype == "float32" and bundle.has_weights
    assert (m["max_seq_len"], m["block_size"], m["eos_token_ids"]) == (128, 16, [1, 2])
    assert m["passes"] == manifest_for()["passes"]
    assert m["toolchain"]["torch"] == torch.__version__ and "python" in m["toolchain"]
    assert m["weight_aliases"] == {"lm_head.weight": "embed.weight"}
    every_file = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(m["files"]) == [f for f in every_file if f != "manifest.json"]
    for name, digest in m["files"].items():
        assert sha256_file(out / name) == digest


def test_tied_weights_load_as_one_tensor(tmp_path):
    out = write_bundle(tmp_path / "b", manifest_for(), {}, random_weights(), None)
    loaded = open_bundle(out, host=CPU_HOST).load_weights()
    assert loaded["lm_head.weight"] is loaded["embed.weight"]


def test_bundle_holds_no_pickle(tmp_path):
    out = write_bundle(tmp_path / "b", manifest_for(), {"nodes": []}, random_weights(), make_tokenizer(tmp_path),
                       shard_bytes=1024)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            # A safetensors header length can itself begin with 0x80 0x0N, so prove the layout instead.
            (header_len,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + header_len])
            assert header["__metadata__"] == {"format": "pt"}
            with safe_open(str(path), framework="pt") as f:
                assert len(list(f.keys())) == len(header) - 1
        else:
            assert data[:2] not in PICKLE_MAGIC, path
            assert not data.startswith(b"PK\x03\x04"), path
            json.loads(data)


def test_bundle_without_weights_or_tokenizer(tmp_path):
    out = write_bundle(tmp_path / "b", manifest_for("h100", "bfloat16"), {"nodes": []}, None, None)
    bundle = open_bundle(out, host=HostInfo("cuda", (9, 0), "NVIDIA H100"))
    assert not bundle.has_weights and bundle.tokenizer_dir is None
    assert sorted(bundle.manifest["files"]) == ["graph.json"]


def test_extra_files_land_under_kernels_and_are_hashed(tmp_path):
    cubin = b"\x7fELF" + torch.randint(0, 256, (64,), dtype=torch.uint8).numpy().tobytes()
    extra = {"sm_80/abc.cubin": cubin, "index.json": b'{"kernels": {}}', "src/abc.py": b"import triton\n"}
    out = write_bundle(tmp_path / "b", manifest_for("a100", "bfloat16"), {"nodes": []}, None, None,
                       extra_files=extra)
    bundle = open_bundle(out, host=HostInfo("cuda", (8, 0), "NVIDIA A100"))
    assert sorted(bundle.manifest["files"]) == sorted(["graph.json", *(f"kernels/{name}" for name in extra)])
    assert (out / "kernels/sm_80/abc.cubin").read_bytes() == cubin
    assert bundle.manifest["files"]["kernels/sm_80/abc.cubin"] == sha256_file(out / "kernels/sm_80/abc.cubin")

    (out / "kernels/sm_80/abc.cubin").write_bytes(cubin[:-1] + bytes([cubin[-1] ^ 1]))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        open_bundle(out, host=HostInfo("cuda", (8, 0), "NVIDIA A100"))


@pytest.mark.parametrize("name", ["../escape.py", "/abs.cubin", "", ".", "a\\b", "dir/"])
def test_extra_files_must_stay_inside_kernels(tmp_path, name):
    with pytest.raises(ValueError, match="not a relative path inside kernels/"):
        write_bundle(tmp_path / "b", manifest_for(), {"nodes": []}, None, None, extra_files={name: b"x"})
    assert not (tmp_path / "b").exists() and not (tmp_path / "escape.py").exists()


def test_extra_files_must_be_bytes(tmp_path):
    with pytest.raises(TypeError, match="not bytes"):
        write_bundle(tmp_path / "b", manifest_for(), {"nodes": []}, None, None, extra_files={"index.json": "{}"})


class Interrupted(RuntimeError):
    pass


def failing_weights(error: BaseException):
    yield from random_weights()[:4]
    raise error


@pytest.mark.parametrize("error", [Interrupted("disk gone"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing(tmp_path, error):
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(type(error)):
        write_bundle(parent / "b", manifest_for(), {}, failing_weights(error), make_tokenizer(tmp_path),
                     shard_bytes=512)
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("error", [Interrupted("disk gone"), KeyboardInterrupt()])
def test_failed_overwrite_keeps_the_old_bundle(tmp_path, error):
    old_weights = random_weights()
    out = write_bundle(tmp_path / "b", manifest_for(), {"old": True}, old_weights, None)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(type(error)):
        write_bundle(out, manifest_for(), {"old": False}, failing_weights(error), None, overwrite=True,
                     shard_bytes=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    bundle = open_bundle(out, host=CPU_HOST)
    assert bundle.graph == {"old": True}
    torch.testing.assert_close(bundle.load_weights()["embed.weight"], old_weights[0][1], rtol=0, atol=0)


def test_existing_output_needs_overwrite(tmp_path):
    out = write_bundle(tmp_path / "b", manifest_for(), {"version": 1}, None, None)
    with pytest.raises(BundleWriteError, match="already exists; pass --overwrite"):
        write_bundle(out, manifest_for(), {"version": 2}, None, None)
    write_bundle(out, manifest_for(), {"version": 2}, None, None, overwrite=True)
    assert open_bundle(out, host=CPU_HOST).graph == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_overwrite_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BundleWriteError, match="not an llmc bundle; refusing to replace it"):
        write_bundle(precious, manifest_for(), {}, None, None, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_manifest_checks_before_writing(tmp_path):
    incomplete = manifest_for()
    del incomplete["block_size"]
    with pytest.raises(ValueError, match="lacks block_size"):
        write_bundle(tmp_path / "b", incomplete, {}, None, None)
    with pytest.raises(ValueError, match=r"t4 \(sm_75\) has no bfloat16"):
        write_bundle(tmp_path / "b", manifest_for("t4", "bfloat16"), {}, None, None)
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_weight_streams(tmp_path):
    with pytest.raises(BundleWriteError, match="yielded no tensors"):
        write_bundle(tmp_path / "b", manifest_for(), {}, iter([]), None)
    with pytest.raises(ValueError, match="given twice"):
        write_bundle(tmp_path / "b", manifest_for(), {}, [("w", torch.randn(2)), ("w", torch.randn(2))], None)
    with pytest.raises(BundleWriteError, match="meta device"):
        write_bundle(tmp_path / "b", manifest_for(), {}, [("w", torch.empty(2, device="meta"))], None)
    with pytest.raises(BundleWriteError, match="holds no tokenizer files"):
        write_bundle(tmp_path / "b", manifest_for(), {}, None, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_streamed_tensors_that_reuse_an_address_are_not_aliased(tmp_path):
    def stream():
        for i in range(6):  # each tensor dies after the writer takes it: the allocator may hand out its address
            yield f"w{i}", torch.randn(4, 4)

    out = write_bundle(tmp_path / "b", manifest_for(), {}, stream(), None, shard_bytes=64)
    bundle = open_bundle(out, host=CPU_HOST)
    assert bundle.manifest["weight_aliases"] == {}
    loaded = bundle.load_weights()
    assert len({t.sum().item() for t in loaded.values()}) == 6
