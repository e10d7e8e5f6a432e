"""End to end on CPU: transformers writes a tiny checkpoint, llmc compiles it (float32, --target cpu), and the
bundle's engine generates exactly transformers' greedy tokens for a batch of prompts of different lengths."""
import pytest
import torch

import llmc
from llmc.compiler.pipeline import PassCheckError

CASES = [("qwen3", True), ("qwen3", False), ("llama", True), ("llama", False)]


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy continuation, ending at its end-of-sequence token as llmc's does."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0)[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    stop = next((i for i, t in enumerate(out) if t in eos), None)
    return out if stop is None else out[: stop + 1]


@pytest.mark.parametrize("family,tied", CASES)
def test_greedy_tokens_match_transformers(tiny_hf_checkpoint, tmp_path, family, tied):
    ckpt = tiny_hf_checkpoint(family, tied=tied, hidden_size=60, intermediate_size=72, num_key_value_heads=3,
                              head_dim=10, num_hidden_layers=3)
    bundle = llmc.compile(ckpt.path, target="cpu", out=tmp_path / "b.llmc")
    report = llmc.last_report()
    layers = 3
    expected = {"fuse_rms_norm": (4 if family == "qwen3" else 2) * layers + 1, "fold_rope": 2 * layers + 1,
                "merge_projections": 2 * layers, "fuse_add_norm": 2 * layers, "fuse_norm_linear": 2 * layers + 1}
    for graph in report.pipelines:
        counts = {r.name: r.rewrites for r in graph.records}
        assert {k: counts[k] for k in expected} == expected, graph.format()
        left = {n.split("(")[0] for n in graph.format().split()}  # smoke: the table names every pass
        assert set(expected) <= left
    engine = llmc.load(bundle)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 19, 2)]  # 19 > one 16-token KV block
    got = engine.generate(prompts, max_new_tokens=32)
    want = [hf_greedy(ckpt.model, p, 32) for p in prompts]
    assert got == want
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


def test_check_passes_names_the_broken_pass(tiny_hf_checkpoint, tmp_path, monkeypatch):
    from llmc.compiler import pipeline

    def break_eps(gm, ctx):
        """Sets every fused op's eps (its one float argument) to 0.5: wrong, and visible in the logits."""
        count = 0
        for node in gm.graph.nodes:
            if getattr(node.target, "namespace", None) == "llmc":
                node.args = tuple(0.5 if isinstance(a, float) else a for a in node.args)
                count += 1
        return count

    monkeypatch.setattr(pipeline, "PASSES", [*pipeline.PASSES, ("fusion", "break_eps", break_eps)])
    ckpt = tiny_hf_checkpoint("qwen3")
    llmc.compile(ckpt.path, target="cpu", out=tmp_path / "ok.llmc", check_passes=True, passes="-break_eps")
    records = [r for p in llmc.last_report().pipelines for r in p.records]
    assert records and all(r.max_abs_diff is not None and r.max_abs_diff < 1e-4 for r in records)
    with pytest.raises(PassCheckError, match="break_eps"):
        llmc.compile(ckpt.path, target="cpu", out=tmp_path / "bad.llmc", check_passes=True)
    assert not (tmp_path / "bad.llmc").exists()
