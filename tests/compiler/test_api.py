"""End to end on CPU: transformers writes a tiny checkpoint, llmc compiles it (float32, --target cpu), and the
bundle's engine generates exactly transformers' greedy tokens for a batch of prompts of different lengths."""
import pytest
import torch

import llmc
from llmc.compiler.pipeline import PassCheckError

CASES = [("qwen3", True), ("qwen3", False), ("llama", True), ("llama", False)]


@pytest.mark.parametrize("family,tied", CASES)
def test_greedy_tokens_match_transformers(tiny_hf_checkpoint, hf_greedy, tmp_path, family, tied):
    ckpt = tiny_hf_checkpoint(family, tied=tied, hidden_size=60, intermediate_size=72, num_key_value_heads=3,
                              head_dim=10, num_hidden_layers=3)
    bundle = llmc.compile(ckpt.path, target="cpu", dtype="float32", out=tmp_path / "b.llmc")
    report = llmc.last_report()
    layers = 3
    expected = {"fuse_rms_norm": (4 if family == "qwen3" else 2) * layers + 1, "fold_rope": 2 * layers + 1,
                "fuse_kv_write": layers, "merge_projections": 2 * layers, "fuse_add_norm": 2 * layers,
                "fuse_norm_linear": 2 * layers + 1}
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
    llmc.compile(ckpt.path, target="cpu", dtype="float32", out=tmp_path / "ok.llmc", check_passes=True, passes="-break_eps")
    records = [r for p in llmc.last_report().pipelines for r in p.records]
    assert records and all(r.max_abs_diff is not None and r.max_abs_diff < 1e-4 for r in records)
    with pytest.raises(PassCheckError, match="break_eps"):
        llmc.compile(ckpt.path, target="cpu", dtype="float32", out=tmp_path / "bad.llmc", check_passes=True)
    assert not (tmp_path / "bad.llmc").exists()


@pytest.mark.parametrize("window", [0, 8], ids=["full", "sliding-window-8"])
def test_a_prompt_over_several_kv_blocks_gives_transformers_tokens(tiny_hf_checkpoint, hf_greedy, tmp_path, window):
    """A 70-token prompt (five 16-token KV blocks) and 24 greedy tokens through block attention over the paged
    cache; with --sliding-window 8, transformers' own sliding-window Qwen3 (same weights) is the reference."""
    import copy
    import json

    from transformers import Qwen3ForCausalLM

    ckpt = tiny_hf_checkpoint("qwen3")
    bundle = llmc.compile(ckpt.path, target="cpu", dtype="float32", out=tmp_path / "b.llmc", sliding_window=window)
    for graph in llmc.last_report().pipelines:
        assert {r.name: r.rewrites for r in graph.records}["block_attention"] == 2, graph.format()
    assert json.loads((bundle / "manifest.json").read_text())["sliding_window"] == window
    reference = ckpt.model
    if window:
        config = copy.deepcopy(ckpt.model.config)
        config.use_sliding_window, config.sliding_window, config.max_window_layers = True, window, 0
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers
        reference = Qwen3ForCausalLM(config).eval()
        reference.load_state_dict(ckpt.model.state_dict())
    prompt = torch.randint(0, 97, (70,)).tolist()
    want = hf_greedy(reference, prompt, 24)
    assert llmc.load(bundle).generate([prompt], max_new_tokens=24) == [want]
    if window:  # the window matters: full attention continues differently
        assert hf_greedy(ckpt.model, prompt, 24) != want


def test_yarn_to_128k_compiles_without_weights(tmp_path):
    """Qwen3's long-context config (YaRN x4 over 32K) compiles from config.json alone for 131072 positions."""
    import json

    from llmc.models import ModelConfig

    cfg = ModelConfig(family="qwen3", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=8, qk_norm=True, rope_theta=1e6, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    (tmp_path / "qwen3-yarn").mkdir()
    (tmp_path / "qwen3-yarn" / "config.json").write_text(json.dumps(cfg.to_hf()))
    bundle = llmc.compile(tmp_path / "qwen3-yarn", target="cpu", out=tmp_path / "y.llmc", weights=False,
                          max_seq_len=131072)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["max_seq_len"] == 131072 and manifest["model"]["rope_scaling"]["rope_type"] == "yarn"
    for graph in llmc.last_report().pipelines:
        counts = {r.name: r.rewrites for r in graph.records}
        assert counts["fold_rope"] == 2 * 2 + 1 and counts["block_attention"] == 2, graph.format()


@pytest.mark.parametrize("kwargs,message", [
    (dict(sliding_window=-4), "must be a whole number >= 0"),
    (dict(sliding_window=8, passes="-block_attention"), "applied by the block_attention pass"),
    (dict(sliding_window=8, check_passes=True), "changes on purpose"),
])
def test_sliding_window_options_that_cannot_work_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llmc.compile("qwen3-0.6b", target="cpu", out=tmp_path / "w.llmc", **kwargs)
    assert not (tmp_path / "w.llmc").exists()


def test_last_report_is_the_callers_own():
    """A compile in another thread (the torch.compile backend's or llmc.compile's) leaves the report this thread
    reads from llmc.last_report() as it was."""
    import contextvars
    import threading

    from llmc.compiler.api import record_report

    def body():
        mine = object()
        record_report(mine)
        other = threading.Thread(target=record_report, args=(object(),))
        other.start()
        other.join()
        assert llmc.last_report() is mine

    contextvars.copy_context().run(body)  # the module's other tests keep their own last report
