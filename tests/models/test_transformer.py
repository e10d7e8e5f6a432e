"""Our Transformer against transformers' Qwen3 / Llama, and its paged step against its own plain forward."""
import math

import pytest
import torch

from llmc.models import PagedKV, Transformer
from llmc.models.loader import load_checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

CASES = {
    "qwen3-untied-kv2": dict(family="qwen3"),
    # head_dim 16 != hidden / heads: q_proj widens to 96, as Qwen3's real configs do.
    "qwen3-tied-kv3-head16": dict(family="qwen3", tied=True, num_key_value_heads=3, head_dim=16),
    "qwen3-yarn": dict(family="qwen3", rope=YARN, rope_theta=1e6),
    "llama-untied-kv2": dict(family="llama"),
    "llama-tied-kv3-bias": dict(family="llama", tied=True, num_key_value_heads=3, attention_bias=True),
    "llama-llama3-rope": dict(family="llama", rope=LLAMA3, rope_theta=5e5),
    "llama-linear-rope": dict(family="llama", rope={"rope_type": "linear", "factor": 2.5}),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_logits_equal_transformers(tiny_hf_checkpoint, case):
    ckpt = tiny_hf_checkpoint(**CASES[case])
    ours = load_checkpoint(ckpt.path)
    ids = torch.randint(0, 97, (2, 13))
    # Positions past original_max_position_embeddings (32), where scaled and unscaled RoPE differ most.
    start = int(torch.randint(20, 100, ()))
    positions = torch.arange(start, start + 13)[None].expand(2, 13)
    with torch.no_grad():
        expected = ckpt.model(ids, position_ids=positions).logits
        got = ours(ids, positions)
    assert got.shape == (2, 13, 97)
    torch.testing.assert_close(got, expected)
    assert expected.std() > 0.1  # logits big enough that a wrong weight shows


class PagedRun:
    """Drives the paged step as the runtime would: a block pool of poison, non-contiguous block ids per sequence,
    and the returned new keys/values written into their slots by hand."""

    def __init__(self, model: Transformer, max_len: list[int], block_size: int):
        cfg = model.config
        self.model, self.block_size = model, block_size
        blocks_needed = [math.ceil(n / block_size) for n in max_len]
        max_blocks = max(blocks_needed) + 1  # one spare column: padding entries beyond every sequence's end
        num_blocks = sum(blocks_needed) + 3
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Poison: masked slots must not leak into the result.
        self.k_cache, self.v_cache = 100 * torch.randn(shape), 100 * torch.randn(shape)
        ids = torch.randperm(num_blocks)
        # Padding entries point at random blocks, other sequences' included.
        self.block_table = torch.randint(0, num_blocks, (len(max_len), max_blocks))
        taken = 0
        for b, n in enumerate(blocks_needed):
            self.block_table[b, :n] = ids[taken:taken + n]
            taken += n
        self.past_lens = torch.zeros(len(max_len), dtype=torch.int64)

    def step(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Runs one step with each sequence's new tokens (lengths may differ: right-padded) -> logits [B, V]."""
        lens = torch.tensor([len(c) for c in chunks])
        width = int(lens.max())
        ids = torch.randint(0, 97, (len(chunks), width))  # random padding, not zeros
        for b, c in enumerate(chunks):
            ids[b, :len(c)] = c
        positions = self.past_lens[:, None] + torch.arange(width)[None]
        kv = PagedKV(self.k_cache, self.v_cache, self.block_table, self.past_lens)
        with torch.no_grad():
            logits, new_k, new_v = self.model(ids, positions, kv=kv, last_index=lens - 1)
        cfg = self.model.config
        assert new_k.shape == (cfg.num_layers, len(chunks), width, cfg.num_kv_heads, cfg.head_dim)
        for b, n in enumerate(lens.tolist()):
            for t in range(n):
                pos = int(self.past_lens[b]) + t
                block = self.block_table[b, pos // self.block_size]
                self.k_cache[:, block, pos % self.block_size] = new_k[:, b, t]
                self.v_cache[:, block, pos % self.block_size] = new_v[:, b, t]
        self.past_lens = self.past_lens + lens
        return logits


@pytest.mark.parametrize("prefill_chunks", [1, 2])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_paged_steps_equal_plain_forward(tiny_model, family, prefill_chunks):
    model = tiny_model(family, num_kv_heads=3 if family == "llama" else 2)
    prompt_lens = [7, 3, 10]
    decode_steps = 4
    tokens = [torch.randint(0, 97, (n + decode_steps,)) for n in prompt_lens]
    with torch.no_grad():
        plain = [model(t[None])[0] for t in tokens]  # [T, V] per sequence, causal over the whole sequence
    run = PagedRun(model, [len(t) for t in tokens], block_size=4)  # 4 divides none of the total lengths

    # Chunked prefill: the second chunk attends to the first through the cache.
    cuts = [n // 2 if prefill_chunks == 2 else n for n in prompt_lens]
    logits = run.step([t[:c] for t, c in zip(tokens, cuts)])
    if prefill_chunks == 2:
        for b, c in enumerate(cuts):
            torch.testing.assert_close(logits[b], plain[b][c - 1], rtol=1e-4, atol=1e-4)
        logits = run.step([t[c:n] for t, c, n in zip(tokens, cuts, prompt_lens)])
    for b, n in enumerate(prompt_lens):
        torch.testing.assert_close(logits[b], plain[b][n - 1], rtol=1e-4, atol=1e-4)

    for step in range(decode_steps):
        logits = run.step([t[n + step:n + step + 1] for t, n in zip(tokens, prompt_lens)])
        for b, n in enumerate(prompt_lens):
            torch.testing.assert_close(logits[b], plain[b][n + step], rtol=1e-4, atol=1e-4)


def test_plain_forward_is_causal(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 9))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1 + torch.randint(0, 96, (2, 3))) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_tied_model_shares_lm_head_with_embedding(tiny_model):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False))) - 1


def test_meta_model_materializes_with_rope(tiny_model):
    cfg = tiny_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}).config
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_rope()
    reference = Transformer(cfg)
    torch.testing.assert_close(model.inv_freq, reference.inv_freq, rtol=0, atol=0)


def test_rope_frequencies_stay_float32_when_the_model_is_cast(tiny_model):
    model = tiny_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    expected = model.inv_freq.clone()
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        assert model.embed_tokens.weight.dtype == dtype
        assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, expected)
