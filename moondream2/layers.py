"""Building blocks shared by the vision encoder, text decoder and region head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Every GELU in Moondream is the tanh approximation."""
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim_out if dim_out is not None else dim_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x)))
