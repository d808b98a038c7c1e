"""Phi-style text decoder: parallel attention + MLP blocks, partial RoPE, bidirectional image prefix.

One forward serves every phase: image prefill, prompt prefill, single-token decode (with a KV cache)
and whole-sequence training (without one). Callers pass absolute positions and a boolean mask.
Moondream 3 adds, by config: tau scaling of q and v, and mixture-of-experts MLPs in later blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import TextConfig
from .layers import MLP
from .moe import MoeMLP
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
        # Under autocast the projections give bfloat16 whatever the cache holds (float32 on a CPU).
        k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)
        if self.differentiable:
            self.k[layer] = self.k[layer].index_put(index, k)
            self.v[layer] = self.v[layer].index_put(index, v)
        else:
            self.k[layer].index_put_(index, k)
            self.v[layer].index_put_(index, v)
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]


class Tau(nn.Module):
    """Moondream 3's gain on each head's q and v, per token: one part from the token's whole qkv
    vector, one growing with log-position at a learned per-head rate. Zero weights mean a gain of 1.
    """

    def __init__(self, qkv_dim: int, n_heads: int):
        super().__init__()
        self.wq = nn.Parameter(torch.zeros(n_heads, qkv_dim))
        self.wv = nn.Parameter(torch.zeros(n_heads, qkv_dim))
        self.alpha = nn.Parameter(torch.zeros(n_heads))

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv (B, T, qkv_dim), positions (B, T) -> gains for q and v, each (B, H, T, 1)."""
        f = F.gelu(qkv)  # exact GELU here, unlike the dense MLPs
        tq = torch.tanh(f @ self.wq.t()).transpose(1, 2)
        tv = torch.tanh(f @ self.wv.t()).transpose(1, 2)
        # The original casts positions to the activation dtype before adding 1 (coarse in bf16).
        log_pos = torch.log(positions.to(qkv.dtype) + 1).unsqueeze(1)  # (B, 1, T)
        tpos = 1 + (torch.sigmoid(self.alpha.unsqueeze(-1) * log_pos) - 0.5)
        return (tq + tpos).unsqueeze(-1), (tv + tpos).unsqueeze(-1)


class TextAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        qkv_dim = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.dim, qkv_dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.use_tau = config.use_tau
        if config.use_tau:
            if config.n_kv_heads != config.n_heads:
                raise ValueError("tau scaling is defined for plain multi-head attention (n_kv_heads == n_heads)")
            self.tau = Tau(qkv_dim, config.n_heads)

    def forward(self, x, positions, mask, cache: KVCache | None = None, layer: int = 0):
        b, t, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.qkv(x)
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_heads(q, self.n_heads)
        k = apply_heads(k, self.n_kv_heads)
        v = apply_heads(v, self.n_kv_heads)
        if self.use_tau:
            tau_q, tau_v = self.tau(qkv, positions)
            q, v = q * tau_q, v * tau_v
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
    def __init__(self, config: TextConfig, index: int):
        super().__init__()
        self.ln = nn.LayerNorm(config.dim)
        self.attn = TextAttention(config)
        if config.moe is not None and index >= config.moe.start_layer:
            self.mlp = MoeMLP(config.dim, config.moe)
        else:
            self.mlp = MLP(config.dim, config.ff_dim)

    def forward(self, x, positions, mask, cache: KVCache | None = None, layer: int = 0):
        h = self.ln(x)
        return x + self.attn(h, positions, mask, cache, layer) + self.mlp(h)


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Parameter(torch.zeros(config.vocab_size, config.dim))
        self.blocks = nn.ModuleList(TextBlock(config, i) for i in range(config.n_layers))
        self.post_ln = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size)
        # Training forward only: recompute each block's activations in backward instead of storing them.
        self.gradient_checkpointing = False

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.wte)

    def forward(self, embeds, positions, mask, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states before the final norm: the region head reads these, the LM head normalises."""
        x = embeds
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, positions, mask, use_reentrant=False)
            else:
                x = block(x, positions, mask, cache, i)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.post_ln(hidden))

