"""llmc eval's perplexity: the bundle's graphs through the paged cache reproduce the eager model's figure."""
import importlib.util
from pathlib import Path

import pytest
import torch

import llmc
import llmc.models
from llmc.models.loader import load_checkpoint
from llmc.runtime.engine import load
from llmc.runtime.evaluate import perplexity, read_token_ids

EMBEDDED = Path(llmc.models.__file__).parent / "embedded"
HELDOUT = EMBEDDED / "heldout.txt"
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_embedded.py"
SEQ_LEN, WINDOWS = 48, 6


def heldout_perplexity():
    spec = importlib.util.spec_from_file_location("train_embedded", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.heldout_perplexity


@pytest.fixture(scope="module")
def engine32(tmp_path_factory):
    out = llmc.compile("llmc-tiny", target="cpu", dtype="float32", out=tmp_path_factory.mktemp("b") / "t.llmc")
    return load(out, kv_cache_tokens=512)  # the least a pool may hold (one max_seq_len sequence)


def test_fp32_bundle_reproduces_the_eager_models_perplexity(engine32):
    ids = read_token_ids(engine32, HELDOUT)
    ours = perplexity(engine32, ids, SEQ_LEN, WINDOWS, batch_size=4)  # 2 batches of windows: the blocks are reused
    eager = heldout_perplexity()(load_checkpoint(EMBEDDED, dtype=torch.float32), ids, SEQ_LEN, WINDOWS)
    assert (ours.tokens, ours.windows) == (eager.tokens, eager.windows) == (SEQ_LEN * WINDOWS, WINDOWS)
    # Same weights and arithmetic up to summation order (paged decode vs one full forward): float32 rounding only.
    assert ours.perplexity == pytest.approx(eager.perplexity, rel=1e-4)
    assert engine32.cache.pool.num_free == engine32.cache.pool.num_blocks  # every window's blocks came back


def test_windows_and_lengths_are_checked(engine32, tmp_path):
    ids = read_token_ids(engine32, HELDOUT)
    with pytest.raises(ValueError, match="--seq-len must be in 1..512"):
        perplexity(engine32, ids, 513)
    with pytest.raises(ValueError, match="more than 48 are needed"):
        perplexity(engine32, ids[:40], SEQ_LEN)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="cannot read"):
        read_token_ids(engine32, bad)
