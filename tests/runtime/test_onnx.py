"""OnnxGraph: a small hand-built ONNX model with the exporter's I/O contract, run by onnxruntime through IO
binding, against the same computation in torch; zero copy of the bound KV cache; the engine on an onnx bundle."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import llmc
from llmc.common.contract import STEP_OUTPUTS
from llmc.common.targets import get_target
from llmc.models import ModelConfig
from llmc.runtime.bundle import BundleError, sha256_file
from llmc.runtime.onnx import OnnxGraph

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
# A toy model: layers, kv heads, head dim, vocabulary.
L, H, D, V = 2, 2, 4, 23


def toy_weights(seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return {"embed": torch.randn(V, H * D, generator=g), "head": torch.randn(H * D, V, generator=g) * 0.3,
            "layer_scale": torch.randn(L, 1, 1, 1, 1, generator=g)}


def toy_reference(w, dtype, input_ids, positions, k_cache, v_cache, block_table, past_lens, last_index,
                  slot_mapping=None):
    """The toy model in torch: reads every input, computes in float32 and returns the model dtype, as the ONNX."""
    batch, seq = input_ids.shape
    x = w["embed"][input_ids] + 0.01 * positions.float()[..., None]  # [B, S, F]
    new = w["layer_scale"] * x.view(batch, seq, H, D)[None]  # [L, B, S, H, D]
    k_read = k_cache.float()[:, block_table].sum((0, 2, 3)).reshape(batch, -1)  # [B, F]
    v_read = v_cache.float()[:, block_table].sum((0, 2, 3)).reshape(batch, -1)
    last = x[torch.arange(batch), last_index]
    hidden = last + 0.1 * k_read + 0.05 * v_read + 0.01 * past_lens.float()[:, None]
    return (hidden @ w["head"]).to(dtype), new.to(dtype), (-0.5 * new).to(dtype)


def write_toy_onnx(path, w, dtype, output_order=STEP_OUTPUTS):
    """model.onnx + model.onnx.data (the weights as external data, as the exporter writes them; shape operands
    stay inline, where shape inference reads them) computing toy_reference."""
    t = ONNX_TYPES[dtype]
    f32 = TensorProto.FLOAT

    def node(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [output], **attrs)

    def const(name, values, kind=TensorProto.INT64):
        return numpy_helper.from_array(np.asarray(values, dtype=helper.tensor_dtype_to_np_dtype(kind)), name)

    nodes = [
        node("Gather", ["embed", "input_ids"], "emb"),
        node("Cast", ["positions"], "pos_f", to=f32),
        node("Unsqueeze", ["pos_f", "axis_last"], "pos_col"),
        node("Mul", ["pos_col", "c_pos"], "pos_term"),
        node("Add", ["emb", "pos_term"], "x"),
        node("Reshape", ["x", "heads_shape"], "x4"),
        node("Unsqueeze", ["x4", "axis0"], "x5"),
        node("Mul", ["x5", "layer_scale"], "new_f"),
        node("Cast", ["new_f"], "new_k", to=t),
        node("Mul", ["new_f", "c_v"], "new_v_f"),
        node("Cast", ["new_v_f"], "new_v", to=t),
        node("Unsqueeze", ["last_index", "axis_last1"], "last_col"),
        node("GatherND", ["x", "last_col"], "last", batch_dims=1),
    ]
    for cache, coefficient in (("k", "c_k"), ("v", "c_vr")):
        nodes += [
            node("Cast", [f"{cache}_cache"], f"{cache}_f", to=f32),
            node("Gather", [f"{cache}_f", "block_table"], f"{cache}_g", axis=1),  # [L, B, MB, BS, H, D]
            node("ReduceSum", [f"{cache}_g", "reduce_axes"], f"{cache}_r", keepdims=0),  # [B, H, D]
            node("Reshape", [f"{cache}_r", "flat_shape"], f"{cache}_flat"),
            node("Mul", [f"{cache}_flat", coefficient], f"{cache}_term"),
        ]
    nodes += [
        node("Cast", ["past_lens"], "past_f", to=f32),
        node("Unsqueeze", ["past_f", "axis_last1"], "past_col"),
        node("Mul", ["past_col", "c_pos"], "past_term"),
        node("Add", ["last", "k_term"], "h1"),
        node("Add", ["h1", "v_term"], "h2"),
        node("Add", ["h2", "past_term"], "h3"),
        node("MatMul", ["h3", "head"], "logits_f"),
        node("Cast", ["logits_f"], "logits", to=t),
    ]
    initializers = [
        numpy_helper.from_array(w["embed"].numpy(), "embed"), numpy_helper.from_array(w["head"].numpy(), "head"),
        numpy_helper.from_array(w["layer_scale"].numpy(), "layer_scale"),
        const("axis_last", [2]), const("axis_last1", [1]), const("axis0", [0]), const("heads_shape", [0, 0, H, D]),
        const("flat_shape", [0, -1]), const("reduce_axes", [0, 2, 3]),
        const("c_pos", 0.01, f32), const("c_v", -0.5, f32), const("c_k", 0.1, f32), const("c_vr", 0.05, f32),
    ]
    cache_shape = [L, "blocks", "block_size", H, D]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("positions", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("k_cache", t, cache_shape),
              helper.make_tensor_value_info("v_cache", t, cache_shape),
              helper.make_tensor_value_info("block_table", TensorProto.INT64, ["B", "MB"]),
              helper.make_tensor_value_info("past_lens", TensorProto.INT64, ["B"]),
              helper.make_tensor_value_info("last_index", TensorProto.INT64, ["B"])]
    output_info = {"logits": helper.make_tensor_value_info("logits", t, ["B", V]),
                   "new_k": helper.make_tensor_value_info("new_k", t, [L, "B", "S", H, D]),
                   "new_v": helper.make_tensor_value_info("new_v", t, [L, "B", "S", H, D])}
    graph = helper.make_graph(nodes, "toy", inputs, [output_info[n] for n in output_order], initializers)
    # IR 10 (onnx 1.16): this onnx package writes a newer IR than onnxruntime 1.31 reads (14 > 13).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=256)
    return path


def random_step(dtype, batch=3, seq=5, blocks=7, block_size=4, width=3):
    """Fresh random inputs of one step, in the engine's graph signature."""
    cache = (L, blocks, block_size, H, D)
    return (torch.randint(0, V, (batch, seq)), torch.randint(0, 50, (batch, seq)),
            torch.randn(cache).to(dtype), torch.randn(cache).to(dtype),
            torch.randint(0, blocks, (batch, width)), torch.randint(0, 30, (batch,)),
            torch.randint(0, seq, (batch,)), torch.full((batch, seq), -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_on_random_steps(tmp_path, dtype):
    w = toy_weights()
    graph = OnnxGraph(write_toy_onnx(tmp_path / "onnx" / "model.onnx", w, dtype), "cpu", dtype)
    for batch, seq in ((3, 5), (1, 1), (2, 9)):  # dynamic batch and sequence, decode-shaped too
        step = random_step(dtype, batch, seq)
        got = graph(*step)
        want = toy_reference(w, dtype, *step)
        for name, g, r in zip(STEP_OUTPUTS, got, want):
            assert g.dtype == dtype and g.shape == r.shape, name
            torch.testing.assert_close(g, r, **TOLERANCE[dtype], msg=name)


def test_outputs_follow_the_contract_whatever_the_models_output_order(tmp_path):
    w = toy_weights()
    path = write_toy_onnx(tmp_path / "model.onnx", w, torch.float32, output_order=("new_v", "logits", "new_k"))
    step = random_step(torch.float32)
    for g, r in zip(OnnxGraph(path, "cpu", torch.float32)(*step), toy_reference(w, torch.float32, *step)):
        torch.testing.assert_close(g, r, **TOLERANCE[torch.float32])


def test_kv_cache_is_bound_by_address_and_never_copied(tmp_path):
    w = toy_weights()
    graph = OnnxGraph(write_toy_onnx(tmp_path / "model.onnx", w, torch.float32), "cpu", torch.float32)
    step = list(random_step(torch.float32))
    k_cache, v_cache = step[2], step[3]
    addresses = {}
    bind_input = graph.binding.bind_input

    def recording(name, device_type, device_id, element_type, shape, buffer_ptr):
        addresses[name] = buffer_ptr
        return bind_input(name, device_type, device_id, element_type, shape, buffer_ptr)

    graph.binding.bind_input = recording
    first = [t.clone() for t in graph(*step)]
    assert addresses["k_cache"] == k_cache.data_ptr() and addresses["v_cache"] == v_cache.data_ptr()
    torch.testing.assert_close(first[0], toy_reference(w, torch.float32, *step)[0], **TOLERANCE[torch.float32])
    # Change the cache in place and run again without binding anything: onnxruntime reads the torch memory.
    k_cache.add_(torch.randn_like(k_cache))
    v_cache.mul_(torch.rand_like(v_cache) + 0.5)
    logits = graph.run_bound()[0]
    want = toy_reference(w, torch.float32, *step)[0]
    assert not torch.allclose(want, first[0]), "the change did not move the reference: the test shows nothing"
    torch.testing.assert_close(logits, want, **TOLERANCE[torch.float32])


def test_outputs_share_onnxruntimes_memory_and_survive_the_next_call(tmp_path):
    w = toy_weights()
    graph = OnnxGraph(write_toy_onnx(tmp_path / "model.onnx", w, torch.float32), "cpu", torch.float32)
    a, b = random_step(torch.float32), random_step(torch.float32, batch=2, seq=3)
    first = graph(*a)
    # DLPack, not a copy: the torch tensors sit where onnxruntime put its outputs.
    assert [t.data_ptr() for t in first] == [v.data_ptr() for v in graph.binding.get_outputs()]
    graph(*b)
    for g, r in zip(first, toy_reference(w, torch.float32, *a)):
        torch.testing.assert_close(g, r, **TOLERANCE[torch.float32])


def test_refusals_name_what_to_do(tmp_path):
    path = write_toy_onnx(tmp_path / "model.onnx", toy_weights(), torch.float32)
    with pytest.raises(BundleError, match="dtype"):
        OnnxGraph(path, "cpu", torch.bfloat16)
    with pytest.raises(BundleError, match="missing; rebuild"):
        OnnxGraph(tmp_path / "absent.onnx", "cpu", torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(BundleError, match="pip install onnxruntime-gpu"):
            OnnxGraph(path, "cuda", torch.float32)


def write_onnx_bundle(path, w, block_size=4, max_seq_len=40, dtype=torch.float32):
    """A bundle as compiler/api.py writes one for --backend onnx, minus the weights the ONNX already holds."""
    dtype_name = str(dtype).removeprefix("torch.")
    config = ModelConfig(family="llama", vocab_size=V, hidden_size=H * D, intermediate_size=16, num_layers=L,
                         num_heads=H, num_kv_heads=H, head_dim=D, dtype=dtype_name)
    write_toy_onnx(path / "onnx" / "model.onnx", w, dtype)
    (path / "graph.json").write_text(json.dumps({"inputs": ["input_ids", "positions", "k_cache", "v_cache",
                                                            "block_table", "past_lens", "last_index",
                                                            "slot_mapping"], "graphs": {}}))
    files = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = {"format": "llmc-bundle", "format_version": 1, "model": config.to_dict(),
                "target": get_target("cpu").to_dict(), "dtype": dtype_name, "has_weights": True,
                "max_seq_len": max_seq_len, "block_size": block_size, "eos_token_ids": [], "passes": [],
                "backend": "onnx", "onnx": {"file": "onnx/model.onnx"}, "files": files}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_engine_runs_an_onnx_bundle_like_the_torch_graph(tmp_path):
    w = toy_weights()
    bundle = write_onnx_bundle(tmp_path / "toy.llmc", w)
    engine = llmc.load(bundle, kv_cache_tokens=64, max_batch=3, prefill_chunk=6)
    assert isinstance(engine.graphs["prefill"], OnnxGraph) and engine.graphs["decode"] is engine.graphs["prefill"]
    assert engine.graphs_writing_kv == frozenset()
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 11, 7, 1)]
    got = engine.generate(prompts, max_new_tokens=6)
    # The same engine with the torch computation as its graph: the cache the engine wrote from the ONNX graph's
    # new_k / new_v feeds the next steps' logits, so any slip in binding or writing changes the tokens.
    reference = llmc.load(bundle, kv_cache_tokens=64, max_batch=3, prefill_chunk=6)
    torch_graph = lambda *step: toy_reference(w, torch.float32, *step)  # noqa: E731
    reference.graphs = {"prefill": torch_graph, "decode": torch_graph}
    assert reference.generate(prompts, max_new_tokens=6) == got
    assert len(set(map(tuple, got))) > 1, "every prompt gave the same tokens: the cache and prompts did not matter"
