"""Region head: turns coordinates and sizes into text-width embeddings and hidden states into bins.

Coordinates (box centres, points) use `coord_out_dim` uniform bins over [0, 1]; width and height use
`size_out_dim / 2` log-uniform bins from 1/2^SIZE_LOG2_RANGE to 1. The bin <-> value mappings below are
the only ones in the project: inference, training labels and teacher-forced inputs all use them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import RegionConfig
from .layers import MLP

SIZE_LOG2_RANGE = 10.0  # smallest size bin is 2**-10 of the image side


def fourier_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[cos(2*pi*x@W), sin(2*pi*x@W)], the product taken as (2*pi*x) @ W like the released model."""
    f = (2 * math.pi * x) @ w
    return torch.cat([f.cos(), f.sin()], dim=-1)


def bin_to_coord(bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    return bins.float() / n_bins


def coord_to_bin(coords: torch.Tensor, n_bins: int) -> torch.Tensor:
    return torch.round(coords.float() * n_bins).clamp(0, n_bins - 1).long()


def bin_to_size(bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    return torch.pow(2.0, bins.float() / (n_bins - 1) * SIZE_LOG2_RANGE - SIZE_LOG2_RANGE)


def size_to_bin(sizes: torch.Tensor, n_bins: int) -> torch.Tensor:
    log2 = torch.log2(sizes.float().clamp(min=2.0**-SIZE_LOG2_RANGE))
    return torch.round((log2 + SIZE_LOG2_RANGE) / SIZE_LOG2_RANGE * (n_bins - 1)).clamp(0, n_bins - 1).long()


class RegionHead(nn.Module):
    def __init__(self, config: RegionConfig):
        super().__init__()
        self.config = config
        self.coord_features = nn.Parameter(torch.zeros(1, config.coord_feat_dim // 2))
        self.coord_encoder = nn.Linear(config.coord_feat_dim, config.dim)
        self.size_features = nn.Parameter(torch.zeros(2, config.size_feat_dim // 2))
        self.size_encoder = nn.Linear(config.size_feat_dim, config.dim)
        self.coord_decoder = self._decoder(config.coord_out_dim)
        self.size_decoder = self._decoder(config.size_out_dim)
        if config.use_layernorm:
            self.ln = nn.LayerNorm(config.dim)

    def add_layernorm(self) -> None:
        """Switch on the pre-decoder LayerNorm of newer Moondream 3 revisions (weights come from a load)."""
        self.config.use_layernorm = True
        self.ln = nn.LayerNorm(self.config.dim, device=self.coord_encoder.weight.device,
                               dtype=self.coord_encoder.weight.dtype)

    def _decoder(self, out_dim: int) -> nn.Module:
        if self.config.inner_dim is None:
            return nn.Linear(self.config.dim, out_dim)
        return MLP(self.config.dim, self.config.inner_dim, out_dim)

    @property
    def coord_bins(self) -> int:
        return self.config.coord_out_dim

    @property
    def size_bins(self) -> int:
        return self.config.size_out_dim // 2

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln(hidden) if self.config.use_layernorm else hidden

    def encode_coordinate(self, coord: torch.Tensor) -> torch.Tensor:
        """(..., 1) coordinate in [0, 1] -> (..., dim) embedding."""
        w = self.coord_features
        return self.coord_encoder(fourier_features(coord.to(w.dtype), w))

    def encode_size(self, size: torch.Tensor) -> torch.Tensor:
        """(..., 2) [width, height] -> (..., dim) embedding."""
        w = self.size_features
        return self.size_encoder(fourier_features(size.to(w.dtype), w))

    def decode_coordinate(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., coord_bins) logits."""
        return self.coord_decoder(self._normed(hidden))

    def decode_size(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 2, size_bins) logits; row 0 is width, row 1 height."""
        return self.size_decoder(self._normed(hidden)).unflatten(-1, (2, self.size_bins))
