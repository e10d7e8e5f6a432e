"""The tensorrt backend: an engine built from the bundle's ONNX on the inference host, and the graph that runs it.

TensorRT builds for the GPU it runs on, so a bundle compiled elsewhere holds onnx/model.onnx and the builder
settings (tensorrt/settings.json, from codegen/tensorrt.py); `llmc build-engine BUNDLE` or the first load on the
GPU host builds tensorrt/engine-sm_XY.plan, keeps the kernel timings in tensorrt/timing.cache for the next build,
records the TensorRT version and compute capability in tensorrt/engine.json, and lists the new files in the
manifest so the bundle still verifies. Loading checks that record against the host and refuses a mismatch.

TensorRTGraph runs the engine with the engine's graph signature: torch tensors bound by address, outputs
allocated by torch, on torch's current stream. One execution context per optimization profile (decode, prefill).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmc.common.contract import (EXPORTED_INPUTS, MANIFEST, STEP_OUTPUTS, read_manifest, sha256_file, write_atomically,
                                  write_manifest)
from llmc.common.errors import UsageError
from llmc.runtime.bundle import BundleError, HostInfo, detect_host, open_bundle

TENSORRT_DIR = "tensorrt"
SETTINGS = f"{TENSORRT_DIR}/settings.json"
TIMING_CACHE = f"{TENSORRT_DIR}/timing.cache"
ENGINE_RECORD = f"{TENSORRT_DIR}/engine.json"
INSTALL = "pip install llmc[tensorrt] on a host with an NVIDIA GPU"


class TensorRTError(BundleError):
    pass


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise TensorRTError(f"--backend tensorrt needs TensorRT, which is not installed; {INSTALL}") from None
    return tensorrt


def plan_name(capability: tuple[int, int]) -> str:
    return f"{TENSORRT_DIR}/engine-sm_{capability[0]}{capability[1]}.plan"


def check_engine(bundle_path: str | Path, host: HostInfo | None = None, tensorrt_version: str | None = None) -> Path:
    """The bundle's engine plan for this host; raises TensorRTError (one line) when the bundle has none, or when
    the TensorRT version or compute capability recorded at build differs from the host's. tensorrt_version: the
    host's (default: the installed one)."""
    bundle_path = Path(bundle_path)
    host = host if host is not None else detect_host()
    rebuild = f"rebuild with llmc build-engine {bundle_path}"
    record_path = bundle_path / ENGINE_RECORD
    if not record_path.is_file():
        raise TensorRTError(f"{bundle_path} holds no TensorRT engine; build it on the GPU host with llmc "
                            f"build-engine {bundle_path}")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        built_version, built_capability = record["tensorrt_version"], tuple(record["compute_capability"])
        plan = bundle_path / record["plan"]
    except (ValueError, KeyError, TypeError):
        raise TensorRTError(f"{record_path} is malformed; {rebuild}") from None
    if host.device != "cuda" or host.capability is None:
        raise TensorRTError(f"{bundle_path}: a TensorRT engine runs on an NVIDIA GPU and this host has none "
                            f"({host.name})")
    host_version = tensorrt_version if tensorrt_version is not None else import_tensorrt().__version__
    if built_version != host_version:
        raise TensorRTError(f"{bundle_path}: the TensorRT engine was built with TensorRT {built_version} but this "
                            f"host has TensorRT {host_version}; {rebuild}")
    capability = tuple(host.capability)
    # An ampere_plus engine runs on any Ampere or newer GPU; any other engine only on the GPU it was built on.
    fits = capability >= (8, 0) if record.get("hardware_compatibility_level") == "ampere_plus" \
        else capability == built_capability
    if not fits:
        raise TensorRTError(f"{bundle_path}: the TensorRT engine was built for sm_{built_capability[0]}"
                            f"{built_capability[1]} but this host's GPU is {host.name} (sm_{capability[0]}"
                            f"{capability[1]}); {rebuild}")
    if not plan.is_file():
        raise TensorRTError(f"{plan} is missing; {rebuild}")
    return plan


def build_engine(bundle_path: str | Path) -> Path:
    """Builds the bundle's TensorRT engine on this host's GPU and returns the plan's path (see module doc)."""
    bundle_path = Path(bundle_path)
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise TensorRTError(f"building a TensorRT engine needs an NVIDIA GPU and this host has none; run llmc "
                            f"build-engine {bundle_path} on the inference host")
    _remove_unlisted_outputs(bundle_path)
    bundle = open_bundle(bundle_path)
    settings_path = bundle_path / SETTINGS
    if SETTINGS not in bundle.manifest["files"] or "onnx" not in bundle.manifest:
        raise TensorRTError(f"{bundle_path} was not compiled for TensorRT (no {SETTINGS} or ONNX); recompile it "
                            f"with llmc compile --backend tensorrt")
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    capability = tuple(torch.cuda.get_device_capability())
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if settings["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle_path / bundle.manifest["onnx"]["file"]
    if not parser.parse_from_file(str(onnx_path)):  # external data is read next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    _apply_settings(trt, builder, config, settings)
    timing_path = bundle_path / TIMING_CACHE
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if not config.set_timing_cache(timing, ignore_mismatch=False):
        # Timed on another GPU or TensorRT: its entries would mislead the kernel choice, so start afresh.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan = plan_name(capability)
    record = {"tensorrt_version": trt.__version__, "compute_capability": list(capability), "plan": plan,
              "hardware_compatibility_level": settings["hardware_compatibility_level"],
              "gpu": torch.cuda.get_device_name()}
    # Old outputs leave the manifest before new ones are written: an interruption then leaves unlisted files,
    # which the next build removes, never a listed file whose hash no longer matches (which would block it).
    old = [name for name in bundle.manifest["files"] if _is_plan(name) or name in (TIMING_CACHE, ENGINE_RECORD)]
    record_files(bundle_path, [], removed=old)
    for name in old:
        (bundle_path / name).unlink(missing_ok=True)
    write_atomically(bundle_path / plan, memoryview(serialized))
    write_atomically(timing_path, memoryview(config.get_timing_cache().serialize()))
    write_atomically(bundle_path / ENGINE_RECORD, (json.dumps(record, indent=2) + "\n").encode())
    record_files(bundle_path, [plan, TIMING_CACHE, ENGINE_RECORD])
    return bundle_path / plan


def build_engine_cli(path: str | Path) -> str:
    """`llmc build-engine PATH`: builds the engine and returns the line to print."""
    plan = build_engine(path)
    return f"built {plan} ({plan.stat().st_size / (1 << 20):.1f} MiB)"


def record_files(bundle_path: Path, names: list[str], removed: list[str] = ()) -> None:
    """Lists `names` (files already in place) in the manifest with their sha256 and drops `removed`; the new
    manifest replaces the old in one rename (the contract's writer), so a reader sees one or the other."""
    manifest = read_manifest(bundle_path)
    for name in removed:
        manifest.files.pop(name, None)
    for name in names:
        manifest.files[name] = sha256_file(Path(bundle_path) / name)
    manifest.files = dict(sorted(manifest.files.items()))
    write_manifest(bundle_path, manifest)


def load_graphs(bundle, device: torch.device) -> dict:
    """The prefill and decode graphs of an opened bundle's engine, built first when the bundle has none."""
    if device.type != "cuda":
        raise TensorRTError(f"a TensorRT engine runs on an NVIDIA GPU, not {device}; load the bundle with "
                            f"device='cuda' or compile it with --backend onnx for the CPU")
    trt = import_tensorrt()
    if not (bundle.path / ENGINE_RECORD).is_file():
        build_engine(bundle.path)
    plan = check_engine(bundle.path, detect_host(), trt.__version__)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise TensorRTError(f"TensorRT could not load {plan}; rebuild with llmc build-engine {bundle.path}")
    settings = json.loads((bundle.path / SETTINGS).read_text(encoding="utf-8"))
    graphs = {}
    for index, spec in enumerate(settings["profiles"]):
        graphs[spec["name"]] = TensorRTGraph(trt, engine, index, device, spec["shapes"]["k_cache"]["max"][1])
        graphs[spec["name"]].runtime = runtime  # the runtime must outlive its engine
    return {kind: graphs[kind] for kind in ("prefill", "decode")}


class TensorRTGraph:
    """Callable with the engine's graph signature (slot_mapping ignored: the graph does not write the cache),
    running `engine` under optimization profile `profile`."""

    def __init__(self, trt, engine, profile: int, device: torch.device, max_cache_blocks: int):
        self.engine, self.device, self.max_cache_blocks = engine, torch.device(device), max_cache_blocks
        self.context = engine.create_execution_context()
        if self.context is None:
            raise TensorRTError("TensorRT could not create an execution context (out of GPU memory?)")
        self.context.set_optimization_profile_async(profile, torch.cuda.current_stream(self.device).cuda_stream)
        dtypes = _torch_dtypes(trt)
        self.output_dtypes = {name: dtypes[engine.get_tensor_dtype(name)] for name in STEP_OUTPUTS}

    def __call__(self, input_ids, positions, k_cache, v_cache, block_table, past_lens, last_index,
                 slot_mapping=None):
        if k_cache.shape[1] > self.max_cache_blocks:
            raise UsageError(f"the KV cache has {k_cache.shape[1]} blocks but the TensorRT engine takes at most "
                             f"{self.max_cache_blocks}; give the KV cache less memory (--kv-cache-memory)")
        stream = torch.cuda.current_stream(self.device)
        bound = []  # keeps any contiguous copy alive until the engine has run; the engine's inputs are contiguous
        for name, tensor in zip(EXPORTED_INPUTS, (input_ids, positions, k_cache, v_cache, block_table, past_lens,
                                              last_index)):
            tensor = tensor.contiguous()
            bound.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in STEP_OUTPUTS:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.output_dtypes[name],
                              device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine (see its log above)")
        return tuple(outputs)


def _apply_settings(trt, builder, config, settings: dict) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_bytes"])
    config.builder_optimization_level = settings["builder_optimization_level"]
    if settings["hardware_compatibility_level"] == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if settings["dtype"] == "float32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 GEMMs (on by default) would round an fp32 model's inputs
    if not settings["strongly_typed"]:  # precision flags are refused by (and meaningless for) typed networks
        for flag in settings["precision_flags"]:
            if not hasattr(trt.BuilderFlag, flag.upper()):
                raise TensorRTError(f"TensorRT {trt.__version__} has no {flag} builder flag (weak typing is gone); "
                                    f"recompile with strongly typed TensorRT settings (the default)")
            config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    for spec in settings["profiles"]:
        profile = builder.create_optimization_profile()
        for name, shapes in spec["shapes"].items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)


def _torch_dtypes(trt) -> dict:
    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT64", torch.int64),
             ("INT32", torch.int32), ("INT8", torch.int8), ("BOOL", torch.bool), ("FP8", torch.float8_e4m3fn)]
    return {getattr(trt.DataType, name): dtype for name, dtype in pairs if hasattr(trt.DataType, name)}


def _is_plan(name: str) -> bool:
    return name.startswith(f"{TENSORRT_DIR}/engine-") and name.endswith(".plan")


def _remove_unlisted_outputs(bundle_path: Path) -> None:
    """Deletes engine files an interrupted build left unlisted, which would otherwise make the bundle refuse to
    open (it holds no file its manifest does not list)."""
    directory = bundle_path / TENSORRT_DIR
    if not directory.is_dir() or not (bundle_path / MANIFEST).is_file():
        return
    try:
        listed = json.loads((bundle_path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return  # open_bundle names the problem
    for path in [*directory.iterdir(), *bundle_path.glob(".tmp-*")]:
        name = path.relative_to(bundle_path).as_posix()
        ours = _is_plan(name) or name in (TIMING_CACHE, ENGINE_RECORD) or path.name.startswith(".tmp-")
        if ours and name not in listed and path.is_file():
            path.unlink()
