"""End-to-end quality of quantized and sparse compiles against transformers (issue 7): tiny Qwen3 (tied and
untied) and Llama checkpoints, float32, target cpu.

1. Weight-only schemes (fp8-w8a16, int4 RTN, int4-awq, 2:4 magnitude) have an exact reference: the transformers
   model with each quantized Linear weight W replaced by what the bundle effectively multiplies by. The quantize
   and sparsify passes see W * g (fuse_norm_linear folded the RMSNorm gain g feeding the GEMM into it: input_layernorm
   for q/k/v, post_attention_layernorm for gate/up, none for o_proj / down_proj), so the reference weight is
   dequantize(quantize(W * g)) / g. The bundle's greedy tokens must equal that model's, token for token.
2. Activation-quantized schemes (fp8 W8A8, int8 SmoothQuant and RTN, w4a8, the mixed policy) have no exact
   transformers reference: teacher-forced next-token logits over a random sequence are compared with transformers'
   float32 logits (top-1 agreement, mean cosine) against thresholds measured on 40 seeds; a deliberately broken
   scheme (weight scales 1.5x) must fail that check.
3. Block-sparse attention (keep 0.5, blocks of 16) on a 100-token prompt: exact against transformers with the
   selection rule of codegen/sparse_attention.py written again as an attention function; keep = 1.0 is dense.
The tokenizer and calibration text (AWQ, SmoothQuant) are written beside each checkpoint by the fixture.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import llmc
import llmc.passes.quantize as quantize_pass
from llmc.codegen.quant import QuantizedWeight, dequantize_weight, quantize_weight
from llmc.codegen.sparse_linear import decompress_24, prune_24

VOCAB = 97  # tests/conftest.py TINY_SHAPE
SHAPE = dict(hidden_size=64, num_attention_heads=8, head_dim=8)  # Llama wants hidden = heads x head_dim
GROUP = 16  # divides every GEMM's input channels: hidden and attention 64, intermediate 80
MODELS = {"qwen3-untied": ("qwen3", False), "qwen3-tied": ("qwen3", True), "llama": ("llama", False)}
WEIGHT_ONLY = {"fp8-w8a16": "fp8_w8a16", "int4": "int4_w4a16", "int4-awq": "int4_w4a16", "2:4": None}
NEW_TOKENS = 24
CALIBRATION_WORDS = 16 * 128 + 64  # calibration.py's 16 windows of max_seq_len (128) tokens, and some spare

# Teacher-forced agreement with transformers' float32 logits over TEACHER_TOKENS random tokens, as
# scheme -> (least top-1 agreement, least mean cosine of the logit vectors). Measured over 40 fresh checkpoints of
# each model (float32, cpu, group 16), as mean / sd / min of the mean cosine and of the top-1 rate:
#   scheme    Qwen3 (tied, untied) cosine    Llama cosine                  Llama top-1
#   fp8       0.989 / 0.003 / 0.984          0.979 / 0.004 / 0.970         0.74 / 0.07 / 0.62
#   int8      0.9992 / 0.0002 / 0.9989       0.9986 / 0.0002 / 0.9982      0.93 / 0.04 / 0.84
#   int8-rtn  0.9992 / 0.0002 / 0.9989       0.9985 / 0.0002 / 0.9979      0.93 / 0.03 / 0.81
#   w4a8      0.956 / 0.010 / 0.927          0.925 / 0.011 / 0.903         0.57 / 0.07 / 0.44
#   mixed     0.978 / 0.004 / 0.970          0.967 / 0.004 / 0.957         0.70 / 0.07 / 0.50
# Llama is the worst family for every scheme (no q/k norm: weight and activation error reach the attention logits
# unnormalised); Qwen3's top-1 rates are higher. Each threshold sits at least 4.5 sd of the Llama spread below
# its mean and below every value seen (int8's cosine bar far more: it still lies 0.035 above a broken int8).
# Weight scales 1.5x too large (BROKEN_CASES) measured, cosine mean / max over 20 seeds: fp8 on Llama 0.785 / 0.808,
# int8 and int8-rtn on Qwen3 0.934 / 0.961, w4a8 on Llama 0.755 / 0.806, all well below their thresholds. On
# Qwen3 (q and k normalised) the same break reaches 0.94 for w4a8 and mixed and 0.95 for fp8, inside or near the
# good range: the check cannot tell those apart, and those pairings are not used as broken cases.
ACTIVATION_THRESHOLDS = {"fp8": (0.42, 0.960), "int8": (0.75, 0.996), "int8-rtn": (0.75, 0.996),
                         "w4a8": (0.25, 0.870), "mixed": (0.37, 0.945)}
TEACHER_TOKENS = 64
ATTENTION_PROMPT = 100


def write_word_tokenizer(directory) -> list[str]:
    """A word-level tokenizer.json over VOCAB ids (calibration needs the model's tokenizer); returns its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(1, VOCAB)]
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    return words


@pytest.fixture(scope="module", autouse=True)
def _one_export_per_model(export_each_shape_once):
    """The 33 compiles of this module reuse one export per model (tests/conftest.py)."""


@pytest.fixture(scope="module")
def checkpoints(module_hf_checkpoint):
    """name -> TinyCheckpoint with a word tokenizer and a calibration text (calibration.txt) in its directory."""
    out = {}
    for name, (family, tied) in MODELS.items():
        ckpt = module_hf_checkpoint(family, tied=tied, **SHAPE)
        words = write_word_tokenizer(ckpt.path)
        # Zipf-like word frequencies, as text has: some input channels see much more mass than others.
        weights = 1.0 / torch.arange(1, len(words) + 1, dtype=torch.float64)
        picks = torch.multinomial(weights, CALIBRATION_WORDS, replacement=True)
        (ckpt.path / "calibration.txt").write_text(" ".join(words[i] for i in picks.tolist()), encoding="utf-8")
        out[name] = ckpt
    return out


def compile_scheme(ckpt, scheme: str, out, **options):
    if scheme == "2:4":
        return llmc.compile(ckpt.path, target="cpu", out=out, sparsity="2:4", dtype="float32", **options)
    needs_calibration = scheme in ("int4-awq", "int8")
    group = {"quant_group_size": GROUP} if scheme.startswith("int4") or scheme in ("w4a8", "mixed") else {}
    calibration = {"calibration": ckpt.path / "calibration.txt"} if needs_calibration else {}
    return llmc.compile(ckpt.path, target="cpu", out=out, quant=scheme, dtype="float32", **group,
                        **calibration, **options)


def bundle_tensors(bundle) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((bundle / "weights").glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def stored_parts(tensors: dict, stem: str) -> dict[str, torch.Tensor]:
    """The bundle's tensors derived from weight `stem` (our models' flat name), by what follows the last '__'
    (scheme_q / _scale / _zero / _in_scale, 24_values / 24_meta): graph_weights' naming rule."""
    parts = {name.rsplit("__", 1)[1]: t for name, t in tensors.items() if name.startswith(stem + "_weight__")}
    assert parts, f"the bundle stores nothing derived from {stem}: {sorted(tensors)}"
    return parts


def quantize_rows(folded: torch.Tensor, sizes: list[int], scheme: str) -> QuantizedWeight:
    """quantize_weight of each projection on its own, concatenated along N: scales are per output row (fp8) or per
    row and K group (int4), so this must be exactly what quantizing the merged weight gives."""
    parts = [quantize_weight(w, scheme, GROUP) for w in folded.split(sizes)]
    return QuantizedWeight(*(torch.cat(field) if field[0] is not None else None for field in zip(*parts)))


def assert_same_quantized(got: dict, want: QuantizedWeight, scheme: str, stem: str) -> None:
    bits = (lambda t: t.view(torch.uint8)) if scheme.startswith("fp8") else (lambda t: t)
    assert torch.equal(bits(got[f"{scheme}_q"]), bits(want.qweight)), f"{stem}: stored codes differ"
    assert torch.equal(got[f"{scheme}_scale"], want.scale), f"{stem}: stored scales differ"
    if want.zero is not None:
        assert torch.equal(got[f"{scheme}_zero"], want.zero), f"{stem}: stored zero points differ"


def effective_weight(folded: torch.Tensor, sizes: list[int], parts: dict, scheme: str) -> torch.Tensor:
    """The [N, K] weight the bundle multiplies the normalized (gain-free) input by, after checking that what the
    bundle stores is the quantization of `folded` = W * g that the reference assumes."""
    if scheme == "2:4":
        pruned = torch.cat([prune_24(w) for w in folded.split(sizes)])  # magnitude of W * g, not of W
        stored = decompress_24(parts["24_values"], parts["24_meta"], folded.shape[1])
        assert torch.equal(stored, pruned), "the stored 2:4 weight is not prune_24(W * g)"
        return pruned
    fmt = WEIGHT_ONLY[scheme]
    in_scale = parts.get(f"{fmt}_in_scale")
    if in_scale is None:
        qw = quantize_rows(folded, sizes, fmt)
        assert_same_quantized(parts, qw, fmt, scheme)
        return dequantize_weight(*qw, fmt, GROUP)
    # AWQ: the bundle quantized W * g * s and stores in_scale = 1 / s for the input. W * g / in_scale is W * g * s
    # to within an ulp, so its group scales differ in the last bits (about 1 in 5, measured) and a value on a
    # rounding boundary could take the next code (none seen): the reference dequantizes the stored tensors,
    # after checking that they dequantize to RTN of W * g / in_scale within float32 rounding.
    mine = quantize_rows(folded / in_scale, sizes, fmt)
    stored = QuantizedWeight(parts[f"{fmt}_q"], parts[f"{fmt}_scale"], parts[f"{fmt}_zero"])
    mine_w, stored_w = (dequantize_weight(*q, fmt, GROUP) for q in (mine, stored))
    differ = ~torch.isclose(mine_w, stored_w, rtol=1e-5, atol=1e-6)
    assert differ.float().mean() < 1e-3, f"{int(differ.sum())} of {differ.numel()} AWQ weights are not Q(W g s)"
    return stored_w * in_scale


def fake_quantized(model: torch.nn.Module, tensors: dict, scheme: str) -> torch.nn.Module:
    """A copy of the transformers model whose quantized Linear weights are dequantize(quantize(W * g)) / g."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            groups = [(layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn_q_k_v_proj"),
                      (None, [attn.o_proj], "self_attn_o_proj"),
                      (layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], "mlp_gate_up_proj"),
                      (None, [mlp.down_proj], "mlp_down_proj")]
            for gain, linears, stem in groups:
                w = torch.cat([lin.weight for lin in linears])
                gain = torch.ones(w.shape[1]) if gain is None else gain
                sizes = [lin.weight.shape[0] for lin in linears]
                parts = stored_parts(tensors, f"layers_{i}_{stem}")
                effective = effective_weight(w * gain, sizes, parts, scheme) / gain
                for lin, part in zip(linears, effective.split(sizes)):
                    lin.weight.copy_(part)
    return ref


@pytest.mark.parametrize("scheme", list(WEIGHT_ONLY))
@pytest.mark.parametrize("model", list(MODELS))
def test_weight_only_bundle_generates_the_fake_quantized_models_tokens(checkpoints, hf_greedy, tmp_path, model,
                                                                       scheme):
    """Exact check: the bundle's greedy tokens == transformers' greedy tokens with every quantized weight replaced
    by the one the bundle uses (stored tensors checked bit for bit against quantize_weight / prune_24 of W * g)."""
    ckpt = checkpoints[model]
    bundle = compile_scheme(ckpt, scheme, tmp_path / "b.llmc")
    tensors = bundle_tensors(bundle)
    if scheme == "int4-awq":  # AWQ searched scales that beat RTN for some GEMM, or it tested nothing RTN does not
        assert any(name.endswith("_in_scale") for name in tensors), sorted(tensors)
    reference = fake_quantized(ckpt.model, tensors, scheme)
    probe = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():  # the reference is not the original model in disguise
        moved = (reference(probe).logits - ckpt.model(probe).logits).abs().max()
    assert moved > 1e-3, f"{scheme} changed the logits by only {moved:.2e}"
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 19, 2)]
    got = llmc.load(bundle).generate(prompts, max_new_tokens=NEW_TOKENS)
    assert got == [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    transformed = [n for n in tensors if n.endswith(("_q", "_24_values"))]
    assert len(transformed) == 4 * len(ckpt.model.model.layers)
    assert not any(n.startswith(("lm_head", "embed_tokens")) for n in transformed), transformed


def teacher_forced_logits(engine, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: row i = the bundle's next-token logits after tokens[: i + 1] (a one-token prefill, then
    one decode step per token, the ground-truth token fed each time), in the first blocks of an idle engine."""
    blocks = list(range(-(-len(tokens) // engine.cache.block_size)))
    rows = [engine.run_step("prefill", [blocks], [0], [tokens[:1]])]
    rows += [engine.run_step("decode", [blocks], [i], [tokens[i:i + 1]]) for i in range(1, len(tokens))]
    return torch.cat(rows).float()


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(fraction of positions with the same top-1 token, mean cosine of the logit vectors)."""
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean()
    return float(top1), float(F.cosine_similarity(got, want, dim=-1).mean())


def teacher_forced_agreement(bundle, ckpt) -> tuple[float, float]:
    tokens = torch.randint(0, VOCAB, (TEACHER_TOKENS,)).tolist()
    with torch.no_grad():
        want = ckpt.model(torch.tensor([tokens])).logits[0].float()
    return agreement(teacher_forced_logits(llmc.load(bundle), tokens), want)


def within(scheme: str, measured: tuple[float, float]) -> bool:
    least_top1, least_cosine = ACTIVATION_THRESHOLDS[scheme]
    return measured[0] >= least_top1 and measured[1] >= least_cosine


@pytest.mark.parametrize("scheme", list(ACTIVATION_THRESHOLDS))
@pytest.mark.parametrize("model", list(MODELS))
def test_activation_quantized_logits_follow_transformers(checkpoints, tmp_path, model, scheme):
    """Teacher-forced top-1 agreement and mean logit cosine against transformers' float32 model stay above the
    scheme's thresholds (ACTIVATION_THRESHOLDS, with the measurements behind them)."""
    ckpt = checkpoints[model]
    measured = teacher_forced_agreement(compile_scheme(ckpt, scheme, tmp_path / "b.llmc"), ckpt)
    assert within(scheme, measured), f"{scheme} on {model}: top-1 agreement {measured[0]:.3f}, cosine {measured[1]:.4f}"


# Pairings where a 1.5x scale error falls far below the scheme's threshold on every seed measured (see above).
BROKEN_CASES = [("fp8", "llama"), ("int8", "qwen3-untied"), ("int8-rtn", "qwen3-tied"), ("w4a8", "llama")]


@pytest.mark.parametrize("scheme,model", BROKEN_CASES)
def test_a_broken_scheme_fails_the_agreement_check(checkpoints, tmp_path, monkeypatch, scheme, model):
    """Weight scales 1.5x too large (every dequantized weight 1.5x its value): the check above must reject it."""
    def scaled_up(w, fmt, group_size=128):
        q = quantize_weight(w, fmt, group_size)
        return q._replace(scale=q.scale * 1.5)

    monkeypatch.setattr(quantize_pass, "quantize_weight", scaled_up)
    ckpt = checkpoints[model]
    measured = teacher_forced_agreement(compile_scheme(ckpt, scheme, tmp_path / "b.llmc"), ckpt)
    assert not within(scheme, measured), f"broken {scheme} passed: top-1 {measured[0]:.3f}, cosine {measured[1]:.4f}"


def block_sparse_attention(keep: float, block: int):
    """A transformers attention function (AttentionInterface) for one unpadded sequence: llmc's block selection
    as codegen/sparse_attention.py's docstring states it, written again from that text, then eager attention
    over the kept blocks. query [B, H, S, D] (after RoPE), key / value [B, Hkv, T, D] with the S new tokens last."""
    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        batch, heads, seq, _ = query.shape
        total = key.shape[2]
        key = key.repeat_interleave(heads // key.shape[1], dim=1).float()
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
        q_pos, k_pos = torch.arange(total - seq, total), torch.arange(total)
        q_block, k_block = q_pos // block, k_pos // block
        num_k = int(k_block[-1]) + 1
        kept = torch.zeros(batch, heads, num_k, num_k, dtype=torch.bool)  # [.., query block, key block]
        pooled_k = torch.stack([key[:, :, k_block == j].mean(2) for j in range(num_k)], dim=2)  # [B, H, NK, D]
        for n in q_block.unique().tolist():
            pooled_q = query[:, :, q_block == n].float().mean(2)  # the rows of this step in query block n
            scores = torch.einsum("bhd,bhkd->bhk", pooled_q, pooled_k) * scaling
            visible = n + 1  # causal: key blocks 0..n each hold a key some query of block n sees
            budget = max(math.ceil(keep * visible - 1e-6), 2 if n else 1)
            for b in range(batch):
                for h in range(heads):
                    others = sorted(range(1, n), key=lambda j: (-float(scores[b, h, j]), j))
                    kept[b, h, n, [0, n, *others[: budget - (2 if n else 1)]]] = True
        allowed = (k_pos[None] <= q_pos[:, None]) & kept[:, :, q_block][..., k_block]  # [B, H, S, T]
        logits = (query.float() @ key.transpose(2, 3)) * scaling
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).to(value.dtype)
        return (weights @ value).transpose(1, 2).contiguous(), None

    return attend


def test_block_sparse_attention_matches_its_reference_and_keep_one_is_dense(checkpoints, hf_greedy, tmp_path,
                                                                              monkeypatch):
    """keep 0.5 of 16-token key blocks, a 100-token prompt (7 key blocks): the bundle's greedy tokens and the
    last-token logits of prefills of growing prefixes equal transformers' with the block-sparse attention above;
    keep 1.0: transformers' dense tokens.

    No bar on the cosine to dense attention: these random-weight models attend without locality or sinks, so
    dropping half the blocks drops about half of what attention reads. Measured over 18 checkpoints (3 models,
    prefixes 40..100): cosine to dense 0.46 to 0.63 on average per checkpoint, -0.14 at worst. The check that
    sparsity took effect is that the logits moved."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ckpt = checkpoints["qwen3-untied"]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "llmc_block_sparse", block_sparse_attention(0.5, 16))
    reference = copy.deepcopy(ckpt.model)
    reference.set_attn_implementation("llmc_block_sparse")
    prompt = torch.randint(0, VOCAB, (ATTENTION_PROMPT,)).tolist()
    sparse = llmc.load(llmc.compile(ckpt.path, target="cpu", out=tmp_path / "sparse.llmc", attention_keep=0.5,
                                    attention_block=16, dtype="float32"))
    assert sparse.generate([prompt], max_new_tokens=16) == [hf_greedy(reference, prompt, 16)]
    lengths = list(range(40, ATTENTION_PROMPT + 1, 12))
    blocks = list(range(-(-ATTENTION_PROMPT // sparse.cache.block_size)))
    got = torch.cat([sparse.run_step("prefill", [blocks], [0], [prompt[:n]]) for n in lengths])
    with torch.no_grad():
        want = torch.cat([reference(torch.tensor([prompt[:n]])).logits[:, -1] for n in lengths])
        dense = ckpt.model(torch.tensor([prompt])).logits[0, [n - 1 for n in lengths]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cosine = F.cosine_similarity(got, dense, dim=-1)
    assert (got - dense).abs().max() > 0.1, f"keep 0.5 changed nothing; cosine to dense {cosine}"
    full = llmc.load(llmc.compile(ckpt.path, target="cpu", out=tmp_path / "full.llmc", attention_keep=1.0,
                                  attention_block=16, dtype="float32"))
    assert full.generate([prompt], max_new_tokens=16) == [hf_greedy(ckpt.model, prompt, 16)]
