"""GRPO's objective for one batch, as functions: sampled rollouts in, a loss and its weight out.

- `trace_targets`: what the region loop sampled, as targets the sequence builder can replay, with
  the log-probs recorded for their actions;
- `score_rollouts`, `weighted_total`, `group_advantages`: each rollout's rewards and its advantage
  within its group (`SCALE_REWARDS`);
- `replay_logprobs`: the same actions' log-probs under the current weights, in one causal pass;
- `ppo_loss`: the clipped surrogate plus the k3 KL to `ReferencePolicy`, reduced over actions as
  `reduce_actions` says (`LOSS_TYPES`).
Shapes: B samples, G rollouts per sample, R rewards, A actions in all (replay order).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from datasets import DetectionSample
from finetune.lora import adapters_disabled, lora_modules
from finetune.rewards import ImageSize, RewardTerm
from finetune.sequences import H, RegionTarget, action_logprobs, build_action_batch
from moondream2.decoding import EncodedImage, RegionTrace
from moondream2.region import bin_to_coord, bin_to_size

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")  # see `reduce_actions`
SCALE_REWARDS = ("group", "batch", "none")


# ---- rollouts and rewards ------------------------------------------------------------------------
def trace_targets(trace: RegionTrace, prompts: list[list[int]], max_objects: int,
                  with_size: bool = True) -> tuple[list[RegionTarget], list[torch.Tensor]]:
    """Each sampled detection (or pointing) as a replayable target, with the log-probs recorded for its actions.

    Log-prob order is the replay order: per object x, y, size (w + h, boxes only), "continue"; then the
    final "stop" unless max_objects cut the list off (no decision was taken then).
    """
    targets, logprobs = [], []
    for b, n in enumerate(trace.n_objects.tolist()):
        stopped = n < max_objects
        sizes = trace.size_bins[b, :n] if with_size else None
        targets.append(RegionTarget(prompts[b], trace.x_bins[b, :n], trace.y_bins[b, :n], sizes, stopped))
        parts = [trace.logprobs[b, :n].flatten()] + ([trace.stop_logprob[b : b + 1]] if stopped else [])
        logprobs.append(torch.cat(parts))
    return targets, logprobs


def target_objects(target: RegionTarget, region) -> list[list[float]]:
    """What `detect()` reports for a target's bins, (x_min, y_min, x_max, y_max) boxes, or what
    `point()` reports, (x, y) points, when the target has no sizes."""
    cx, cy = bin_to_coord(target.x_bins, region.coord_bins), bin_to_coord(target.y_bins, region.coord_bins)
    if target.size_bins is None:
        return torch.stack([cx, cy], dim=-1).tolist()
    w, h = bin_to_size(target.size_bins, region.size_bins).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).tolist()


def score_rollouts(targets: list[RegionTarget], samples: list[DetectionSample], region, rewards: list[RewardTerm],
                   image_sizes: list[ImageSize]) -> torch.Tensor:
    """(B, G, R): reward r of each rollout; rollouts are grouped sample-major (rollout i belongs to
    sample i // G), `image_sizes[b]` is sample b's image (width, height)."""
    group = len(targets) // len(samples)
    scores = [[reward(target_objects(t, region), samples[i // group].boxes, image_sizes[i // group]) for reward in rewards]
              for i, t in enumerate(targets)]
    return torch.tensor(scores, dtype=torch.float32).view(len(samples), group, len(rewards))


def weighted_total(scores: torch.Tensor, rewards: list[RewardTerm]) -> torch.Tensor:
    """(B, G) the rollouts' rewards: each (B, G, R) score times its --reward_weights weight, summed."""
    return (scores * torch.tensor([r.weight for r in rewards], dtype=scores.dtype)).sum(-1)


def group_advantages(rewards: torch.Tensor, scale: str, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) advantages and (B,) whether each group has any reward spread (the others are all 0).

    Each reward is centred on its group's mean, then divided by the std of its group (`scale="group"`),
    of the whole (B, G) batch (`"batch"`: one scale, so groups with more spread move the policy more),
    or not at all (`"none"`, Dr. GRPO).
    """
    spread = (rewards.max(dim=1).values - rewards.min(dim=1).values) > 1e-6
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)
    return torch.where(spread.unsqueeze(1), advantages, torch.zeros_like(advantages)), spread


# ---- log-probs and the loss ----------------------------------------------------------------------
def replay_logprobs(model, images: list[EncodedImage] | list[torch.Tensor], targets: list[RegionTarget],
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A,) log-probs of every sampled action under the model's current weights, and (A,) the rollout
    each belongs to: one causal pass over prompts and objects attending to each rollout's image
    prefix (or, given image features, over whole sequences). The w and h bins fold into one size
    action, as sampled."""
    batch = build_action_batch(model, images, targets)  # feeds the dtype the region loop feeds
    logp = action_logprobs(model, batch, temperature)
    action = torch.cumsum(batch.kind != H, dim=0) - 1  # H joins the W just before it
    merged = torch.zeros(int(action[-1]) + 1, device=logp.device).index_add(0, action, logp)
    return merged, batch.sequence[batch.kind != H]


def per_rollout_mean(values: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) mean of per-action values over each rollout's actions."""
    total = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, sequence, values)
    count = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, sequence, torch.ones_like(values))
    return total / count


def reduce_actions(per_action: torch.Tensor, sequence: torch.Tensor, n: int, loss_type: str = "grpo",
                   max_actions: int | None = None) -> tuple[torch.Tensor, float]:
    """(A,) per-action losses of n rollouts -> (the batch's loss, its weight in the step).

    `grpo`: mean over each rollout's actions, then over rollouts (every rollout counts alike, whatever
    its length); `bnpo`: mean over every action (token-level, as DAPO: long rollouts count more);
    `dr_grpo`: each rollout's sum over a constant, `max_actions`, the most actions a rollout can take,
    then the mean over rollouts (Dr. GRPO: no length bias either way).

    The weight counts the units the loss is a mean over (rollouts, or actions for bnpo), so the step's
    gradient, a weighted mean over its batches and processes, is the loss of the whole step at once.
    """
    if loss_type == "bnpo":
        return per_action.mean(), float(per_action.numel())
    if loss_type == "dr_grpo":
        if not max_actions:
            raise ValueError("dr_grpo divides by max_actions, the most actions a rollout can take")
        return per_action.sum() / (n * max_actions), float(n)
    return per_rollout_mean(per_action, sequence, n).mean(), float(n)


def ppo_loss(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, sequence: torch.Tensor,
             clip_eps: float, ref: torch.Tensor | None = None, kl_beta: float = 0.0, clip_eps_high: float | None = None,
             loss_type: str = "grpo", max_actions: int | None = None) -> tuple[torch.Tensor, float, dict]:
    """Clipped surrogate (+ k3 KL) per action, reduced by `reduce_actions`: (loss, weight, logs).

    new/old/ref: (A,) action log-probs; advantages: (n,) one per rollout, broadcast to its actions. The
    ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (clip_eps_high defaults to clip_eps); the
    logged clip fractions count the actions whose gradient the clip removed, at each end.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = (new - old).exp()
    adv = advantages[sequence]
    per_action = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
    clipped_low = ((ratio < 1 - clip_eps) & (adv < 0)).float().mean()
    clipped_high = ((ratio > 1 + high) & (adv > 0)).float().mean()
    logs = {"clip_fraction": float(clipped_low + clipped_high), "clip_fraction_low": float(clipped_low),
            "clip_fraction_high": float(clipped_high)}
    if ref is not None:
        log_r = ref - new
        kl = log_r.exp() - log_r - 1  # k3: unbiased for KL(policy || ref), always >= 0
        per_action = per_action + kl_beta * kl
        logs["kl"] = float(per_rollout_mean(kl.detach(), sequence, advantages.shape[0]).mean())
    loss, weight = reduce_actions(per_action, sequence, advantages.shape[0], loss_type, max_actions)
    return loss, weight, logs


class ReferencePolicy:
    """The policy RL starts from, for the KL penalty, without a second copy of the model.

    Fresh LoRA adapters (every B = 0) add nothing, so switching them off gives the start policy.
    Every other trained tensor (the region head, adapters loaded with --init_lora, blocks trained in
    full) is kept as one frozen copy and swapped in by reference for the reference pass: the memory
    cost is one copy of the trained parameters only. Built before any update (and before --resume
    loads later weights), so the reference stays the start of the whole run.
    """

    def __init__(self, model):
        adapters = lora_modules(model)
        self.model = model
        self.switch_off_adapters = bool(adapters) and all(not bool(m.lora_B.any()) for m in adapters)
        self.frozen = [
            (p, p.detach().clone()) for name, p in model.named_parameters()
            if p.requires_grad and not (self.switch_off_adapters and "lora_" in name)
        ]

    def _swap(self) -> None:
        for i, (param, other) in enumerate(self.frozen):
            current = param.data
            param.data = other
            self.frozen[i] = (param, current)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the model computes the reference policy."""
        with torch.no_grad(), (adapters_disabled(self.model) if self.switch_off_adapters else contextlib.nullcontext()):
            self._swap()
            try:
                yield
            finally:
                self._swap()
