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
    """Keys (post-RoPE) and values of every block for a batch, sized to the longest sequence of a call.

    Slot s holds position s. Writes are in place, except with `differentiable=True`, where each write
    makes a new tensor so that autograd can run through step-by-step decoding (used to check that the
    one-pass training forward equals the decode path).
    """

    def __init__(self, config: TextConfig, batch: int, capacity: int, device, dtype, differentiable: bool = False):
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.differentiable = differentiable

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Store k, v (B, H, T, head_dim) at `positions` (B, T); return the first kv_len slots."""
        b, h = k.shape[:2]
        index = (
            torch.arange(b, device=k.device).view(b, 1, 1),
            torch.arange(h, device=k.device).view(1, h, 1),
            positions.unsqueeze(1),
        )
        if self.differentiable:
            self.k[layer] = self.k[layer].index_put(index, k)
            self.v[layer] = self.v[layer].index_put(index, v)
        else:
            self.k[layer].index_put_(index, k)
            self.v[layer].index_put_(index, v)
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.qkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x, positions, mask, cache: KVCache | None = None, layer: int = 0):
        b, t, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_heads(q, self.n_heads)
        k = apply_heads(k, self.n_kv_heads)
        v = apply_heads(v, self.n_kv_heads)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v, kv_len=mask.shape[-1])
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

    def forward(self, x, positions, mask, cache: KVCache | None = None, layer: int = 0):
        h = self.ln(x)
        return x + self.attn(h, positions, mask, cache, layer) + self.mlp(h)


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
            x = block(x, positions, mask, cache, i)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.post_ln(hidden))

