"""The bundle writer: manifest.json + graph.json + weights/*.safetensors + kernels/ + tokenizer/, atomically.

Everything goes into a hidden sibling of `out` (same parent, so the final rename is atomic on one file
system); manifest.json, which holds the sha256 of every other file, is written last. A failure or a
KeyboardInterrupt at any point removes the staging directory and leaves `out` as it was. The reader is
runtime/bundle.py; the two share the format through llmc.common.contract (runtime never imports compiler), and
the round-trip tests keep them in step.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file
from tqdm import tqdm

# The format's names, fields and hashing are the contract's, which the reader (runtime/bundle.py) uses too.
from llmc.common.contract import (FORMAT, FORMAT_VERSION, GRAPH, KERNELS_DIR, MANIFEST, REQUIRED, TOKENIZER_DIR,
                                  TOKENIZER_FILES, WEIGHTS_DIR, Manifest, ManifestError, sha256_file)
from llmc.common.errors import LlmcError
from llmc.common.targets import Target, resolve_dtype


class BundleWriteError(LlmcError, ValueError):
    pass


def toolchain_versions() -> dict:
    """Versions of what built the bundle; optional packages are looked up by metadata, never imported."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "triton"):
        if importlib.util.find_spec(package) is not None:
            versions[package] = importlib.metadata.version(package)
    return versions


def write_bundle(out: Path, manifest: dict, graph: dict, weights: Iterable[tuple[str, torch.Tensor]] | None,
                 tokenizer_dir: Path | None, overwrite: bool = False, shard_bytes: int = 2 << 30,
                 progress: bool = False, extra_files: Mapping[str, bytes] | None = None,
                 moved_files: Mapping[str, Path] | None = None) -> Path:
    """Writes the bundle directory `out` and returns it.

    `manifest` holds the fields of format v1 except format, format_version, created and files (added here);
    llmc_version and toolchain are filled in when absent; has_weights follows `weights`. Weights are consumed
    one shard at a time; a tensor that is exactly another one already written (tied embeddings) is stored
    once and listed under "weight_aliases" {name: stored name}. `extra_files` maps POSIX paths relative to
    kernels/ to their bytes (codegen/triton/aot.py's kernel_files); they are hashed like every other file.
    `moved_files` maps POSIX paths relative to the bundle to files written elsewhere on the same file system (the
    ONNX export, which may be gigabytes): they are moved in, not copied.
    """
    out = Path(out)
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    check_destination(out, overwrite)
    _check_extra_files(extra_files or {})
    _check_moved_files(moved_files or {})
    # An ONNX bundle's weights are the model's external data (a moved file), not safetensors shards.
    manifest = _complete_manifest(manifest, has_weights=weights is not None or bool(manifest.get("weights_in")))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_json(staging / GRAPH, graph)
        aliases = {}
        if weights is not None:
            aliases = _write_weights(staging / WEIGHTS_DIR, weights, shard_bytes, progress)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), staging / TOKENIZER_DIR)
        for relative, content in (extra_files or {}).items():
            path = staging / KERNELS_DIR / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        for relative, source in (moved_files or {}).items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, staging / relative)
        manifest["weight_aliases"] = aliases
        manifest["files"] = _hash_and_sync(staging)
        _write_json(staging / MANIFEST, manifest, indent=2)
        _fsync(staging / MANIFEST)
        _fsync(staging)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuses an output path write_bundle would refuse; compile calls it before the slow steps."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise BundleWriteError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    # --overwrite replaces old bundles only: a mistyped --out must never wipe an unrelated directory.
    if out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or _is_bundle(out)):
        return
    raise BundleWriteError(f"{out} exists and is not an llmc bundle; refusing to replace it: choose another --out")


def _check_moved_files(moved_files: Mapping[str, Path]) -> None:
    reserved = {MANIFEST, GRAPH, WEIGHTS_DIR, KERNELS_DIR, TOKENIZER_DIR}
    for relative, source in moved_files.items():
        pure = PurePosixPath(relative)
        if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\\" in relative or pure.parts[0] in reserved:
            raise ValueError(f"moved file {relative!r} must be a relative path outside the bundle's own entries")
        if not Path(source).is_file():
            raise ValueError(f"moved file {relative!r}: {source} is not a file")


def _check_extra_files(extra_files: Mapping[str, bytes]) -> None:
    for relative, content in extra_files.items():
        pure = PurePosixPath(relative)
        # The same rule the reader applies to manifest entries: a name must stay inside kernels/.
        if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\\" in relative or relative.endswith("/"):
            raise ValueError(f"extra file {relative!r} is not a relative path inside {KERNELS_DIR}/")
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise TypeError(f"extra file {relative!r} is a {type(content).__name__}, not bytes")


def _is_bundle(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _complete_manifest(given: dict, has_weights: bool) -> dict:
    """The manifest to write: `given` plus what the writer owns (format, version, creation, weights, files: filled
    in once hashed), checked against the contract's required fields."""
    missing = [key for key in REQUIRED if key not in given and key not in ("has_weights", "files")]
    if missing:
        raise ValueError(f"bundle manifest lacks {', '.join(missing)}")
    target = Target.from_dict(given["target"])
    dtype = given["dtype"]
    if resolve_dtype(target, dtype) != dtype:  # raises when the target cannot run dtype at all
        raise ValueError(f"manifest dtype {dtype!r} is an alias; write {resolve_dtype(target, dtype)!r}")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llmc_version": given.get("llmc_version", importlib.metadata.version("llmc")),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update({k: v for k, v in given.items() if k not in ("format", "format_version", "created", "files")})
    manifest["has_weights"] = has_weights
    manifest.setdefault("toolchain", toolchain_versions())
    try:
        Manifest.from_json({**manifest, "files": {}})  # the fields' types, as the reader will check them
    except ManifestError as e:
        raise ValueError(f"bundle manifest: {e}") from None
    return manifest


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


class _ShardWriter:
    """Collects tensors until the next one would push the shard past `shard_bytes`, then saves the shard.

    Shard files get their final names (model-0000i-of-0000N) in close(), once N is known.
    """

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.pending_storages: set[int] = set()
        self.parts: list[Path] = []
        self.names: set[str] = set()
        self.aliases: dict[str, str] = {}
        # identity -> (stored name, weakref to the caller's tensor). While that tensor lives, no other tensor
        # can have the same address, so an identity hit is the same memory; once it dies the address may be
        # reused, and a dead reference is not trusted.
        self.written: dict[tuple, tuple[str, weakref.ref]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> int:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, not a tensor")
        if name in self.names:
            raise ValueError(f"weight {name!r} is given twice")
        if tensor.device.type == "meta":
            raise BundleWriteError(f"weight {name} has no data (meta device); compile from a checkpoint with "
                                   "weights, or without weights")
        self.names.add(name)
        identity = (str(tensor.device), tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel():
            hit = self.written.get(identity)
            if hit is not None and hit[1]() is not None:
                self.aliases[name] = hit[0]
                return 0
            self.written[identity] = (name, weakref.ref(tensor))
        data = tensor.detach()
        if not data.is_contiguous():
            data = data.contiguous()
        nbytes = data.numel() * data.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        storage = data.untyped_storage().data_ptr()
        if data.numel() and storage in self.pending_storages:
            data = data.clone()  # safetensors refuses two tensors of one storage in a file (qkv slices, say)
            storage = data.untyped_storage().data_ptr()
        self.pending_storages.add(storage)
        self.pending[name] = data
        self.pending_bytes += nbytes
        return nbytes

    def _flush(self) -> None:
        part = self.directory / f"part-{len(self.parts) + 1:05d}.tmp"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.parts.append(part)
        self.pending, self.pending_bytes, self.pending_storages = {}, 0, set()

    def close(self) -> None:
        if self.pending:
            self._flush()
        if not self.parts:
            raise BundleWriteError("the weights iterator yielded no tensors; pass weights=None for a bundle "
                                   "without weights")
        total = len(self.parts)
        for i, part in enumerate(self.parts, 1):
            part.rename(self.directory / f"model-{i:05d}-of-{total:05d}.safetensors")


def _write_weights(directory: Path, weights: Iterable[tuple[str, torch.Tensor]], shard_bytes: int,
                   progress: bool) -> dict[str, str]:
    directory.mkdir()
    writer = _ShardWriter(directory, shard_bytes)
    with tqdm(desc="writing weights", unit="B", unit_scale=True, disable=not progress) as bar:
        for name, tensor in weights:
            bar.update(writer.add(name, tensor))
        writer.close()
    return writer.aliases


def _copy_tokenizer(source: Path, destination: Path) -> None:
    if not source.is_dir():
        raise BundleWriteError(f"tokenizer directory {source} does not exist")
    present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not present:
        raise BundleWriteError(f"{source} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    destination.mkdir()
    for name in present:
        shutil.copyfile(source / name, destination / name)


def _hash_and_sync(root: Path) -> dict[str, str]:
    """sha256 of every file under root (POSIX relative paths, sorted); each file is flushed to disk too."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        _fsync(path)
        files[path.relative_to(root).as_posix()] = sha256_file(path)
    for directory in (p for p in root.rglob("*") if p.is_dir()):
        _fsync(directory)
    return files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    # Two renames are not one atomic swap, but at every instant one complete bundle exists (old or new), and
    # a failed second rename puts the old one back.
    retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)
