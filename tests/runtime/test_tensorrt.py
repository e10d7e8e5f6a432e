"""The tensorrt backend: the install message without TensorRT, the engine record checked against the host,
manifest updates that keep the bundle verifiable; and on a GPU host with TensorRT (@pytest.mark.gpu) a real
engine built from the toy ONNX, run against torch and through the engine."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import llmc
from llmc.codegen.tensorrt import build_settings
from llmc.common.targets import targets_with_capability
from llmc.runtime.bundle import HostInfo, open_bundle, verify_bundle
from llmc.runtime.tensorrt import (ENGINE_RECORD, SETTINGS, TIMING_CACHE, TensorRTError, _remove_unlisted_outputs,
                                   build_engine, check_engine, import_tensorrt, load_graphs, record_files)


def _load_toy_onnx_helpers():
    """test_onnx.py's toy model and bundle writer (tests share no package: importlib mode, no __init__.py)."""
    spec = importlib.util.spec_from_file_location("toy_onnx", Path(__file__).with_name("test_onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = _load_toy_onnx_helpers()
H100 = HostInfo("cuda", (9, 0), "NVIDIA H100")


def write_record(bundle, version="10.7.0", capability=(9, 0), level="none"):
    plan = f"tensorrt/engine-sm_{capability[0]}{capability[1]}.plan"
    (bundle / "tensorrt").mkdir(exist_ok=True)
    (bundle / plan).write_bytes(bytes(range(256)))
    (bundle / ENGINE_RECORD).write_text(json.dumps({"tensorrt_version": version,
                                                    "compute_capability": list(capability), "plan": plan,
                                                    "hardware_compatibility_level": level}))
    return bundle / plan


@pytest.fixture
def without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_without_tensorrt_the_error_names_the_install(tmp_path, without_tensorrt):
    for call in (import_tensorrt, lambda: build_engine(tmp_path)):
        with pytest.raises(TensorRTError, match=r"not installed; pip install llmc\[tensorrt\] on a host with an "
                                                r"NVIDIA GPU") as raised:
            call()
        assert "\n" not in str(raised.value)


def test_the_engine_record_is_checked_against_the_host(tmp_path):
    bundle = tmp_path / "b.llmc"
    bundle.mkdir()
    with pytest.raises(TensorRTError, match="holds no TensorRT engine; build it on the GPU host with llmc build-en"):
        check_engine(bundle, H100, "10.7.0")
    plan = write_record(bundle)
    assert check_engine(bundle, H100, "10.7.0") == plan
    rebuild = f"rebuild with llmc build-engine {bundle}$"
    with pytest.raises(TensorRTError, match=f"built with TensorRT 10.7.0 but this host has TensorRT 10.8.0; {rebuild}"):
        check_engine(bundle, H100, "10.8.0")
    a100 = HostInfo("cuda", (8, 0), "NVIDIA A100")
    with pytest.raises(TensorRTError, match=f"for sm_90 but this host's GPU is NVIDIA A100 \\(sm_80\\); {rebuild}"):
        check_engine(bundle, a100, "10.7.0")
    with pytest.raises(TensorRTError, match="runs on an NVIDIA GPU and this host has none"):
        check_engine(bundle, HostInfo("cpu", None, "cpu"), "10.7.0")
    plan.unlink()
    with pytest.raises(TensorRTError, match=f"engine-sm_90.plan is missing; {rebuild}"):
        check_engine(bundle, H100, "10.7.0")
    (bundle / ENGINE_RECORD).write_text("{not json")
    with pytest.raises(TensorRTError, match=f"engine.json is malformed; {rebuild}"):
        check_engine(bundle, H100, "10.7.0")


def test_an_ampere_plus_engine_runs_on_any_ampere_or_newer_gpu(tmp_path):
    plan = write_record(tmp_path, capability=(8, 0), level="ampere_plus")
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0)):
        assert check_engine(tmp_path, HostInfo("cuda", capability, "gpu"), "10.7.0") == plan
    with pytest.raises(TensorRTError, match="built for sm_80 but this host's GPU is T4 \\(sm_75\\)"):
        check_engine(tmp_path, HostInfo("cuda", (7, 5), "T4"), "10.7.0")


def test_recorded_files_keep_the_bundle_verifiable(tmp_path):
    bundle = toy.write_onnx_bundle(tmp_path / "toy.llmc", toy.toy_weights())
    old = write_record(bundle, capability=(8, 0))
    record_files(bundle, [old.relative_to(bundle).as_posix(), ENGINE_RECORD])
    verify_bundle(bundle)
    # A rebuild for another GPU: the new plan listed, the old one dropped from the manifest and deleted.
    new = write_record(bundle, capability=(9, 0))
    (bundle / TIMING_CACHE).write_bytes(torch.randint(0, 256, (64,), dtype=torch.uint8).numpy().tobytes())
    record_files(bundle, [new.relative_to(bundle).as_posix(), TIMING_CACHE, ENGINE_RECORD],
                 removed=[old.relative_to(bundle).as_posix()])
    old.unlink()
    verify_bundle(bundle)
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    assert "tensorrt/engine-sm_90.plan" in files and "tensorrt/engine-sm_80.plan" not in files
    assert not list(bundle.glob(".tmp-*")) and not list((bundle / "tensorrt").glob(".tmp-*"))


def test_an_interrupted_builds_leftovers_are_removed_and_nothing_else(tmp_path):
    bundle = toy.write_onnx_bundle(tmp_path / "toy.llmc", toy.toy_weights())
    listed = write_record(bundle, capability=(8, 0))
    record_files(bundle, [listed.relative_to(bundle).as_posix()])
    (bundle / ENGINE_RECORD).unlink()
    leftovers = [bundle / "tensorrt" / "engine-sm_90.plan", bundle / TIMING_CACHE, bundle / "tensorrt" / ".tmp-a1",
                 bundle / ".tmp-b2"]
    foreign = bundle / "tensorrt" / "notes.txt"
    for path in [*leftovers, foreign]:
        path.write_bytes(b"x")
    _remove_unlisted_outputs(bundle)
    assert [p.exists() for p in leftovers] == [False] * len(leftovers)
    assert listed.exists() and foreign.exists()


def test_a_cpu_device_is_refused_before_tensorrt_is_needed(tmp_path, without_tensorrt):
    bundle = open_bundle(toy.write_onnx_bundle(tmp_path / "toy.llmc", toy.toy_weights()))
    with pytest.raises(TensorRTError, match="runs on an NVIDIA GPU, not cpu"):
        load_graphs(bundle, torch.device("cpu"))


# --- on a GPU host with TensorRT -------------------------------------------------------------------------------

def gpu_and_tensorrt():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install llmc[tensorrt])")


def write_tensorrt_bundle(path, w):
    """The toy ONNX bundle (float32) turned into a tensorrt one for this host's GPU."""
    targets = targets_with_capability(torch.cuda.get_device_capability())
    if not targets:
        pytest.skip(f"no llmc target has this GPU's compute capability {torch.cuda.get_device_capability()}")
    bundle = toy.write_onnx_bundle(path, w)
    settings = build_settings(targets[0], "float32", max_batch=3, max_seq_len=40, block_size=4, num_layers=toy.L,
                              num_kv_heads=toy.H, head_dim=toy.D, max_cache_blocks=64)
    (bundle / SETTINGS).write_text(json.dumps(settings))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(backend="tensorrt", target=targets[0].to_dict())
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    record_files(bundle, [SETTINGS])
    return bundle


@pytest.mark.gpu
def test_engine_built_on_the_gpu_matches_torch_and_runs_generation(tmp_path):
    trt = gpu_and_tensorrt()
    w = toy.toy_weights()
    gpu_w = {k: v.cuda() for k, v in w.items()}
    bundle = write_tensorrt_bundle(tmp_path / "toy.llmc", w)
    plan = build_engine(bundle)
    verify_bundle(bundle)
    record = json.loads((bundle / ENGINE_RECORD).read_text())
    assert record["tensorrt_version"] == trt.__version__
    assert tuple(record["compute_capability"]) == torch.cuda.get_device_capability()
    assert (bundle / TIMING_CACHE).stat().st_size > 0
    assert check_engine(bundle) == plan
    graphs = load_graphs(open_bundle(bundle), torch.device("cuda"))
    for kind, (batch, seq) in (("decode", (3, 1)), ("prefill", (2, 9)), ("prefill", (1, 1))):
        step = [t.cuda() for t in toy.random_step(torch.float32, batch, seq)]
        got = graphs[kind](*step)
        for name, g, r in zip(("logits", "new_k", "new_v"), got, toy.toy_reference(gpu_w, torch.float32, *step)):
            torch.testing.assert_close(g, r, **toy.TOLERANCE[torch.float32], msg=name)
    engine = llmc.load(bundle, device="cuda", kv_cache_tokens=64, max_batch=3, prefill_chunk=6)
    prompts = [torch.randint(0, toy.V, (n,)).tolist() for n in (3, 11, 7)]
    got = engine.generate(prompts, max_new_tokens=5)
    reference = lambda *step: toy.toy_reference(gpu_w, torch.float32, *step)  # noqa: E731
    engine.graphs = {"prefill": reference, "decode": reference}
    assert engine.generate(prompts, max_new_tokens=5) == got
    # A second build starts from the kept timing cache and leaves one plan, still listed and verifiable.
    assert build_engine(bundle) == plan
    verify_bundle(bundle)
