import copy
import json

import pytest
import torch

from llmc.compiler import pipeline
from llmc.compiler.pipeline import (PassCheckError, PassContext, UnknownPassError, resolve_passes,
                                    run_pipeline)
from llmc.compiler.trace import trace
from llmc.models import ModelConfig, Transformer
from llmc.passes.strip_asserts import ASSERTION_TARGETS

ALL = ["strip_asserts", "fuse_rms_norm"]
BLOCK_SIZE = 16
FUSED = torch.ops.llmc.rms_norm.default
REAL_PASSES = list(pipeline.PASSES)


@pytest.fixture(autouse=True)
def foundation_passes(monkeypatch):
    """These tests are about the driver, so they pin the pipeline to its first two passes; the real list's
    contents are checked in test_real_pipeline_order and end to end in tests/compiler/test_api.py."""
    monkeypatch.setattr(pipeline, "PASSES", [p for p in REAL_PASSES if p[1] in ALL])


def test_real_pipeline_order():
    assert [(phase, name) for phase, name, _ in REAL_PASSES] == [
        ("cleanup", "strip_asserts"), ("canonicalize", "fuse_rms_norm"), ("fold", "fold_rope"),
        ("fold", "fold_constants"), ("fusion", "block_attention"), ("fusion", "fuse_kv_write"),
        ("fusion", "merge_projections"), ("fusion", "fuse_add_norm"), ("fusion", "fuse_norm_linear"),
        ("quantize", "sparsify"), ("quantize", "quantize"), ("lower", "lower_cpu")]


def test_resolve_passes():
    assert resolve_passes(None) == ALL
    assert resolve_passes("fuse_rms_norm, strip_asserts") == ALL  # pipeline order, not the spec's
    assert resolve_passes("fuse_rms_norm") == ["fuse_rms_norm"]
    assert resolve_passes("-fuse_rms_norm") == ["strip_asserts"]
    assert resolve_passes("-fuse_rms_norm,-strip_asserts") == []
    with pytest.raises(UnknownPassError, match="fold_everything.*known passes: strip_asserts, fuse_rms_norm"):
        resolve_passes("strip_asserts,fold_everything")
    with pytest.raises(UnknownPassError, match="fuse_rms_nrom"):
        resolve_passes("-fuse_rms_nrom")
    with pytest.raises(ValueError, match="mixes"):
        resolve_passes("strip_asserts,-fuse_rms_norm")


@pytest.fixture(scope="module")
def qwen3():
    """Our Qwen3 (one layer, bf16) traced into its paged prefill and decode graphs, as compile does."""
    cfg = ModelConfig(family="qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
    model = Transformer(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return cfg, {t.name: t.gm for t in trace(model, BLOCK_SIZE)}


def step_inputs(cfg: ModelConfig, seq: int) -> tuple:
    """A random paged step: caches full of values, sequences at different lengths in shuffled blocks."""
    batch, num_blocks, max_blocks = 3, 13, 4
    cache_shape = (cfg.num_layers, num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    past_lens = torch.randint(0, max_blocks * BLOCK_SIZE - seq, (batch,))
    return (
        torch.randint(0, cfg.vocab_size, (batch, seq)),
        past_lens[:, None] + torch.arange(seq),
        torch.randn(cache_shape, dtype=torch.bfloat16),
        torch.randn(cache_shape, dtype=torch.bfloat16),
        torch.randperm(num_blocks)[:batch * max_blocks].view(batch, max_blocks),
        past_lens,
        torch.full((batch,), seq - 1),
        torch.full((batch, seq), -1),
    )


@pytest.mark.parametrize("graph,seq", [("prefill", 6), ("decode", 1)])
def test_report_of_a_checked_run(qwen3, graph, seq):
    cfg, graphs = qwen3
    gm = copy.deepcopy(graphs[graph])
    asserts = sum(1 for n in gm.graph.nodes if n.target in ASSERTION_TARGETS)
    inputs = step_inputs(cfg, seq)
    expected = gm(*inputs)

    report = run_pipeline(gm, PassContext(dtype=torch.bfloat16), resolve_passes(None), inputs, graph_name=graph)
    strip, fuse = report.records
    assert (strip.name, strip.phase, strip.rewrites) == ("strip_asserts", "cleanup", asserts) and asserts > 0
    assert (fuse.name, fuse.phase, fuse.rewrites) == ("fuse_rms_norm", "canonicalize", 4 * cfg.num_layers + 1)
    assert strip.nodes_before == len(graphs[graph].graph.nodes) and strip.nodes_after == fuse.nodes_before
    assert fuse.nodes_after == len(gm.graph.nodes) < fuse.nodes_before < strip.nodes_before
    assert all(0 <= r.max_abs_diff <= 1.6e-2 and r.seconds > 0 for r in report.records)
    assert sum(1 for n in gm.graph.nodes if n.target == FUSED) == fuse.rewrites
    for got, want in zip(gm(*inputs), expected):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1.6e-2)

    table = report.format()
    assert table.splitlines()[0] == f"graph {graph}"
    assert "fuse_rms_norm" in table and f"{fuse.nodes_before} -> {fuse.nodes_after}" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["graph"] == graph and [r["rewrites"] for r in data["records"]] == [asserts, fuse.rewrites]


def test_without_check_inputs_nothing_is_compared(qwen3):
    cfg, graphs = qwen3
    report = run_pipeline(copy.deepcopy(graphs["decode"]), PassContext(), ["strip_asserts"], graph_name="decode")
    assert [r.max_abs_diff for r in report.records] == [None]
    assert report.records[0].rewrites > 0


def break_eps(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """A wrong rewrite: every fused norm gets eps 0.5 (the model's is 1e-6)."""
    norms = [n for n in gm.graph.nodes if n.target == FUSED]
    for node in norms:
        node.args = (*node.args[:2], 0.5)
    return len(norms)


def test_check_names_the_first_pass_that_broke_the_graph(qwen3, monkeypatch):
    cfg, graphs = qwen3
    passes = [*pipeline.PASSES, ("fusion", "break_eps", break_eps)]
    monkeypatch.setattr(pipeline, "PASSES", passes)
    gm = copy.deepcopy(graphs["prefill"])
    with pytest.raises(PassCheckError) as error:
        run_pipeline(gm, PassContext(), resolve_passes(None), step_inputs(cfg, 6))
    message = str(error.value)
    assert message.startswith("pass break_eps broke the prefill graph: output ") and "max abs diff" in message
    assert "\n" not in message and "fuse_rms_norm" not in message and "strip_asserts" not in message
    fine = error.value.report.records
    assert [r.name for r in fine] == ["strip_asserts", "fuse_rms_norm"]
    assert all(r.max_abs_diff <= 1.6e-2 for r in fine)


def test_notes_of_a_pass_land_in_its_record(qwen3, monkeypatch):
    def cautious(gm, ctx):
        ctx.note("no bf16 kernel on this target: kept the reference")
        return 0

    monkeypatch.setattr(pipeline, "PASSES", [*pipeline.PASSES, ("fusion", "cautious", cautious)])
    report = run_pipeline(copy.deepcopy(graphs := qwen3[1]["decode"]), PassContext(), ["strip_asserts", "cautious"])
    assert [r.notes for r in report.records] == [[], ["no bf16 kernel on this target: kept the reference"]]
    assert "cautious: no bf16 kernel" in report.format()
    with pytest.raises(UnknownPassError):
        run_pipeline(graphs, PassContext(), ["strip_assert"])


def test_dump_point_is_after_a_pass_or_a_phases_last_pass(monkeypatch):
    monkeypatch.setattr(pipeline, "PASSES", REAL_PASSES)
    names = ["strip_asserts", "fuse_rms_norm", "fold_rope", "block_attention", "fuse_norm_linear", "lower_cpu"]
    assert pipeline.dump_point(names, "fold_rope") == 2
    assert pipeline.dump_point(names, "fusion") == 4  # fuse_norm_linear, fusion's last pass that runs
    assert pipeline.dump_point(names, "quantize") == 4  # no quantize pass runs: after the passes before it
    assert pipeline.dump_point(names[1:], "cleanup") == -1  # before any pass
    with pytest.raises(ValueError, match="'quantize_all' names no phase"):
        pipeline.dump_point(names, "quantize_all")
    with pytest.raises(ValueError, match="fold_constants: that pass does not run"):
        pipeline.dump_point(names, "fold_constants")


def test_dump_after_writes_each_graph_as_readable_text(tmp_path, monkeypatch):
    from llmc.cli import main

    monkeypatch.setattr(pipeline, "PASSES", REAL_PASSES)
    dump = tmp_path / "dump"
    assert main(["compile", "llmc-tiny", "--target", "cpu", "--dtype", "float32", "-o", str(tmp_path / "b.llmc"),
                 "--dump-after", "fusion", str(dump)]) == 0
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["decode.after-fusion.txt", "prefill.after-fusion.txt"]
    text = (dump / "prefill.after-fusion.txt").read_text()
    assert text.startswith("# prefill graph after --dump-after fusion; passes run: strip_asserts, ")
    assert "torch.ops.llmc.norm_linear" in text and "lower_cpu" not in text.splitlines()[0]
    assert "llmc.norm_linear_cpu" not in text  # written before lower_cpu ran
