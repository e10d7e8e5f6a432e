import json
import random

import pytest
import torch

from llmc.common.targets import CPU_ISAS, get_target
from llmc.compiler.artifact import write_bundle
from llmc.models import ModelConfig
from llmc.runtime.bundle import BundleError, HostInfo, detect_host, open_bundle, verify_bundle

CPU_HOST = HostInfo("cpu", None, "cpu")
WEIGHTS = "weights/model-00001-of-00002.safetensors"


def manifest_for(target="cpu", dtype="float32"):
    config = ModelConfig(family="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=4)
    return {"model": config.to_dict(), "target": get_target(target).to_dict(), "dtype": dtype, "max_seq_len": 64,
            "block_size": 16, "eos_token_ids": [2], "passes": []}


@pytest.fixture
def bundle_dir(tmp_path):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"model": {}}')
    weights = [("embed.weight", torch.randn(32, 8)), ("norm.weight", torch.randn(8)), ("head.weight", torch.randn(32, 8))]
    return write_bundle(tmp_path / "bundle", manifest_for(), {"nodes": [{"op": "embedding"}]}, weights, tokenizer,
                        shard_bytes=1100)


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    offset = random.randrange(len(data))
    data[offset] ^= 1 << random.randrange(8)
    path.write_bytes(bytes(data))


def refused(path, match, host=CPU_HOST):
    with pytest.raises(BundleError, match=match) as opened:
        open_bundle(path, host=host)
    with pytest.raises(BundleError, match=match) as verified:
        verify_bundle(path)
    for error in (opened.value, verified.value):
        assert "\n" not in str(error)


def test_a_good_bundle_opens_and_verifies(bundle_dir):
    verify_bundle(bundle_dir)
    bundle = open_bundle(bundle_dir, host=CPU_HOST)
    assert sorted(p.name for p in bundle.weight_files) == ["model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors"]
    assert set(bundle.load_weights()) == {"embed.weight", "norm.weight", "head.weight"}
    assert bundle.tokenizer_dir == bundle_dir / "tokenizer"


@pytest.mark.parametrize("name", [WEIGHTS, "graph.json", "tokenizer/tokenizer.json"])
def test_a_flipped_byte_is_refused_naming_the_file(bundle_dir, name):
    flip_one_byte(bundle_dir / name)
    refused(bundle_dir, rf"{name}: sha256 mismatch \(the file changed after compile\); rebuild")


def test_hash_check_can_be_skipped_but_structure_cannot(bundle_dir):
    (bundle_dir / "graph.json").write_text('{"edited": true}')
    assert open_bundle(bundle_dir, host=CPU_HOST, verify_hashes=False).graph == {"edited": True}
    (bundle_dir / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin: not listed"):
        open_bundle(bundle_dir, host=CPU_HOST, verify_hashes=False)


@pytest.mark.parametrize("name", ["notes.txt", "weights/model-00003-of-00002.safetensors", "kernels/sm_90.cubin"])
def test_an_added_file_is_refused_naming_it(bundle_dir, name):
    (bundle_dir / name).parent.mkdir(exist_ok=True)
    (bundle_dir / name).write_bytes(torch.randn(4).numpy().tobytes())
    refused(bundle_dir, rf"{name}: not listed in the manifest")


def test_a_symlink_is_refused(bundle_dir, tmp_path):
    (tmp_path / "outside").write_text("x")
    (bundle_dir / "link").symlink_to(tmp_path / "outside")
    refused(bundle_dir, "link: a symlink")


@pytest.mark.parametrize("name", [WEIGHTS, "graph.json", "tokenizer/tokenizer.json"])
def test_a_removed_file_is_refused_naming_it(bundle_dir, name):
    (bundle_dir / name).unlink()
    refused(bundle_dir, rf"{name}: listed in the manifest but missing")


def test_gpu_bundle_on_a_cpu_host_is_refused(tmp_path):
    out = write_bundle(tmp_path / "b", manifest_for("h100", "bfloat16"), {}, None, None)
    with pytest.raises(BundleError) as info:
        open_bundle(out, host=CPU_HOST)
    assert str(info.value) == ("bundle built for h100 (sm_90) but this host has no CUDA GPU (cpu); compile with "
                               "--target cpu or run it on an sm_90 GPU")
    verify_bundle(out)  # build machines verify and inspect bundles for GPUs they do not have
    assert open_bundle(out, host=CPU_HOST, check_host=False).target["arch"] == "sm_90"


def test_gpu_bundle_on_another_gpu_is_refused_naming_both(tmp_path):
    out = write_bundle(tmp_path / "b", manifest_for("h100", "bfloat16"), {}, None, None)
    with pytest.raises(BundleError, match=r"h100 \(sm_90\).*NVIDIA A100-SXM4-80GB \(sm_80\); compile with --target "
                                          r"a100 or run it on an sm_90 GPU"):
        open_bundle(out, host=HostInfo("cuda", (8, 0), "NVIDIA A100-SXM4-80GB"))
    assert open_bundle(out, host=HostInfo("cuda", (9, 0), "NVIDIA H200")).target["name"] == "h100"


def test_cpu_bundle_runs_on_any_host_whose_cpu_has_its_instruction_set(bundle_dir):
    for host in (CPU_HOST, HostInfo("cuda", (7, 5), "Tesla T4"), detect_host()):
        assert open_bundle(bundle_dir, host=host).dtype == "float32"


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_bundle_for_an_instruction_set_the_host_lacks_is_refused_in_one_line(tmp_path, isa):
    out = write_bundle(tmp_path / "b", manifest_for(f"cpu-{isa}"), {}, None, None)
    for host_isa in CPU_ISAS:
        host = HostInfo("cpu", None, "cpu", cpu_isa=host_isa)
        if CPU_ISAS.index(host_isa) >= CPU_ISAS.index(isa):
            assert open_bundle(out, host=host).target["isa"] == isa
            continue
        with pytest.raises(BundleError) as info:
            open_bundle(out, host=host)
        assert str(info.value) == (f"bundle built for cpu-{isa}, which needs {isa} instructions, but this host's CPU "
                                   f"has only {host_isa}; compile with --target cpu on this host (or --target "
                                   f"cpu-{host_isa})")
    assert open_bundle(out, host=HostInfo("cpu", None, "cpu", cpu_isa="baseline"), check_host=False)


def test_a_cpu_bundle_without_a_recorded_instruction_set_runs_on_a_baseline_host(tmp_path):
    manifest = manifest_for("cpu")
    del manifest["target"]["isa"]  # as bundles were written before the ISA was recorded
    out = write_bundle(tmp_path / "b", manifest, {}, None, None)
    assert open_bundle(out, host=HostInfo("cpu", None, "cpu", cpu_isa="baseline")).target["arch"] == "cpu"


def rewrite_manifest(bundle_dir, **changes):
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_newer_format_version_is_refused(bundle_dir):
    rewrite_manifest(bundle_dir, format_version=2)
    refused(bundle_dir, "bundle format v2, this llmc reads v1; rebuild the bundle with llmc compile")


def test_foreign_or_broken_manifest_is_refused(bundle_dir):
    rewrite_manifest(bundle_dir, format="gguf")
    refused(bundle_dir, r"is not an llmc bundle \(manifest format is 'gguf'")
    (bundle_dir / "manifest.json").write_text('{"format": "llmc-bundle", ')
    refused(bundle_dir, "manifest.json is not valid JSON")


def test_manifest_paths_must_stay_inside_the_bundle(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    rewrite_manifest(bundle_dir, files={**manifest["files"], "../escape": "0" * 64})
    refused(bundle_dir, "'../escape' is not a path inside the bundle")


def test_a_manifest_without_required_fields_is_refused(bundle_dir):
    rewrite_manifest(bundle_dir, target="h100")
    refused(bundle_dir, "malformed 'target'")


def test_a_directory_without_manifest_is_refused(tmp_path):
    (tmp_path / "graph.json").write_text("{}")
    refused(tmp_path, r"is not an llmc bundle \(no manifest.json\)")


def test_a_file_is_not_a_bundle(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    refused(tmp_path / "model.safetensors", r"model.safetensors is not an llmc bundle \(not a directory\)")
    refused(tmp_path / "absent", "absent does not exist")


def test_weights_of_a_bundle_without_weights(tmp_path):
    out = write_bundle(tmp_path / "b", manifest_for(), {}, None, None)
    bundle = open_bundle(out, host=CPU_HOST)
    with pytest.raises(BundleError, match="compiled without weights"):
        bundle.load_weights()


def test_iter_weights_streams_one_tensor_at_a_time(bundle_dir):
    bundle = open_bundle(bundle_dir, host=CPU_HOST)
    stream = bundle.iter_weights()
    name, tensor = next(stream)
    assert isinstance(name, str) and tensor.device.type == "cpu"
    assert len(list(stream)) == 2
