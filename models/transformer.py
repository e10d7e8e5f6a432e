"""The Qwen3 / Qwen2 / Llama-3 dense decoder in plain torch (gpt-fast style: no hand fusion; the compiler fuses).

Parameter names follow the Hugging Face checkpoints without the "model." prefix, so loading is a rename.

Two ways to run it:
- `model(input_ids)`: causal attention over the given tokens, logits for every position (training, eval).
- `model(input_ids, positions, kv=PagedKV(...), last_index=...)`: one step over a paged KV cache. The cache is
  only read here; the step returns the new keys and values ([L, B, S, Hkv, D]) and the runtime writes them into
  their slots. That keeps the traced graph free of in-place updates of the (large) cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import rope_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 and cast back, as the reference implementations do.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class PagedKV:
    """A read-only view of the paged cache for one step.

    k_cache, v_cache: [L, num_blocks, block_size, Hkv, D]; block_table: [B, max_blocks] block ids per sequence
    (padding entries may be any valid id); past_lens: [B] tokens already in the cache for each sequence.
    """

    def __init__(self, k_cache, v_cache, block_table, past_lens):
        self.k_cache, self.v_cache, self.block_table, self.past_lens = k_cache, v_cache, block_table, past_lens

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.block_table.shape[0]
        k = self.k_cache[layer][self.block_table]  # [B, MB, BS, Hkv, D]
        v = self.v_cache[layer][self.block_table]
        return k.flatten(1, 2), v.flatten(1, 2)

    def mask(self, seq_len: int, device) -> torch.Tensor:
        """[B, 1, S, P + S] True where a query may attend: cached tokens of its sequence, then causal."""
        b, max_blocks = self.block_table.shape
        past = max_blocks * self.k_cache.shape[2]
        past_ok = torch.arange(past, device=device)[None, :] < self.past_lens[:, None]  # [B, P]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()  # [S, S]
        return torch.cat([past_ok[:, None, :].expand(b, seq_len, past), causal[None].expand(b, seq_len, seq_len)], -1)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * rep, T, D], each kv head serving `rep` consecutive query heads."""
    if rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, kv: PagedKV | None, layer: int, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # [B, S, H, D]
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = k, v
        if kv is not None:
            past_k, past_v = kv.past(layer)  # [B, P, Hkv, D]
            keys, values = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        rep = self.n_heads // self.n_kv
        qh = q.transpose(1, 2)  # [B, H, S, D]
        kh, vh = repeat_kv(keys.transpose(1, 2), rep), repeat_kv(values.transpose(1, 2), rep)  # [B, H, T, D]
        if mask is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        o = o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(o), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv, layer, mask):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, kv, layer, mask)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.attention_scaling = 1.0
        self.init_rope()

    def tie_weights(self):
        """Shares lm_head with the embedding when the config ties them (again after `to_empty`, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_rope(self):
        """(Re)computes the RoPE frequencies; call after materializing a meta-device model."""
        cfg = self.config
        inv_freq, self.attention_scaling = rope_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = inv_freq.to(self.inv_freq.device)

    def real_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers' values on the CPU, computed from the config (for a model that lives on the meta device)."""
        cfg = self.config
        inv_freq, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        return {"inv_freq": inv_freq}

    def _apply(self, fn, recurse=True):
        # nn.Module.to(bfloat16) casts buffers too; bf16 RoPE frequencies put the rotation off by whole radians at
        # long positions. They stay float32 (as transformers' from_pretrained keeps them), recomputed from config.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = torch.empty(self.inv_freq.shape, dtype=torch.float32, device=self.inv_freq.device)
            self.init_rope()
        return self

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def forward(self, input_ids, positions=None, kv: PagedKV | None = None, last_index=None):
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)  # [B, S, hidden]
        if positions is None:
            positions = torch.arange(s, device=input_ids.device)[None].expand(b, s)
        cos, sin = self.rope(positions, x.dtype)
        mask = kv.mask(s, x.device) if kv is not None else None
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, kv, i, mask)
            new_k.append(k)
            new_v.append(v)
        x = self.norm(x)
        if last_index is not None:
            x = x[torch.arange(b, device=x.device), last_index]  # [B, hidden]
        logits = self.lm_head(x)
        if kv is None:
            return logits
        return logits, torch.stack(new_k), torch.stack(new_v)  # [B, V], [L, B, S, Hkv, D] x2
