"""Loads Hugging Face checkpoint directories into `Transformer`.

Accepts config.json as the Hub publishes it or as transformers 5 writes it, and model.safetensors or shards
listed in model.safetensors.index.json. Tensors are streamed one at a time from the memory-mapped files into the
already allocated parameters, so peak memory is the model plus one tensor, never two copies of the model.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmc.common.errors import LlmcError

from .config import ModelConfig
from .transformer import Transformer


class CheckpointError(LlmcError, ValueError):
    """A checkpoint directory the user pointed at is unusable; the message says why in one line."""


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a checkpoint directory or a registry name")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: no config.json")
    try:
        return ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing field {e.args[0]!r}") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = [path / s for s in shards]
    else:
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(path.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing weight file {missing[0]}")
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors (pickled .bin checkpoints are not loaded, by design)")
    return files


def tensor_names(path: Path) -> list[str]:
    names = []
    for file in weight_files(path):
        with _open(file) as f:
            names.extend(f.keys())
    return names


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a valid safetensors file ({e}); re-download or re-export the checkpoint") from None


def iter_tensors(path: Path, wanted: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every wanted tensor, each read into memory of its own, one at a time.

    Not from safetensors' memory map: it maps each file once and every tensor it returns keeps that one map, so
    the pages of every tensor read stay resident until the last of them is freed. A compile that replaces a
    weight would not get its memory back, and a 16-bit checkpoint cast to float32 held the whole file besides.
    """
    for file in weight_files(path):
        with _open(file) as f:  # validates the header; the data is read below
            names = [name for name in f.keys() if wanted(name)]
        start, header = _header(file)
        with open(file, "rb", buffering=0) as raw:
            for name in names:
                yield name, _read_tensor(raw, start, header[name], file, name)


# safetensors' dtype names (its format spec) -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _header(file: Path) -> tuple[int, dict]:
    """(offset of the data, header): a safetensors file is an 8-byte little-endian header size, the JSON header
    ({name: {dtype, shape, data_offsets [begin, end) relative to the data}}), then the data."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _read_tensor(raw, start: int, entry: dict, file: Path, name: str) -> torch.Tensor:
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {name} has dtype {entry['dtype']}, which llmc does not load")
    begin, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=dtype)
    if end - begin != tensor.numel() * tensor.element_size():
        raise CheckpointError(f"{file}: tensor {name} holds {end - begin} bytes for shape {entry['shape']}; "
                              "re-download or re-export the checkpoint")
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    raw.seek(start + begin)
    done = 0
    while done < len(view):  # one read returns at most about 2 GiB on Linux
        n = raw.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{file} ends inside tensor {name}; re-download or re-export the checkpoint")
        done += n
    return tensor


def our_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def hf_name(our: str) -> str:
    return our if our == "lm_head.weight" else f"model.{our}"


def stream_weights(path: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                   progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(our parameter name, tensor cast to dtype) for every weight of the checkpoint, one tensor at a time.

    Names are checked from the file headers before the first tensor is read: rotary inv_freq, saved by old
    exporters, is recomputed from the config; any other unknown tensor means config.json does not describe these
    weights (more layers, MLP bias, another architecture): refuse, never skip. A tied checkpoint yields only
    embed_tokens.weight.
    """
    path = Path(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = {n for n in params if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    names = [n for n in tensor_names(path) if not n.endswith(".rotary_emb.inv_freq")]
    unexpected = [n for n in names if our_name(n) not in params]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for the "
                              f"{cfg.family} model config.json describes; check config.json matches the weights")
    missing = sorted(wanted - {our_name(n) for n in names})
    if missing:
        raise CheckpointError(f"{path}: missing tensor {hf_name(missing[0])} ({len(missing)} in all)")
    from tqdm import tqdm  # imported here: only the loader's progress needs it

    def stream():  # a nested generator, so that the checks above run at the call, not at the first next()
        tensors = iter_tensors(path, lambda n: our_name(n) in params)
        for stored_name, tensor in tqdm(tensors, total=len(names), desc="loading weights", unit="tensor",
                                        disable=not progress):
            name = our_name(stored_name)
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{path}: tensor {stored_name} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(params[name].shape)}")
            yield name, tensor.to(dtype)

    return stream()


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    progress: bool = False) -> Transformer:
    """Builds the model of a checkpoint directory with its weights, cast to `dtype`."""
    cfg = read_config(path)
    stream = stream_weights(path, cfg, dtype, progress)  # checks every name before model memory is allocated
    with torch.device("meta"):
        model = Transformer(cfg)
    # Cast while on meta: materializing in float32 first would double the peak memory of a bf16 load.
    model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_rope()
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in stream:
            params[name].copy_(tensor)
    return model.eval()


def save_checkpoint(model: Transformer, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Writes `model` as a Hugging Face checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    tensors = {}
    for name, p in model.named_parameters():  # tied lm_head appears once, as embed_tokens
        tensors[hf_name(name)] = p.detach().to(dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
