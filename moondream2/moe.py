"""Moondream 3's mixture-of-experts MLP: a biased router picks the top-k of E gated-GELU experts.

Expert weights are stacked the way the checkpoint stores them: `fc1.weight` is (E, 2*inner, dim)
with the GELU branch in the first `inner` rows and the gate in the rest, `fc2.weight` is
(E, dim, inner); neither has a bias. Tokens are grouped by expert so each expert runs one matmul
over all of its tokens, whether the call is a whole sequence or one decode step per sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextMoeConfig


class Experts(nn.Module):
    """A stack of E bias-free Linear weights, (E, out, in); a module only so the key reads `….weight`."""

    def __init__(self, n: int, dim_in: int, dim_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dim_out, dim_in))
        bound = 1 / math.sqrt(dim_in)  # nn.Linear's default init, per expert
        nn.init.uniform_(self.weight, -bound, bound)

    def apply_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's Linear on its tokens (N_e, in) -> (N_e, out); adapters override this."""
        return F.linear(x, self.weight[e])


class MoeMLP(nn.Module):
    def __init__(self, dim: int, config: TextMoeConfig):
        super().__init__()
        self.top_k = config.experts_per_token
        self.router = nn.Linear(dim, config.num_experts)
        self.fc1 = Experts(config.num_experts, dim, 2 * config.expert_inner_dim)
        self.fc2 = Experts(config.num_experts, config.expert_inner_dim, dim)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim) -> chosen experts (N, k) and their weights: softmax over the k chosen logits only."""
        top_logits, experts = self.router(x).topk(self.top_k, dim=-1)
        return experts, top_logits.float().softmax(dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts, weights = self.route(x)
        # Sort the N*k (token, expert) assignments by expert, so each expert's tokens are contiguous.
        order = experts.flatten().argsort(stable=True)
        token = order // self.top_k
        counts = experts.flatten().bincount(minlength=self.fc1.weight.shape[0]).tolist()
        groups = x[token].split(counts)
        outputs = [self.expert(group, e) for e, group in enumerate(groups) if counts[e]]
        y = torch.cat(outputs) * weights.flatten()[order].unsqueeze(-1)
        return x.new_zeros(x.shape).index_add(0, token, y).view(shape)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """GELU(a) * (g + 1) with a, g the two halves of fc1: a gated GELU whose gate is shifted by 1."""
        a, g = self.fc1.apply_expert(x, e).chunk(2, dim=-1)
        return self.fc2.apply_expert(F.gelu(a) * (g + 1), e)
