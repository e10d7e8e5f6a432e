"""Host memory of a compile and of a loaded engine, against the model's weight bytes (issue 14).

The model has qwen3-0.6b's layer shapes with 3 layers and a 16K vocabulary: 244 MiB of float32 weights, so the
weights dominate what the process allocates besides. Peaks are the kernel's RSS high-water mark
(runtime/bench.py's PeakMemory), exact, over what the process held before. A first compile of a tiny model
takes the one-time costs (imports, torch.export's caches) out of the measured one.
"""
import dataclasses
import gc

import pytest
import torch

import llmc
from llmc.models import Transformer
from llmc.models.loader import save_checkpoint
from llmc.models.registry import get_config
from llmc.passes.graph_weights import return_free_memory
from llmc.runtime.bundle import open_bundle
from llmc.bench.probe import PeakMemory

COMPILE_LIMIT = 1.5  # x the checkpoint's weight bytes
ENGINE_LIMIT = 1.2  # x (the bundle's weight bytes + the KV pool's)
MAX_SEQ_LEN = 256


def _settled() -> None:
    """Frees what earlier code left for the garbage collector and the C heap, so the peak counts only the block."""
    gc.collect()
    return_free_memory()


def _peak(run) -> tuple[PeakMemory, object]:
    """(run's peak memory, what run returned)."""
    _settled()
    with PeakMemory() as peak:
        result = run()
    if peak.method != "rss_high_water":
        pytest.skip("this kernel does not let the RSS high-water mark be reset: a sampled peak is not exact")
    return peak, result


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(weight bytes of the checkpoint, the compile's PeakMemory, the bundle)."""
    tmp = tmp_path_factory.mktemp("memory")
    cfg = dataclasses.replace(get_config("qwen3-0.6b"), num_layers=3, vocab_size=16384)
    tiny = dataclasses.replace(cfg, num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2,
                               num_kv_heads=1, head_dim=32)
    for config, name in ((tiny, "tiny"), (cfg, "model")):
        torch.manual_seed(0)
        model = Transformer(config)
        save_checkpoint(model, tmp / name, torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    llmc.compile(tmp / "tiny", "cpu", tmp / "tiny.llmc", dtype="float32", max_seq_len=MAX_SEQ_LEN)
    peak, bundle = _peak(lambda: llmc.compile(tmp / "model", "cpu", tmp / "model.llmc", dtype="float32",
                                              max_seq_len=MAX_SEQ_LEN))
    return weight_bytes, peak, bundle


def test_compile_peaks_under_one_and_a_half_times_the_weights(compiled):
    weight_bytes, peak, _ = compiled
    assert peak.delta_bytes <= COMPILE_LIMIT * weight_bytes, (
        f"compile peaked at +{peak.delta_bytes / 2**20:.0f} MiB, {peak.delta_bytes / weight_bytes:.2f}x the "
        f"{weight_bytes / 2**20:.0f} MiB of weights")


def test_loaded_engine_holds_its_weights_and_kv_pool_and_little_more(compiled):
    bundle = compiled[2]

    def load_and_generate():
        engine = llmc.load(bundle, kv_cache_tokens=MAX_SEQ_LEN)
        engine.generate([torch.randint(0, 16384, (9,)).tolist()], max_new_tokens=4)
        return engine

    peak, engine = _peak(load_and_generate)
    stored = {t.untyped_storage().data_ptr(): t.nbytes for t in engine.bundle.load_weights().values()}
    assert engine.bundle.weight_bytes == sum(stored.values())  # a tied tensor once
    held = engine.bundle.weight_bytes + engine.cache.pool_bytes
    assert peak.delta_bytes <= ENGINE_LIMIT * held, (
        f"the engine peaked at +{peak.delta_bytes / 2**20:.0f} MiB for {held / 2**20:.0f} MiB of weights and KV pool")


def test_a_decode_graph_needing_its_own_weights_gets_them(tiny_hf_checkpoint, tmp_path, monkeypatch):
    """Where the decode graph's passes derive a tensor the prefill graph's did not (a lowering for one row), the
    compile streams the weights again for it: the bundle is the one a compile needing nothing extra writes."""
    from llmc.compiler import api

    ckpt = tiny_hf_checkpoint("qwen3", tied=True)
    plain = llmc.compile(ckpt.path, "cpu", tmp_path / "plain.llmc", dtype="float32")
    real_share, calls = api.share_weights, []

    def share_finding_one_missing(gm, source):
        calls.append(real_share(gm, source))
        return calls[-1] if len(calls) > 1 else ["as if a decode-only tensor"]

    monkeypatch.setattr(api, "share_weights", share_finding_one_missing)
    again = llmc.compile(ckpt.path, "cpu", tmp_path / "again.llmc", dtype="float32")
    assert calls == [[], []]  # the first, forced miss and the fallback's own share
    assert (again / "graph.json").read_text() == (plain / "graph.json").read_text()
    want, got = (open_bundle(b).load_weights() for b in (plain, again))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
