"""The bundle reader: checks a bundle before touching a byte of its weights, then streams them.

open_bundle checks, in order: the path is a directory with manifest.json; the manifest is JSON of format
"llmc-bundle", version 1, with the fields the runtime needs; every listed file exists; no file is there that
the manifest does not list; the host can run the target; every listed file's sha256 matches. Host
compatibility comes before hashing because it is free and hashing a large bundle is not. verify_bundle does
the same minus the host check (it runs on build machines). The writer is compiler/artifact.py.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from llmc.common.contract import (FORMAT, GRAPH, MANIFEST, TOKENIZER_DIR, WEIGHTS_DIR, Manifest, ManifestError,
                                  sha256_file)
from llmc.common.errors import LlmcError
from llmc.common.targets import Target, describe, host_isa, isa_at_least, targets_with_capability

REBUILD = "rebuild the bundle with llmc compile"


class BundleError(LlmcError):
    pass


@dataclass
class HostInfo:
    device: str  # "cpu" | "cuda"
    capability: tuple[int, int] | None
    name: str
    cpu_isa: str = field(default_factory=host_isa)  # what the host's CPU runs (llmc.common.targets.CPU_ISAS)


def detect_host() -> HostInfo:
    if torch.cuda.is_available():
        return HostInfo("cuda", tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name())
    return HostInfo("cpu", None, "cpu")


class Bundle:
    """An opened, verified bundle. Weights are read only on iter_weights / load_weights."""

    def __init__(self, path: Path, manifest: dict, graph: dict):
        self.path = path
        self.manifest = manifest
        self.graph = graph

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, target={self.target['name']}, dtype={self.dtype})"

    @property
    def config(self) -> dict:
        return self.manifest["model"]

    @property
    def target(self) -> dict:
        return self.manifest["target"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def has_weights(self) -> bool:
        return self.manifest["has_weights"]

    @property
    def tokenizer_dir(self) -> Path | None:
        listed = any(name.startswith(f"{TOKENIZER_DIR}/") for name in self.manifest["files"])
        return self.path / TOKENIZER_DIR if listed else None

    @property
    def weight_files(self) -> list[Path]:
        return [self.path / name for name in sorted(self.manifest["files"])
                if name.startswith(f"{WEIGHTS_DIR}/") and name.endswith(".safetensors")]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (a tied one counted once), read from the shards' headers: what a
        loaded engine holds for its weights."""
        return sum(end - begin for shard in self.weight_files
                   for name, entry in _safetensors_header(shard).items() if name != "__metadata__"
                   for begin, end in [entry["data_offsets"]])

    def iter_weights(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time from the shards; a tied name comes right after the tensor it shares."""
        if not self.has_weights:
            raise BundleError(f"{self.path} was compiled without weights; compile it from a checkpoint to run it")
        aliases_of = defaultdict(list)
        for alias, stored in self.manifest.get("weight_aliases", {}).items():
            aliases_of[stored].append(alias)
        unresolved = set(aliases_of)
        for shard in self.weight_files:
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor
                    for alias in aliases_of.get(name, ()):
                        yield alias, tensor
                    unresolved.discard(name)
        if unresolved:
            raise BundleError(f"{self.path}: weight_aliases name {sorted(unresolved)[0]}, which no shard holds; "
                              f"{REBUILD}")

    def load_weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return dict(self.iter_weights(device))


def open_bundle(path: str | Path, host: HostInfo | None = None, verify_hashes: bool = True,
                check_host: bool = True) -> Bundle:
    """check_host=False is for reading a bundle without running it (llmc inspect on a build machine)."""
    path = Path(path)
    manifest = _check_layout(path)
    if check_host:
        _check_host(manifest, host if host is not None else detect_host())
    if verify_hashes:
        _check_hashes(path, manifest)
    return Bundle(path, manifest, _read_graph(path))


def verify_bundle(path: str | Path) -> None:
    """Every check of open_bundle except host compatibility; raises BundleError on the first problem."""
    path = Path(path)
    manifest = _check_layout(path)
    _check_hashes(path, manifest)
    _read_graph(path)


def _safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (8 bytes of little-endian size, then the header)."""
    with open(file, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def _check_layout(path: Path) -> dict:
    if not path.exists():
        raise BundleError(f"{path} does not exist; compile a bundle with llmc compile")
    if not path.is_dir():
        raise BundleError(f"{path} is not an llmc bundle (not a directory)")
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not an llmc bundle (no {MANIFEST})")
    manifest = _read_manifest(path)
    _check_listed_files(path, manifest["files"])
    _check_unlisted_files(path, manifest["files"])
    return manifest


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path / MANIFEST} is not valid JSON ({e}); {REBUILD}") from None
    try:
        Manifest.from_json(manifest)  # the format, its version and every required field, checked once
    except ManifestError as e:
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{path} is not an llmc bundle ({e})") from None
        raise BundleError(f"{path / MANIFEST}: {e}; {REBUILD}") from None
    if not isinstance(manifest.get("weight_aliases", {}), dict):
        raise BundleError(f"{path / MANIFEST}: malformed 'weight_aliases'; {REBUILD}")
    try:
        Target.from_dict(manifest["target"])
    except ValueError as e:
        raise BundleError(f"{path / MANIFEST}: {e}; {REBUILD}") from None
    if GRAPH not in manifest["files"]:
        raise BundleError(f"{path / MANIFEST} lists no {GRAPH}; {REBUILD}")
    for name, digest in manifest["files"].items():
        pure = PurePosixPath(name)
        # A listed name must stay inside the bundle: hashing "../x" would read outside it.
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or name == MANIFEST:
            raise BundleError(f"{path / MANIFEST}: file entry {name!r} is not a path inside the bundle; {REBUILD}")
        if not isinstance(digest, str):
            raise BundleError(f"{path / MANIFEST}: file entry {name!r} has no sha256; {REBUILD}")
    return manifest


def _check_listed_files(path: Path, files: dict) -> None:
    for name in sorted(files):
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: listed in the manifest but missing; {REBUILD}")


def _check_unlisted_files(path: Path, files: dict) -> None:
    for directory, subdirectories, filenames in os.walk(path):
        relative = Path(directory).relative_to(path)
        for entry in sorted([*subdirectories, *filenames]):
            full = Path(directory) / entry
            name = (relative / entry).as_posix()
            if full.is_symlink():
                raise BundleError(f"{full}: a symlink; a bundle holds plain files only: {REBUILD}")
            if entry in filenames and name not in files and name != MANIFEST:
                raise BundleError(f"{full}: not listed in the manifest (added after compile); remove it or "
                                  f"{REBUILD}")


def _check_hashes(path: Path, manifest: dict) -> None:
    for name, expected in sorted(manifest["files"].items()):
        if sha256_file(path / name) != expected:
            raise BundleError(f"{path / name}: sha256 mismatch (the file changed after compile); {REBUILD}")


def _check_host(manifest: dict, host: HostInfo) -> None:
    target = Target.from_dict(manifest["target"])
    if not target.is_gpu:
        if not isa_at_least(host.cpu_isa, target.isa):
            raise BundleError(f"bundle built for {describe(target)}, which needs {target.isa} instructions, but this "
                              f"host's CPU has only {host.cpu_isa}; compile with --target cpu on this host (or "
                              f"--target cpu-{host.cpu_isa})")
        return
    built_for = f"bundle built for {describe(target)}"
    if host.device != "cuda" or host.capability is None:
        raise BundleError(f"{built_for} but this host has no CUDA GPU ({host.name}); compile with --target cpu "
                          f"or run it on an {target.arch} GPU")
    capability = tuple(host.capability)
    if capability != target.capability:
        host_arch = f"sm_{capability[0]}{capability[1]}"
        same_arch = [t.name for t in targets_with_capability(capability)]
        rebuild = f"compile with --target {same_arch[0]}" if same_arch else f"compile for {host_arch}"
        raise BundleError(f"{built_for} but this host's GPU is {host.name} ({host_arch}); {rebuild} or run it "
                          f"on an {target.arch} GPU")


def _read_graph(path: Path) -> dict:
    try:
        return json.loads((path / GRAPH).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path / GRAPH} is not valid JSON ({e}); {REBUILD}") from None
