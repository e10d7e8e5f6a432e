"""llmc.common.contract: the typed manifest round-trips, refuses what the reader refuses (each required field
missing or of the wrong type), and is rewritten in one rename; the engine finds a KV writer's layer by name."""
import json

import pytest

from llmc.common import contract
from llmc.common.contract import REQUIRED, Manifest, ManifestError, read_manifest, write_manifest
from llmc.common.targets import get_target


def manifest_json() -> dict:
    return {"format": "llmc-bundle", "format_version": 1, "model": {"name": "m"}, "target": get_target("cpu").to_dict(),
            "dtype": "float32", "max_seq_len": 64, "block_size": 16, "eos_token_ids": [2], "passes": [],
            "has_weights": True, "files": {"graph.json": "0" * 64}, "backend": "triton", "quant": None}


def test_round_trip_keeps_every_field_and_the_optional_ones():
    data = manifest_json()
    m = Manifest.from_json(data)
    assert (m.dtype, m.max_seq_len, m.block_size, m.extra) == ("float32", 64, 16, {"backend": "triton", "quant": None})
    assert m.to_json() == data


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_each_required_field_missing_or_mistyped_is_named(name):
    data = manifest_json()
    del data[name]
    with pytest.raises(ManifestError, match=f"missing or malformed '{name}'"):
        Manifest.from_json(data)
    data[name] = True if REQUIRED[name] is int else 7  # a bool is not an int here, nor 7 a dict / str / list
    with pytest.raises(ManifestError, match=f"'{name}'"):
        Manifest.from_json(data)


def test_foreign_and_newer_formats_are_refused():
    with pytest.raises(ManifestError, match="manifest format is 'gguf'"):
        Manifest.from_json({**manifest_json(), "format": "gguf"})
    with pytest.raises(ManifestError, match="bundle format v2, this llmc reads v1"):
        Manifest.from_json({**manifest_json(), "format_version": 2})


def test_write_manifest_replaces_the_file_in_one_rename(tmp_path, monkeypatch):
    write_manifest(tmp_path, Manifest.from_json(manifest_json()))
    m = read_manifest(tmp_path)
    m.files["extra.bin"] = "1" * 64
    calls = []
    real_replace = contract.os.replace
    monkeypatch.setattr(contract.os, "replace", lambda a, b: calls.append((a, b)) or real_replace(a, b))
    write_manifest(tmp_path, m)
    assert [b for _, b in calls] == [tmp_path / "manifest.json"]
    assert json.loads((tmp_path / "manifest.json").read_text())["files"]["extra.bin"] == "1" * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_manifest(tmp_path, monkeypatch):
    write_manifest(tmp_path, Manifest.from_json(manifest_json()))
    before = (tmp_path / "manifest.json").read_text()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(contract.os, "replace", fail)
    with pytest.raises(OSError):
        write_manifest(tmp_path, Manifest.from_json({**manifest_json(), "dtype": "bfloat16"}))
    assert (tmp_path / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_graph_writes_kv_reads_the_layer_argument_by_its_name():
    from llmc.runtime.graphs import graph_writes_kv

    def node(target, layer):
        return {"op": "call_function", "target": target, "args": [None] * 9 + [layer, None], "kwargs": {}}

    graph = {"nodes": [node("llmc.rope_write_kv.default", 0), node("llmc.rope_write_kv_cpu.default", 1)]}
    assert graph_writes_kv(graph, 2)
    assert not graph_writes_kv(graph, 3)
    assert graph_writes_kv({"nodes": [{**node("llmc.rope_write_kv.default", None), "kwargs": {"layer": 0}}]}, 1)
