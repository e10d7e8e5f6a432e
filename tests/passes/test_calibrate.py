"""collect_stats on a tiny Qwen3 paged step after the fusion passes: statistics of each GEMM's normalised input."""
import pytest
import torch

from llmc.codegen.ops import _normalize
from llmc.compiler import pipeline
from llmc.models import ModelConfig, Transformer
from llmc.compiler.trace import trace
from llmc.passes.calibrate import CalibrationError, collect_stats, gemms
from llmc.passes.graph_weights import read
from llmc.passes.pattern import PassContext

aten, llmc = torch.ops.aten, torch.ops.llmc
NAMES = [name for _, name, _ in pipeline.PASSES]
FUSION = NAMES[NAMES.index("fuse_rms_norm") + 1: NAMES.index("fuse_norm_linear") + 1]


def fused(fusion, dtype=torch.float32):
    """[(name, gm, inputs)] of our Qwen3 step after the pipeline's fusion passes: the GEMMs the pass sees."""
    graphs = fusion.graphs("llmc", "qwen3", dtype)
    for _, gm, _ in graphs:
        pipeline.run_pipeline(gm, PassContext(), FUSION)
    return graphs


def prefill_inputs(fusion, count: int) -> list:
    return [fusion.graphs("llmc", "qwen3", torch.float32)[0][2] for _ in range(count)]


def test_stats_of_the_first_gemm_match_its_normalised_embeddings(fusion):
    _, gm, _ = fused(fusion)[0]
    calibration = prefill_inputs(fusion, 2)
    first = gemms(gm)[0]  # layer 0's q/k/v: norm_linear(embedding(ids))
    assert first.node.target == llmc.norm_linear.default and first.norm == "rms"
    embedding = first.inputs[0]
    assert embedding.target == aten.embedding.default
    table = read(gm, embedding.args[0])
    h = torch.cat([_normalize(table[inputs[0]], "rms", first.eps).reshape(-1, table.shape[1])
                   for inputs in calibration])

    stats = collect_stats(gm, calibration, sample_rows=8)[first.weight.target]
    assert stats.rows == h.shape[0] == sum(inputs[0].numel() for inputs in calibration)
    torch.testing.assert_close(stats.amax, h.abs().amax(dim=0), rtol=0, atol=0)
    torch.testing.assert_close(stats.mean_abs, h.abs().mean(dim=0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.l2_norm, h.norm(dim=0), rtol=1e-6, atol=1e-7)
    # the sample: 8 rows of h (a repeated token repeats its row, so rows need not be distinct values)
    assert stats.sample.shape == (8, h.shape[1])
    assert (stats.sample[:, None, :] == h[None]).all(dim=-1).any(dim=1).all()


def test_every_gemm_is_observed_with_its_norm_and_residual_add(fusion):
    L = fusion.LAYERS
    _, gm, _ = fused(fusion)[0]
    calibration = prefill_inputs(fusion, 2)
    stats = collect_stats(gm, calibration)
    assert set(stats) == {g.weight.target for g in gemms(gm)} and len(stats) == 4 * L + 1
    for g in gemms(gm):
        s = stats[g.weight.target]
        assert s.amax.shape == (read(gm, g.weight).shape[1],) and s.sample.shape[0] == min(s.rows, 256)
        if g.norm == "rms":  # every normalised row has mean square 1 (up to eps)
            torch.testing.assert_close(s.square_sum.sum() / (s.rows * s.amax.numel()), torch.tensor(1.0),
                                       rtol=1e-3, atol=0)
    # lm_head's input (add_norm_linear of the last tokens' sum) is exactly what makes the logits: h @ W.T is a
    # row of the graph's output for each of the B rows per input
    head = next(g for g in gemms(gm) if g.adds_residual and "lm_head" in g.weight.target)
    assert stats[head.weight.target].rows == sum(inputs[0].shape[0] for inputs in calibration)
    logits = torch.cat([fusion.outputs(gm, inputs)[0] for inputs in calibration])
    predicted = stats[head.weight.target].sample @ read(gm, head.weight).T
    assert predicted.shape == logits.shape
    closest = torch.cdist(predicted, logits).min(dim=1).values
    assert (closest <= 1e-4 * logits.norm(dim=1).max()).all()


def test_named_weights_only_and_the_sample_is_seeded(fusion):
    _, gm, _ = fused(fusion)[0]
    calibration = prefill_inputs(fusion, 2)
    names = [g.weight.target for g in gemms(gm)][:2]
    a = collect_stats(gm, calibration, names, sample_rows=5)
    b = collect_stats(gm, calibration, names[:1], sample_rows=5)
    c = collect_stats(gm, calibration, names, sample_rows=5, seed=1)
    assert list(a) == names and list(b) == names[:1]
    assert torch.equal(a[names[0]].sample, b[names[0]].sample)  # independent of which others are watched
    assert not torch.equal(a[names[0]].sample, c[names[0]].sample)


def test_refuses_without_inputs_or_without_weights(fusion):
    _, gm, _ = fused(fusion)[0]
    with pytest.raises(CalibrationError, match="at least one input"):
        collect_stats(gm, [])
    cfg = ModelConfig(family="qwen3", num_layers=1, qk_norm=True, tie_word_embeddings=True, **fusion.SHAPE)
    with torch.device("meta"):
        model = Transformer(cfg)
    meta = trace(model.eval(), block_size=16)[0].gm
    with pytest.raises(CalibrationError, match="needs weights"):
        collect_stats(meta, prefill_inputs(fusion, 1))
