"""Phi-style text decoder: parallel attention + MLP blocks, partial RoPE, bidirectional image prefix.

One forward serves every phase: image prefill, prompt prefill, single-token decode (with a KV cache)
and whole-sequence training (without one). Callers pass absolute positions and a boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextConfig
from .layers import MLP
from .rope import apply_rope


def attention_mask(q_positions: torch.Tensor, kv_len: int, prefix_len: int) -> torch.Tensor:
    """(B, 1, T, kv_len) bool, True = may attend. Causal, except the image prefix sees itself whole.

    Key slot s holds position s, so the same rule serves cached decoding and cache-free training.
    """
    q = q_positions.unsqueeze(-1)  # (B, T, 1)
    s = torch.arange(kv_len, device=q_positions.device)
    allowed = (s <= q) | ((s < prefix_len) & (q < prefix_len))
    return allowed.unsqueeze(1)


class KVCache:
    """Keys (post-RoPE) and values of every block for a batch, sized to the longest sequence of a call."""

    def __init__(self, config: TextConfig, batch: int, capacity: int, device, dtype):
        shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.qkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x, positions, mask, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        b, t, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_heads(q, self.n_heads)
        k = apply_heads(k, self.n_kv_heads)
        v = apply_heads(v, self.n_kv_heads)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        if cache is not None:
            k_cache, v_cache = cache
            rows = torch.arange(b, device=x.device).unsqueeze(1)
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
            k, v = k_cache[:, :, : mask.shape[-1]], v_cache[:, :, : mask.shape[-1]]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


def apply_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


class TextBlock(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.dim)
        self.attn = TextAttention(config)
        self.mlp = MLP(config.dim, config.ff_dim)

    def forward(self, x, positions, mask, cache=None):
        h = self.ln(x)
        return x + self.attn(h, positions, mask, cache) + self.mlp(h)


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Parameter(torch.zeros(config.vocab_size, config.dim))
        self.blocks = nn.ModuleList(TextBlock(config) for _ in range(config.n_layers))
        self.post_ln = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.wte)

    def forward(self, embeds, positions, mask, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states before the final norm: the region head reads these, the LM head normalises."""
        x = embeds
        for i, block in enumerate(self.blocks):
            x = block(x, positions, mask, None if cache is None else (cache.k[i], cache.v[i]))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.post_ln(hidden))

