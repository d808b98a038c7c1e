"""Partial rotary position embedding: the first half of each head's dims rotate, the rest pass through.

The original writes the rotated pairs interleaved; q and k get the same permutation, so attention
scores equal the "rotate-half" layout used here. Only the order of cached key dims differs, and our
caches never leave this package. Angles are computed in float32 from the positions on every call, so
casting the model to bfloat16 never degrades them.
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (B, H, T, head_dim); positions: (B, T) absolute positions."""
    half = x.shape[-1] // 4
    freqs = 1.0 / (theta ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (B, T, half)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    a, b = x[..., :half].float(), x[..., half : 2 * half].float()
    rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)
