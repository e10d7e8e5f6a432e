"""Before/After tests of block_attention: our paged step's attention becomes llmc::paged_attention, transformers'
exported causal attention (sdpa and eager) becomes llmc::causal_attention, outputs unchanged; masks that are not
provably causal are left alone; a sliding window gives what transformers' sliding-window models give."""
import copy

import pytest
import torch
from torch.export import Dim
from transformers import Qwen3Config, Qwen3ForCausalLM

from llmc.compiler.trace import cache_slots, trace, unlift
from llmc.models import ModelConfig, Transformer
from llmc.models.loader import load_checkpoint
from llmc.passes import block_attention
from llmc.passes.options import CompileOptions
from llmc.passes.pattern import PassContext
from tests.passes.conftest import Logits, canonical, census

aten, llmc = torch.ops.aten, torch.ops.llmc
LAYERS, BLOCK, WINDOW = 2, 16, 5
SDPA, SOFTMAX = aten.scaled_dot_product_attention.default, aten.softmax.int
PAGED, CAUSAL = llmc.paged_attention.default, llmc.causal_attention.default
MASK_OPS = {aten.tril.default, aten.ones.default, aten.diff.default, aten.cumsum.default, aten.where.ScalarOther}


def rewrite(gm: torch.fx.GraphModule, **context) -> tuple[int, PassContext]:
    """Runs the pass as the pipeline does (dead-code elimination, lint, recompile after)."""
    ctx = PassContext(options=CompileOptions(**context))
    count = block_attention.run(gm, ctx)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return count, ctx


def ops(gm, target) -> list:
    return [n for n in gm.graph.nodes if n.target == target]


def run_graph(gm, *inputs) -> list:
    with torch.no_grad():
        out = gm(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


# ---- our paged step ----------------------------------------------------------------------------------------------

def with_cached_tokens(inputs: tuple) -> tuple:
    """The step's inputs with past_lens 0, inside the first block, and past it (random), positions to match."""
    ids, _, k, v, table, _, _, _ = inputs
    batch, seq = ids.shape
    past = torch.tensor([0, int(torch.randint(1, BLOCK, ())), int(torch.randint(BLOCK + 1, 2 * BLOCK, ()))])[:batch]
    return (ids, past[:, None] + torch.arange(seq), k, v, table, past, torch.full((batch,), seq - 1),
            cache_slots(table, past, seq, BLOCK))


@pytest.mark.parametrize("family,dtype", [("qwen3", torch.float32), ("llama", torch.float32),
                                          ("qwen3", torch.bfloat16)], ids=["qwen3-fp32", "llama-fp32", "qwen3-bf16"])
def test_our_paged_attention_becomes_paged_attention_ops(fusion, family, dtype):
    for _, gm, inputs in fusion.graphs("llmc", family, dtype):
        inputs = with_cached_tokens(inputs)
        expected = fusion.outputs(gm, inputs)
        assert census(gm)[SDPA] == LAYERS and census(gm)[aten.index.Tensor] == 2 * LAYERS + 1  # + last_index

        count, ctx = rewrite(gm)
        assert count == LAYERS and not ctx.notes
        after = census(gm)
        assert after[PAGED] == LAYERS and after[SDPA] == 0 and not MASK_OPS & set(after)
        assert after[aten.index.Tensor] == 1  # only the last-token pick: no gather of the cache is left
        assert not [n for n in gm.graph.nodes if n.meta.get("val") is not None and n.op == "call_function"
                    and getattr(n.meta["val"], "dtype", None) == torch.bool]  # no [B, 1, S, P + S] mask
        for layer, op in enumerate(ops(gm, PAGED)):
            k_layer, v_layer, table, past = op.args[3:7]
            assert [k_layer.target, k_layer.args, v_layer.target, v_layer.args] == [
                aten.select.int, (k_layer.args[0], 0, layer), aten.select.int, (v_layer.args[0], 0, layer)]
            assert [k_layer.args[0].target, v_layer.args[0].target, table.target, past.target] == [
                "k_cache", "v_cache", "block_table", "past_lens"]
            assert op.args[7] == pytest.approx(fusion.SHAPE["head_dim"] ** -0.5) and op.args[8] == 0
        fusion.assert_model_outputs_close(fusion.outputs(gm, inputs), expected, dtype)


def random_step(model: Transformer, seq: int) -> tuple:
    cfg = model.config
    cache = torch.randn(cfg.num_layers, 9, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    table = torch.randperm(9)[:6].view(2, 3)
    past = torch.tensor([3, 2 * BLOCK + 1])
    return (torch.randint(0, cfg.vocab_size, (2, seq)), past[:, None] + torch.arange(seq), cache,
            torch.randn_like(cache), table, past, torch.full((2,), seq - 1), cache_slots(table, past, seq, BLOCK))


def test_multi_head_attention_without_repeat_kv():
    cfg = ModelConfig(family="llama", vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=LAYERS,
                      num_heads=4, num_kv_heads=4, head_dim=8)
    model = Transformer(cfg).eval()
    for t in trace(model, BLOCK):
        gm = canonical(t.gm)
        inputs = random_step(model, 4 if t.name == "prefill" else 1)
        expected = run_graph(gm, *inputs)
        assert census(gm)[aten.expand.default] == 2  # the mask's only: no repeat_kv
        count, ctx = rewrite(gm)
        assert count == LAYERS and not ctx.notes and census(gm)[PAGED] == LAYERS and census(gm)[SDPA] == 0
        for got, want in zip(run_graph(gm, *inputs), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_our_full_forward_is_causal_sdpa_becomes_causal_attention(fusion):
    """`model(input_ids)` calls sdpa(is_causal=True) after repeat_kv."""
    model = Transformer(ModelConfig(family="qwen3", num_layers=LAYERS, qk_norm=True, **fusion.SHAPE)).eval()
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randint(0, 97, (2, 7)),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    gm = canonical(unlift(ep.run_decompositions({})))
    ids = torch.randint(0, 97, (3, 10))
    expected = run_graph(gm, ids)
    count, ctx = rewrite(gm)
    assert count == LAYERS and census(gm)[CAUSAL] == LAYERS and census(gm)[SDPA] == 0 and not ctx.notes
    torch.testing.assert_close(run_graph(gm, ids)[0], expected[0], rtol=1e-4, atol=1e-4)


# ---- transformers' exported graphs -------------------------------------------------------------------------------

def hf_qwen3(fusion, impl: str = "sdpa", **config) -> Qwen3ForCausalLM:
    shape = fusion.SHAPE
    hf = Qwen3Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], num_hidden_layers=LAYERS,
                     intermediate_size=shape["intermediate_size"], num_attention_heads=shape["num_heads"],
                     num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], attn_implementation=impl,
                     **config)
    model = Qwen3ForCausalLM(hf)
    with torch.no_grad():
        for name, p in model.named_parameters():  # weights large enough that attention is far from uniform
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.4 * torch.randn_like(p))
    return model.eval()


def exported(model) -> torch.fx.GraphModule:
    with torch.no_grad():
        ep = torch.export.export(Logits(model), (torch.randint(0, 97, (2, 7)),),
                                 dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    return canonical(unlift(ep.run_decompositions({})))


@pytest.fixture(scope="module")
def hf_graphs():
    """(family, attn_implementation, dtype) -> (model, graph); exported once (seconds each), copied per test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    built = {}

    def get(family: str, impl: str, dtype: torch.dtype):
        if (family, impl, dtype) not in built:
            kw = dict(vocab_size=97, hidden_size=48, num_hidden_layers=LAYERS, intermediate_size=80,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8)
            config = (Qwen3Config if family == "qwen3" else LlamaConfig)(**kw, attn_implementation=impl)
            model = (Qwen3ForCausalLM if family == "qwen3" else LlamaForCausalLM)(config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.4 * torch.randn_like(p))
            model = model.to(dtype).eval()
            built[family, impl, dtype] = model, exported(model)
        model, gm = built[family, impl, dtype]
        return model, copy.deepcopy(gm)

    return get


@pytest.mark.parametrize("family,impl,dtype", [("qwen3", "sdpa", torch.float32), ("qwen3", "eager", torch.float32),
                                               ("llama", "sdpa", torch.float32), ("llama", "eager", torch.float32),
                                               ("llama", "eager", torch.bfloat16)],
                         ids=["qwen3-sdpa", "qwen3-eager", "llama-sdpa", "llama-eager", "llama-eager-bf16"])
def test_transformers_causal_attention_becomes_causal_attention_ops(fusion, hf_graphs, family, impl, dtype):
    _, gm = hf_graphs(family, impl, dtype)
    ids = torch.randint(0, 97, (3, 11))  # sizes the export did not see
    expected = run_graph(gm, ids)
    before = census(gm)
    assert before[SDPA if impl == "sdpa" else SOFTMAX] == LAYERS and before[aten.diff.default] == 1

    count, ctx = rewrite(gm)
    assert count == LAYERS and not ctx.notes
    after = census(gm)
    assert after[CAUSAL] == LAYERS and after[SDPA] == after[SOFTMAX] == after[aten.matmul.default] == 0
    assert not MASK_OPS & set(after) and after[aten.index.Tensor] == 0  # the mask went with its last reader
    assert [(op.args[3], op.args[4]) for op in ops(gm, CAUSAL)] == [(pytest.approx(8 ** -0.5), 0)] * LAYERS
    fusion.assert_model_outputs_close(run_graph(gm, ids), expected, dtype)


def test_sdpa_with_enable_gqa_and_is_causal():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                                    enable_gqa=True)

    q, k = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 5, 8)
    with torch.no_grad():
        seq = Dim("seq")  # one length for q, k and v: self-attention
        ep = torch.export.export(Attention(), (q, k, torch.randn_like(k)), dynamic_shapes=({2: seq},) * 3)
    gm = unlift(ep.run_decompositions({}))
    q, k, v = torch.randn(3, 6, 9, 8), torch.randn(3, 3, 9, 8), torch.randn(3, 3, 9, 8)
    expected = run_graph(gm, q, k, v)[0]
    assert rewrite(gm)[0] == 1
    (op,) = ops(gm, CAUSAL)
    assert op.args[3:] == (0.3, 0)
    torch.testing.assert_close(run_graph(gm, q, k, v)[0], expected, rtol=1e-4, atol=1e-4)


# ---- what must stay ----------------------------------------------------------------------------------------------

def test_an_arbitrary_attn_mask_is_left_alone():
    class Masked(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    args = (torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.rand(2, 1, 5, 5) > 0.5)
    gm = unlift(torch.export.export(Masked(), args).run_decompositions({}))
    code = gm.code
    count, ctx = rewrite(gm)
    assert count == 0 and gm.code == code
    assert len(ctx.notes) == 1 and "attn_mask is not one block_attention proves causal" in ctx.notes[0]


def test_a_padding_mask_from_transformers_is_left_alone(fusion):
    class Padded(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ep = torch.export.export(Padded(hf_qwen3(fusion)), (ids, torch.ones_like(ids)),
                                 dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},) * 2)
    gm = canonical(unlift(ep.run_decompositions({})))
    count, ctx = rewrite(gm)
    assert count == 0 and census(gm)[SDPA] == LAYERS
    assert len(ctx.notes) == LAYERS and all("not one block_attention proves causal" in n for n in ctx.notes)


def test_a_paged_mask_that_sees_one_token_ahead_is_left_alone(fusion):
    (_, gm, _), _ = fusion.graphs("llmc", "llama", torch.float32)
    (tril,) = ops(gm, aten.tril.default)
    tril.args = (tril.args[0], 1)  # query i also sees new key i + 1: not causal
    count, ctx = rewrite(gm)
    assert count == 0 and census(gm)[SDPA] == LAYERS
    assert len(ctx.notes) == LAYERS and all("not one block_attention proves causal" in n for n in ctx.notes)


def test_an_anti_causal_transformers_mask_is_left_alone(hf_graphs):
    _, gm = hf_graphs("qwen3", "sdpa", torch.float32)
    (le,) = ops(gm, aten.le.Tensor)
    le.target = aten.ge.Tensor  # keys at or after the query
    count, ctx = rewrite(gm)
    assert count == 0 and census(gm)[SDPA] == LAYERS and len(ctx.notes) == LAYERS


# ---- sliding windows ---------------------------------------------------------------------------------------------

def sliding_twin(model: Qwen3ForCausalLM, window: int, full_layers: int = 0) -> Qwen3ForCausalLM:
    """transformers' own sliding-window Qwen3 with the same weights: the reference for a window."""
    config = copy.deepcopy(model.config)
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, window, full_layers
    config.layer_types = ["full_attention" if i < full_layers else "sliding_attention" for i in range(LAYERS)]
    twin = Qwen3ForCausalLM(config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_a_sliding_window_gives_transformers_sliding_window_logits(fusion):
    model = hf_qwen3(fusion)
    gm = exported(model)
    ids = torch.randint(0, 97, (2, 3 * WINDOW))
    full = run_graph(gm, ids)[0]
    count, ctx = rewrite(gm, sliding_window=WINDOW)
    assert count == LAYERS and [op.args[4] for op in ops(gm, CAUSAL)] == [WINDOW] * LAYERS
    with torch.no_grad():
        want = sliding_twin(model, WINDOW)(ids).logits
    got = run_graph(gm, ids)[0]
    assert not torch.allclose(got, full, rtol=1e-3, atol=1e-3)  # the window matters at this length
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_models_own_sliding_window_is_kept(fusion):
    """Qwen3 with a full first layer and a sliding second one: each op gets its layer's window."""
    model = sliding_twin(hf_qwen3(fusion), WINDOW, full_layers=1)
    gm = exported(model)
    ids = torch.randint(0, 97, (2, 3 * WINDOW))
    expected = run_graph(gm, ids)[0]
    count, ctx = rewrite(gm)
    assert count == LAYERS and not ctx.notes and [op.args[4] for op in ops(gm, CAUSAL)] == [0, WINDOW]
    torch.testing.assert_close(run_graph(gm, ids)[0], expected, rtol=1e-4, atol=1e-4)
    gm = exported(model)
    count, ctx = rewrite(gm, sliding_window=3)
    assert [op.args[4] for op in ops(gm, CAUSAL)] == [3, WINDOW] and "keep it" in ctx.notes[0]


def write_step(cache: torch.Tensor, new: torch.Tensor, table: torch.Tensor, past: int) -> None:
    """What the runtime does after a step: new [L, B, S, Hkv, D] into the slots of positions past .. past + S - 1."""
    for t in range(new.shape[2]):
        block, offset = table[:, (past + t) // BLOCK], (past + t) % BLOCK
        cache[:, block, offset] = new[:, :, t]


@pytest.mark.parametrize("window", [0, WINDOW], ids=["full", "window"])
def test_paged_steps_with_a_window_give_transformers_logits(tiny_hf_checkpoint, window):
    """Chunked prefill (20 then 6 tokens) and one decode step through the passed graphs, with the K/V written
    between steps into randomly placed blocks, against transformers on the whole sequence."""
    ckpt = tiny_hf_checkpoint("qwen3")
    graphs = {}
    for t in trace(load_checkpoint(ckpt.path), BLOCK):
        gm = canonical(t.gm)
        assert rewrite(gm, sliding_window=window)[0] == LAYERS
        graphs[t.name] = gm
    cfg = ckpt.model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 27))
    table = torch.randperm(8)[:4].view(2, 2)
    k_cache = torch.randn(LAYERS, 8, BLOCK, cfg.num_key_value_heads, cfg.head_dim)  # unread slots hold garbage
    v_cache = torch.randn_like(k_cache)
    past, logits = 0, []
    for chunk in (20, 6, 1):
        step = ids[:, past:past + chunk]
        out, new_k, new_v = run_graph(graphs["decode" if chunk == 1 else "prefill"], step,
                                      past + torch.arange(chunk).repeat(2, 1), k_cache, v_cache, table,
                                      torch.full((2,), past), torch.full((2,), chunk - 1),
                                      torch.full((2, chunk), -1))  # written below, as the runtime would
        write_step(k_cache, new_k, table, past)
        write_step(v_cache, new_v, table, past)
        logits.append(out)
        past += chunk
    reference = sliding_twin(ckpt.model, window) if window else ckpt.model
    with torch.no_grad():
        want = reference(ids).logits[:, [19, 25, 26]]
    torch.testing.assert_close(torch.stack(logits, 1), want, rtol=1e-4, atol=1e-4)


# ---- attention sparsity ------------------------------------------------------------------------------------------

SPARSE, KEEP, KEY_BLOCK = llmc.sparse_paged_attention.default, 0.2, 4  # 4-token blocks: the steps span up to 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_keep_makes_the_paged_steps_sparse(fusion, dtype):
    for (name, gm, inputs), (_, by_hand, _) in zip(*(fusion.graphs("llmc", "qwen3", dtype) for _ in range(2))):
        inputs = with_cached_tokens(inputs)
        unpassed = fusion.outputs(gm, inputs)
        count, ctx = rewrite(gm, attention_keep=KEEP, attention_block=KEY_BLOCK)
        assert count == LAYERS and not ctx.notes and census(gm)[SPARSE] == LAYERS
        assert census(gm)[PAGED] == census(gm)[SDPA] == 0
        scale = pytest.approx(fusion.SHAPE["head_dim"] ** -0.5)
        assert [op.args[7:] for op in ops(gm, SPARSE)] == [(scale, 0, KEEP, KEY_BLOCK)] * LAYERS
        sparse = fusion.outputs(gm, inputs)
        assert all(out.isfinite().all() for out in sparse)
        assert not torch.allclose(sparse[0], unpassed[0], rtol=1e-2, atol=1e-2), f"{name}: sparsity changes logits"
        # The op's reference by hand: the dense-passed graph with each paged_attention swapped for it.
        assert rewrite(by_hand)[0] == LAYERS
        for node in ops(by_hand, PAGED):
            node.target, node.args = SPARSE, (*node.args, KEEP, KEY_BLOCK)
        by_hand.recompile()
        assert all(torch.equal(got, want) for got, want in zip(sparse, fusion.outputs(by_hand, inputs), strict=True))


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_attention_keep_zero_or_one_is_dense(fusion, keep):
    for _, gm, inputs in fusion.graphs("llmc", "llama", torch.float32):
        inputs = with_cached_tokens(inputs)
        expected = fusion.outputs(gm, inputs)
        count, ctx = rewrite(gm, attention_keep=keep, attention_block=KEY_BLOCK)
        assert count == LAYERS and not ctx.notes and census(gm)[PAGED] == LAYERS and census(gm)[SPARSE] == 0
        fusion.assert_model_outputs_close(fusion.outputs(gm, inputs), expected, torch.float32)


def test_causal_attention_stays_dense_and_says_so_once(hf_graphs):
    ctx = PassContext(options=CompileOptions(attention_keep=KEEP, attention_block=KEY_BLOCK))
    for _ in range(2):  # one context over two graphs, as the pipeline runs prefill and decode
        _, gm = hf_graphs("qwen3", "sdpa", torch.float32)
        assert block_attention.run(gm, ctx) == LAYERS and census(gm)[CAUSAL] == LAYERS
    assert len(ctx.notes) == 1 and "causal_attention" in ctx.notes[0] and "stays dense" in ctx.notes[0]
