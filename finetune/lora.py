"""Low-rank adapters for the text decoder's Linear layers.

`LoRALinear` is an `nn.Linear` that keeps its base `weight`/`bias` under the original names and adds
`lora_A` (in, r) and `lora_B` (r, out):  y = W x + b + dropout(x) A B * alpha / r.
Keeping the base names means base checkpoints load before or after injection, and an adapter file
holds nothing but `…lora_A` / `…lora_B` (plus whatever else was trained).

Moondream 3's mixture-of-experts weights are stacked (E, out, in) tensors, not Linears: by default
they stay frozen (attention and the dense MLPs get adapters); `expert_adapters=True` gives every
expert its own pair, `LoRAExperts` with `lora_A` (E, in, r) and `lora_B` (E, r, out).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from moondream2.moe import Experts

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class LoRASettings:
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    expert_adapters: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        # B = 0 makes the adapted model start exactly at the base model; A ~ U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A = nn.Parameter(torch.empty(self.in_features, rank, device=device).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(rank, self.out_features, device=device))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.enabled:
            return y
        delta = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A) @ self.lora_B
        return y + (delta * self.scale).to(y.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain Linear whose weight includes the adapter (dropout off, as at inference)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        merged = merged.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_A.float() @ self.lora_B.float()).t() * self.scale
            merged.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        return merged


class LoRAExperts(Experts):
    """Per-expert adapters on a stacked expert weight; expert e computes x W_e^T + dropout(x) A_e B_e * scale."""

    def __init__(self, base: Experts, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.weight = base.weight
        n, dim_out, dim_in = base.weight.shape
        bound = 1.0 / math.sqrt(dim_in)
        self.lora_A = nn.Parameter(torch.empty(n, dim_in, rank, device=base.weight.device).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(n, rank, dim_out, device=base.weight.device))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def apply_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        y = super().apply_expert(x, e)
        if not self.enabled:
            return y
        delta = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A[e]) @ self.lora_B[e]
        return y + (delta * self.scale).to(y.dtype)

    def merged_experts(self) -> Experts:
        merged = Experts.__new__(Experts)
        nn.Module.__init__(merged)
        with torch.no_grad():
            delta = (self.lora_A.float() @ self.lora_B.float()).transpose(1, 2) * self.scale
            merged.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
        return merged


def _targets(model: nn.Module, target_modules, experts: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for each targeted Linear (and stacked experts) inside the text blocks;
    `target_modules=None` targets them all."""
    kinds = (nn.Linear, Experts) if experts else (nn.Linear,)
    found = []
    for parent in model.text.blocks.modules():
        for name, child in parent.named_children():
            adapted = isinstance(child, (LoRALinear, LoRAExperts))
            wanted = target_modules is None or name in target_modules
            if wanted and isinstance(child, kinds) and not adapted:
                found.append((parent, name, child))
    return found


def target_choices(model: nn.Module, experts: bool = False) -> list[str]:
    """Names `target_modules` may use: a name matching no layer would silently train nothing there."""
    return sorted({name for _, name, _ in _targets(model, None, experts)})


def inject_lora_into_model(
    model: nn.Module,
    rank: int = 32,
    alpha: float = 64.0,
    dropout: float = 0.1,
    target_modules=DEFAULT_TARGETS,
    expert_adapters: bool = False,
) -> list[str]:
    """Wrap every targeted Linear of the text blocks in a `LoRALinear`; returns the wrapped names.

    With `expert_adapters`, targeted mixture-of-experts weights (fc1/fc2 of MoE blocks) get
    per-expert adapters too. Inject after loading the base weights or before: the base parameter
    names do not change.
    """
    targets = _targets(model, set(target_modules), expert_adapters)
    if not targets:
        raise ValueError(f"no Linear named {list(target_modules)} in the text blocks")
    for parent, name, module in targets:
        wrapper = LoRAExperts if isinstance(module, Experts) else LoRALinear
        setattr(parent, name, wrapper(module, rank, alpha, dropout))
    model.lora_settings = LoRASettings(rank, alpha, dropout, list(target_modules), expert_adapters)
    return [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def lora_modules(model: nn.Module) -> list[LoRALinear | LoRAExperts]:
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving a plain model that loads with strict=True."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged_linear())
            elif isinstance(child, LoRAExperts):
                setattr(parent, name, child.merged_experts())
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model (e.g. as the RL reference policy) without a second copy of the weights."""
    modules = lora_modules(model)
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True
