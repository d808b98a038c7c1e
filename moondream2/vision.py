"""SigLIP-style vision encoder with Moondream's crop stitching and projection to text width."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig
from .layers import MLP


class VisionAttention(nn.Module):
    """Unmasked multi-head self-attention; qkv is one Linear split into contiguous q | k | v."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.enc_dim)
        self.attn = VisionAttention(config.enc_dim, config.enc_n_heads)
        self.ln2 = nn.LayerNorm(config.enc_dim)
        self.mlp = MLP(config.enc_dim, config.enc_ff_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def patchify(crops: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, patches, C*patch*patch), patches row-major, each flattened channel-major."""
    n, c, h, w = crops.shape
    x = crops.view(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def stitch_local_features(local: torch.Tensor, tiling: tuple[int, int], margin: int) -> torch.Tensor:
    """Paste the local crops' patch grids onto one canvas, keeping each tile's non-overlapping part.

    local: (rows*cols, g, g, C). Inner tiles contribute their centre [margin, g - margin); tiles on the
    image border also keep the margin on that side, so the canvas covers the whole resized image.
    """
    rows, cols = tiling
    _, g, _, channels = local.shape
    step = g - 2 * margin
    canvas = local.new_zeros(rows * step + 2 * margin, cols * step + 2 * margin, channels)
    grid = local.view(rows, cols, g, g, channels)
    for r in range(rows):
        r0, r1 = (0 if r == 0 else margin), (g if r == rows - 1 else g - margin)
        for c in range(cols):
            c0, c1 = (0 if c == 0 else margin), (g if c == cols - 1 else g - margin)
            canvas[r * step + r0 : r * step + r1, c * step + c0 : c * step + c1] = grid[r, c, r0:r1, c0:c1]
    return canvas


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        patch_dim = config.in_channels * config.enc_patch_size**2
        self.patch_emb = nn.Linear(patch_dim, config.enc_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.n_patches, config.enc_dim))
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.enc_n_layers))
        self.post_ln = nn.LayerNorm(config.enc_dim)
        self.proj_mlp = MLP(2 * config.enc_dim, config.proj_inner_dim, config.proj_out_dim)

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, crop, crop) normalised pixels -> (N, patches, enc_dim) features."""
        x = self.patch_emb(patchify(crops, self.config.enc_patch_size)) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.post_ln(x)

    def project(self, features: torch.Tensor, tiling: tuple[int, int]) -> torch.Tensor:
        """Global features + pooled stitched local features -> (patches, text width) image tokens."""
        g = self.config.grid_size
        global_features = features[0]
        local = features[1:].view(-1, g, g, features.shape[-1])
        canvas = stitch_local_features(local, tiling, self.config.overlap_margin)
        pool_device = "cpu" if canvas.device.type == "mps" else canvas.device
        pooled = F.adaptive_avg_pool2d(canvas.permute(2, 0, 1).to(pool_device), (g, g)).to(canvas.device)
        pooled = pooled.permute(1, 2, 0).reshape(g * g, -1)
        return self.proj_mlp(torch.cat([global_features, pooled], dim=-1))

    def forward(self, crops: torch.Tensor, tiling: tuple[int, int]) -> torch.Tensor:
        return self.project(self.encode_crops(crops), tiling)
