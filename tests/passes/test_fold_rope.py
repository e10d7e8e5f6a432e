import copy

import pytest
import torch
from torch.export import Dim
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from llmc.compiler.trace import example_inputs, trace, unlift
from llmc.models import ModelConfig, Transformer
from llmc.models.transformer import RMSNorm, rotate_half
from llmc.passes import fold_rope, fuse_rms_norm, strip_asserts
from llmc.passes.pattern import PassContext
from tests.passes.conftest import Logits, census, finish

aten, llmc = torch.ops.aten, torch.ops.llmc
LAYERS, MAX_LEN, BLOCK = 2, 64, 16
SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_heads=6, num_kv_heads=2, head_dim=8)
EPS = 1e-6
SCALINGS = {  # small original lengths, so every scaling changes the frequencies at these tiny sizes
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
}
OURS = {"qwen3-yarn": ("qwen3", "yarn"), "llama-llama3": ("llama", "llama3"), "llama-linear": ("llama", "linear")}
TOLERANCES = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def randomize(model: torch.nn.Module) -> None:
    """Random weights, norm gains around 1: a dropped or misplaced q/k norm weight shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))


def prepared(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """What fold_rope sees in the pipeline: assertions stripped, every RMSNorm an llmc.rms_norm node."""
    for rewrite in (strip_asserts.run, fuse_rms_norm.run):
        rewrite(gm, PassContext())
        finish(gm)
    return gm


def rope_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.target == llmc.rope.default]


@pytest.fixture(scope="module")
def our_graphs():
    """(model, {graph name: GraphModule}) per (model kind, dtype); traced once (seconds each), copied per test."""
    cache = {}

    def get(kind: str, dtype: torch.dtype):
        if (kind, dtype) not in cache:
            family, scaling = OURS[kind]
            cfg = ModelConfig(family=family, num_layers=LAYERS, qk_norm=family == "qwen3", rms_norm_eps=EPS,
                              rope_scaling=SCALINGS[scaling], max_position_embeddings=256, **SIZES)
            model = Transformer(cfg)
            randomize(model)
            model = model.to(dtype).eval()
            cache[kind, dtype] = model, {t.name: prepared(t.gm) for t in trace(model, BLOCK)}
        model, graphs = cache[kind, dtype]
        return model, {name: copy.deepcopy(gm) for name, gm in graphs.items()}

    return get


def step_inputs(model: Transformer, graph: str) -> tuple:
    """A random paged step whose positions reach MAX_LEN - 1 in the first sequence."""
    seq = 5 if graph == "prefill" else 1
    ids, _, k, v, table, past, last, slots = example_inputs(model, 3, seq, BLOCK)
    ids = torch.randint(0, SIZES["vocab_size"], ids.shape)
    k, v = torch.randn(k.shape).to(k.dtype), torch.randn(v.shape).to(v.dtype)
    table = torch.randperm(k.shape[1])[: table.numel()].view(table.shape)
    starts = torch.randint(0, MAX_LEN - seq + 1, (3,))
    starts[0] = MAX_LEN - seq
    positions = starts[:, None] + torch.arange(seq)
    past = torch.randint(0, table.shape[1] * BLOCK, (3,))
    return ids, positions, k, v, table, past, last, slots


@pytest.mark.parametrize("graph", ["prefill", "decode"])
@pytest.mark.parametrize("kind,dtype", [("qwen3-yarn", torch.float32), ("qwen3-yarn", torch.bfloat16),
                                        ("llama-llama3", torch.bfloat16), ("llama-linear", torch.float32)],
                         ids=["qwen3-yarn-fp32", "qwen3-yarn-bf16", "llama-llama3-bf16", "llama-linear-fp32"])
def test_our_rotations_become_rope_ops(our_graphs, kind, dtype, graph):
    model, graphs = our_graphs(kind, dtype)
    gm = graphs[graph]
    qk_norm = model.config.qk_norm
    inputs = step_inputs(model, graph)
    expected = gm(*inputs)
    before = census(gm)
    assert before[aten.cos.default] == before[aten.sin.default] == 1
    assert before[llmc.rms_norm.default] == (4 if qk_norm else 2) * LAYERS + 1 and before[llmc.rope.default] == 0

    assert fold_rope.run(gm, PassContext(max_seq_len=MAX_LEN)) == 2 * LAYERS + 1
    finish(gm)
    after = census(gm)
    assert after[llmc.rope.default] == 2 * LAYERS
    assert after[aten.cos.default] == after[aten.sin.default] == after[aten.rsqrt.default] == 0
    assert after[llmc.rms_norm.default] == 2 * LAYERS + 1  # q/k norms went into the rope ops
    assert after[aten.neg.default] == 0 and after[aten.cat.default] == before[aten.cat.default] - 2 * LAYERS - 1
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "inv_freq" not in attrs and not hasattr(gm, "inv_freq")
    positions = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "positions")
    ropes = rope_nodes(gm)
    assert all(n.args[1] is positions for n in ropes)
    assert all(n.args[2].target == "inv_freq_cos_table" and n.args[3].target == "inv_freq_sin_table" for n in ropes)
    norms = sorted(n.args[4].target for n in ropes) if qk_norm else [n.args[4] for n in ropes]
    assert norms == (sorted(f"layers_{i}_self_attn_{p}_norm_weight" for i in range(LAYERS) for p in "qk")
                     if qk_norm else [None] * 2 * LAYERS)
    assert {n.args[5] for n in ropes} == ({EPS} if qk_norm else {0.0})

    cos, sin = model.rope(torch.arange(MAX_LEN)[None], torch.float32)  # the model's own values, scaling included
    assert gm.inv_freq_cos_table.dtype == torch.float32
    torch.testing.assert_close(gm.inv_freq_cos_table, cos[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(gm.inv_freq_sin_table, sin[0], **TOLERANCES[torch.float32])
    for got, want in zip(gm(*inputs), expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def test_weights_on_the_meta_device_give_meta_tables(our_graphs):
    _, graphs = our_graphs("qwen3-yarn", torch.float32)
    gm = graphs["prefill"].to("meta")  # what compiling without weights traces
    assert fold_rope.run(gm, PassContext(max_seq_len=MAX_LEN)) == 2 * LAYERS + 1
    finish(gm)
    for table in (gm.inv_freq_cos_table, gm.inv_freq_sin_table):
        assert table.device.type == "meta" and table.shape == (MAX_LEN, SIZES["head_dim"])
        assert table.dtype == torch.float32


def test_without_a_max_length_nothing_changes_and_the_report_says_why(our_graphs):
    _, graphs = our_graphs("qwen3-yarn", torch.float32)
    gm = graphs["decode"]
    code = gm.code
    ctx = PassContext()
    assert fold_rope.run(gm, ctx) == 0
    assert gm.code == code and len(ctx.notes) == 1 and "max_seq_len" in ctx.notes[0]


# ---- transformers' graphs: [B, H, S, D], cos/sin unsqueezed on dim 1, positions from an arange ---------------

HF = {"qwen3": (Qwen3Config, Qwen3ForCausalLM, "yarn", torch.bfloat16),
      "llama": (LlamaConfig, LlamaForCausalLM, "llama3", torch.float32)}


@pytest.mark.parametrize("family", ["qwen3", "llama"], ids=["qwen3-yarn-bf16", "llama-llama3-fp32"])
def test_transformers_rotations_become_rope_ops(family):
    config_class, model_class, scaling, dtype = HF[family]
    config = config_class(vocab_size=SIZES["vocab_size"], hidden_size=SIZES["hidden_size"],
                          intermediate_size=SIZES["intermediate_size"], num_hidden_layers=LAYERS,
                          num_attention_heads=SIZES["num_heads"], num_key_value_heads=SIZES["num_kv_heads"],
                          head_dim=SIZES["head_dim"], rms_norm_eps=EPS, max_position_embeddings=256,
                          rope_parameters={"rope_theta": 10000.0, **SCALINGS[scaling]})
    model = model_class(config)
    randomize(model)
    model = model.to(dtype).eval()
    with torch.no_grad():
        ep = torch.export.export(Logits(model), (torch.randint(0, SIZES["vocab_size"], (2, 7)),),
                                 dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    gm = prepared(unlift(ep.run_decompositions({})))
    ids = torch.randint(0, SIZES["vocab_size"], (3, MAX_LEN))  # positions 0 .. MAX_LEN - 1
    expected = gm(ids)
    before = census(gm)
    assert before[aten.cos.default] == before[aten.sin.default] == 1

    assert fold_rope.run(gm, PassContext(max_seq_len=MAX_LEN)) == 2 * LAYERS + 1
    finish(gm)
    after = census(gm)
    assert after[llmc.rope.default] == 2 * LAYERS
    assert after[aten.cos.default] == after[aten.sin.default] == after[aten.neg.default] == 0
    qk_norm = family == "qwen3"
    assert after[llmc.rms_norm.default] == before[llmc.rms_norm.default] - (2 * LAYERS if qk_norm else 0)
    # Each op reads the [B, S, H, D] projection (or its norm's input) and its result is transposed back.
    ropes = rope_nodes(gm)
    assert all(n.args[0].target == aten.view.default for n in ropes)
    assert all([u.target for u in n.users] == [aten.transpose.int] for n in ropes)
    assert all((n.args[4] is not None) == qk_norm for n in ropes)
    assert not hasattr(gm, "model_rotary_emb_inv_freq")
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(x, torch.arange(MAX_LEN)[None])  # transformers' own float32 values
    torch.testing.assert_close(gm.model_rotary_emb_inv_freq_cos_table, cos[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(gm.model_rotary_emb_inv_freq_sin_table, sin[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(gm(ids), expected, **TOLERANCES[dtype])


# ---- long context: Qwen3's YaRN recipe to 128K positions -----------------------------------------------------

LONG = 131072
YARN_128K = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def test_yarn_to_128k_tables_match_transformers_at_the_last_positions():
    """YaRN x4 over 32K positions (max_position_embeddings 131072), tables folded for 131072 positions: the rows
    the longest sequences read, where float32 angles are largest, equal transformers' rotary embedding, and a
    decode step there gives the unfolded graph's outputs."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    cfg = ModelConfig(family="qwen3", num_layers=1, qk_norm=True, rms_norm_eps=EPS, rope_theta=1e6,
                      rope_scaling=YARN_128K, max_position_embeddings=LONG, **SIZES)
    model = Transformer(cfg)
    randomize(model)
    model.eval()
    gm = prepared(trace(model, BLOCK)[1].gm)  # decode
    ids, _, k, v, table, _, last, slots = example_inputs(model, 3, 1, BLOCK)
    positions = torch.tensor([[LONG - 1], [LONG - 2], [int(torch.randint(LONG - 4096, LONG, ()))]])
    inputs = (torch.randint(0, SIZES["vocab_size"], ids.shape), positions, torch.randn(k.shape), torch.randn(v.shape),
              torch.randperm(k.shape[1])[: table.numel()].view(table.shape), torch.randint(1, 3 * BLOCK, (3,)), last,
              slots)
    expected = gm(*inputs)

    assert fold_rope.run(gm, PassContext(max_seq_len=LONG)) == 3
    finish(gm)
    hf = Qwen3Config(head_dim=SIZES["head_dim"], max_position_embeddings=LONG,
                     rope_parameters={"rope_theta": 1e6, **YARN_128K})
    cos, sin = Qwen3RotaryEmbedding(hf)(torch.zeros(1), torch.arange(LONG - 256, LONG)[None])
    assert gm.inv_freq_cos_table.shape == gm.inv_freq_sin_table.shape == (LONG, SIZES["head_dim"])
    assert float(cos.abs().max()) > 1.1  # YaRN's attention factor (1 + 0.1 ln 4) is in the tables
    torch.testing.assert_close(gm.inv_freq_cos_table[-256:], cos[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(gm.inv_freq_sin_table[-256:], sin[0], **TOLERANCES[torch.float32])
    for got, want in zip(gm(*inputs), expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


# ---- what must not fold ---------------------------------------------------------------------------------------

class Rotary(torch.nn.Module):
    """One rotation in our layout, with a variant whose q norm is read elsewhere and one whose cos/sin mix
    positions (a cumulative sum): a table row could not stand for its position."""

    def __init__(self, norm_read_elsewhere=False, positions_mixed=False):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.norm = RMSNorm(8, EPS)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.norm_read_elsewhere, self.positions_mixed = norm_read_elsewhere, positions_mixed
        randomize(self)

    def forward(self, x, positions):
        b, s, _ = x.shape
        angles = positions[..., None].float()
        if self.positions_mixed:
            angles = angles.cumsum(1)
        freqs = angles * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)
        q = self.norm(self.proj(x).view(b, s, 2, 8))
        out = q * cos + rotate_half(q) * sin
        return out + q if self.norm_read_elsewhere else out


def rotary_graph(module):
    inputs = torch.randn(2, 5, 16), torch.arange(5).repeat(2, 1)
    with torch.no_grad():
        ep = torch.export.export(module.eval(), inputs, dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},) * 2)
    return prepared(unlift(ep.run_decompositions({})))


def random_rotary_inputs():
    return torch.randn(3, 6, 16), torch.randint(0, MAX_LEN, (3, 6))


def test_a_norm_read_elsewhere_stays_outside_the_op():
    gm = rotary_graph(Rotary(norm_read_elsewhere=True))
    inputs = random_rotary_inputs()
    expected = gm(*inputs)
    assert fold_rope.run(gm, PassContext(max_seq_len=MAX_LEN)) == 2
    finish(gm)
    (rope,) = rope_nodes(gm)
    assert rope.args[0].target == llmc.rms_norm.default and rope.args[4] is None
    assert census(gm)[llmc.rms_norm.default] == 1
    torch.testing.assert_close(gm(*inputs), expected, **TOLERANCES[torch.float32])


def test_cos_and_sin_that_mix_positions_are_left_alone():
    gm = rotary_graph(Rotary(positions_mixed=True))
    code = gm.code
    ctx = PassContext(max_seq_len=MAX_LEN)
    assert fold_rope.run(gm, ctx) == 0
    finish(gm)
    assert gm.code == code and hasattr(gm, "inv_freq")
    assert ctx.notes and all("cumsum" in note for note in ctx.notes)
