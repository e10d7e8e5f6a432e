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
CALIBRATION = {"calibration": EMBEDDED / "calibration.txt"}
# Perplexity ceilings, relative to fp32, on the first 8 windows of 128 held-out tokens. Measured there (and on all
# 64 windows of 256, bench/results/*/quality.md): fp8 W8A8 -0.21% (+0.15%), int8 SmoothQuant +0.05% (+0.04%),
# int4-awq g64 +0.51% (+0.13%), w4a8 g64 +0.23% (+0.51%), 2:4 magnitude +8.2% (+7.2%), attention keep 0.5 at block
# 16 +11.9% (+7.0%). The 8-bit schemes are held to the 2%, the 4-bit ones to 3% (6x the worst seen), the
# pruned model and the sparse attention to 1.5x what they cost: a wrong scale, zero point, group or selection costs
# far more (a uniform guess scores 4096).
CEILINGS = {"fp8": ({"quant": "fp8"}, 0.02), "int8": ({"quant": "int8", **CALIBRATION}, 0.02),
            "int4-awq": ({"quant": "int4-awq", "quant_group_size": 64, **CALIBRATION}, 0.03),
            "w4a8": ({"quant": "w4a8", "quant_group_size": 64}, 0.03),
            "2:4": ({"sparsity": "2:4"}, 0.13),
            # bf16 activations on the CPU kernels (codegen/cpu/linear.py: oneDNN bf16, ATen's packed int4 / int8)
            "bf16": ({"dtype": "bfloat16"}, 0.02),
            "int8-w8a16-bf16": ({"quant": "int8-w8a16", "dtype": "bfloat16"}, 0.02),
            "int4-bf16": ({"quant": "int4", "quant_group_size": 64, "dtype": "bfloat16"}, 0.03),
            "attention-0.5": ({"attention_keep": 0.5, "attention_block": 16}, 0.18)}


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


@pytest.fixture(scope="module")
def fp32_subset(engine32):
    return perplexity(engine32, read_token_ids(engine32, HELDOUT), 128, 8, batch_size=8).perplexity


@pytest.mark.parametrize("name", CEILINGS)
def test_lossy_compiles_stay_under_their_perplexity_ceilings(name, fp32_subset, export_each_shape_once, tmp_path):
    options, ceiling = CEILINGS[name]
    bundle = llmc.compile("llmc-tiny", target="cpu", out=tmp_path / "b.llmc", **{"dtype": "float32", **options})
    engine = load(bundle, kv_cache_tokens=1024, prefix_caching=False)
    if options.get("dtype") == "bfloat16":  # the lossy path under test is the CPU kernels'
        targets = {n.get("target") for g in engine.bundle.graph["graphs"].values() for n in g["nodes"]}
        assert targets & {"llmc.norm_linear_cpu.default", "llmc.add_norm_linear_cpu.default"}  # lm_head at least
        assert ("llmc.quant_linear_cpu.default" in targets) == ("quant" in options)
    ours = perplexity(engine, read_token_ids(engine, HELDOUT), 128, 8, batch_size=8).perplexity
    assert ours != fp32_subset  # the option changed the computation
    assert ours / fp32_subset - 1 < ceiling, f"{name}: {ours:.3f} vs fp32 {fp32_subset:.3f}"
