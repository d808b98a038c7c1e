"""GRPO for detection: sample groups of detections, score them, and push the policy toward the better ones.

One training step, for a batch of (image, class) samples:

1. Rollouts (no grad): `num_rollouts` detections per sample from the current policy at `temperature`;
   every action is sampled (x, y and size bins, and each continue/stop decision), and the log-prob of
   the distribution actually sampled from is recorded. Empty detections are rollouts like any other.
2. Rewards: a pure per-rollout score against all ground-truth boxes (`finetune.rewards`).
3. Advantages: reward minus its group's mean (divided by the group's std unless Dr. GRPO style).
   A group whose rewards are all equal carries no signal and is left out of the update.
4. Updates (`num_iterations` of them): the sampled actions are replayed teacher-forced in one causal
   pass under the current policy (each image's prefix runs once, shared by its group's rollouts);
   PPO-clipped ratio per action plus `kl_beta` times the k3 estimate of KL(policy || reference),
   averaged over each rollout's actions, then over rollouts.

Actions are the units sampling draws: x, y, the (w, h) size pair (one joint draw, log-prob w + h), and
each continue/stop decision. Averaging per rollout first gives every rollout the same weight whatever
its length, so an empty rollout (one action: stop) counts as much as one with many boxes.

Dropout must be off (`lora_dropout=0`): the ratio compares one deterministic policy before and after
an update, and at the first iteration it is exactly 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from datasets import DetectionSample
from finetune import distributed
from finetune.lora import adapters_disabled, lora_modules
from finetune.rewards import Reward, get_reward
from finetune.sequences import H, RegionTarget, action_logprobs, boxes_to_target, build_action_batch
from finetune.training import Data, Trainer, TrainConfig
from moondream2.decoding import EncodedImage, RegionTrace, run_region_loop
from moondream2.errors import UserInputError
from moondream2.region import bin_to_coord, bin_to_size


@dataclass
class GRPOConfig(TrainConfig):
    """Flags of `grpo_trainer.py`: the shared training flags plus the RL ones."""

    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 5
    grad_accum_steps: int = 1
    lora_dropout: float = 0.0
    num_rollouts: int = 8
    temperature: float = 1.0
    reward: str = "iou"
    scale_rewards: bool = True
    num_iterations: int = 1
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    inject_ground_truth: bool = False
    inject_threshold: float = 0.5
    overfit_train: bool = False

    FLAG_ALIASES = {**TrainConfig.FLAG_ALIASES, "train_steps": "num_iterations"}

    FLAG_HELP = {
        **TrainConfig.FLAG_HELP,
        "overfit_train": "train and validate on the same first --batch_size training images (a quick setup check)",
        "batch_size": "(image, class) samples per rollout batch; each is sampled --num_rollouts times",
        "grad_accum_steps": "rollout batches per optimizer update",
        "max_objects": "detection cap, for rollouts and at evaluation",
        "lora_dropout": "must be 0 for GRPO: the importance ratio compares one deterministic policy",
        "num_rollouts": "detections sampled per (image, class): the group whose rewards are compared",
        "temperature": "sampling temperature of the rollouts (bins and stop decisions alike)",
        "reward": "per-rollout reward: iou (matched IoU / max(#gt, #pred)), f1 or count_mix",
        "scale_rewards": "divide advantages by the group's reward std (False: Dr. GRPO, mean-centred only)",
        "num_iterations": "PPO updates per batch of rollouts (the ratio is clipped from the second on)",
        "clip_eps": "PPO clip range of the per-action probability ratio",
        "kl_beta": "weight of the k3 KL penalty to the starting policy (0: no reference pass)",
        "inject_ground_truth": "when every rollout of a group scores below --inject_threshold, replace the worst by the ground truth",
        "inject_threshold": "reward below which a whole group counts as failed (see --inject_ground_truth)",
    }

    def __post_init__(self):
        super().__post_init__()
        if self.overfit_train and self.overfit_batch_size is None:
            self.overfit_batch_size = self.batch_size
        get_reward(self.reward)
        if self.num_rollouts < 2:
            raise UserInputError(f"--num_rollouts={self.num_rollouts}: a group needs at least 2 rollouts to compare")
        if not self.temperature > 0:
            raise UserInputError(f"--temperature={self.temperature}: rollouts are sampled, it must be positive")
        if self.num_iterations < 1 or not self.clip_eps > 0 or self.kl_beta < 0:
            raise UserInputError("--num_iterations must be >= 1, --clip_eps > 0 and --kl_beta >= 0")
        if self.fsdp:
            raise UserInputError("--fsdp is for the supervised trainers: GRPO runs the decoder a different number of "
                                 "times on each process, which FSDP cannot follow; train LoRA (DDP) instead")
        if self.lora_dropout != 0:
            raise UserInputError("--lora_dropout must be 0 for GRPO: the importance ratio compares one deterministic policy")


# ---- rollouts and rewards ------------------------------------------------------------------------
def trace_targets(trace: RegionTrace, prompts: list[list[int]], max_objects: int) -> tuple[list[RegionTarget], list[torch.Tensor]]:
    """Each sampled detection as a replayable target, with the log-probs recorded for its actions.

    Log-prob order is the replay order: per object x, y, size (w + h), "continue"; then the final
    "stop" unless max_objects cut the list off (no decision was taken then).
    """
    targets, logprobs = [], []
    for b, n in enumerate(trace.n_objects.tolist()):
        stopped = n < max_objects
        targets.append(RegionTarget(prompts[b], trace.x_bins[b, :n], trace.y_bins[b, :n], trace.size_bins[b, :n], stopped))
        parts = [trace.logprobs[b, :n].flatten()] + ([trace.stop_logprob[b : b + 1]] if stopped else [])
        logprobs.append(torch.cat(parts))
    return targets, logprobs


def target_boxes(target: RegionTarget, region) -> list[list[float]]:
    """The (x_min, y_min, x_max, y_max) boxes a target's bins decode to, as `detect()` reports them."""
    cx, cy = bin_to_coord(target.x_bins, region.coord_bins), bin_to_coord(target.y_bins, region.coord_bins)
    w, h = bin_to_size(target.size_bins, region.size_bins).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).tolist()


def score_rollouts(targets: list[RegionTarget], samples: list[DetectionSample], region, reward: Reward) -> torch.Tensor:
    """(B, G) rewards; rollouts are grouped sample-major (rollout i belongs to sample i // G)."""
    group = len(targets) // len(samples)
    scores = [reward(target_boxes(t, region), samples[i // group].boxes) for i, t in enumerate(targets)]
    return torch.tensor(scores, dtype=torch.float32).view(len(samples), group)


def group_advantages(rewards: torch.Tensor, scale: bool, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) advantages and (B,) whether each group has any reward spread (the others are all 0)."""
    spread = (rewards.max(dim=1).values - rewards.min(dim=1).values) > 1e-6
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
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


def ppo_loss(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, sequence: torch.Tensor,
             clip_eps: float, ref: torch.Tensor | None = None, kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (+ k3 KL) per action, averaged over each rollout's actions, then over rollouts.

    new/old/ref: (A,) action log-probs; advantages: (n,) one per rollout, broadcast to its actions.
    """
    ratio = (new - old).exp()
    adv = advantages[sequence]
    per_action = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    logs = {"clip_fraction": float(clipped.float().mean())}
    if ref is not None:
        log_r = ref - new
        kl = log_r.exp() - log_r - 1  # k3: unbiased for KL(policy || ref), always >= 0
        per_action = per_action + kl_beta * kl
        logs["kl"] = float(per_rollout_mean(kl.detach(), sequence, advantages.shape[0]).mean())
    return per_rollout_mean(per_action, sequence, advantages.shape[0]).mean(), logs


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


# ---- the trainer ---------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """What one batch of samples produced: the rollouts worth replaying, and numbers for the log."""

    image_paths: list[Path]  # per replayed rollout (the features are looked up again, with grad if trained)
    targets: list[RegionTarget]
    old_logprobs: torch.Tensor  # (A,) in replay order
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor  # (n,) one per replayed rollout
    rewards: torch.Tensor  # (B, G) all rollouts
    skipped_groups: int
    injected: int
    n_objects: torch.Tensor  # (B * G,) objects per rollout


class GRPOTrainer(Trainer):
    """`Trainer` whose step is: sample rollouts for each batch of the window, then `num_iterations` updates.

    A step (for --max_steps and --eval_interval) is one window of rollout batches; it takes
    `num_iterations` optimizer updates at one learning rate, or none when no group had reward spread
    (the schedule then does not advance either).
    """

    def __init__(self, config: GRPOConfig, model, data: Data, make_items: Callable[[int], list[DetectionSample]],
                 features: Callable[[Path], torch.Tensor], eval_encode: Callable | None = None):
        super().__init__(config, "grpo", model, data, make_items, self.policy_loss, eval_encode)
        self.features = features
        self.reward = get_reward(config.reward)
        self.reference = ReferencePolicy(model) if config.kl_beta > 0 else None

    @torch.no_grad()
    def collect(self, samples: list[DetectionSample]) -> Rollouts:
        cfg, model = self.config, self.model
        group = cfg.num_rollouts
        paths = [s.image_path for s in samples for _ in range(group)]
        prompts = [model.prompt_tokens("detect", s.class_name) for s in samples for _ in range(group)]
        trace = run_region_loop(model, self.prefixes(paths), prompts, cfg.max_objects, with_size=True,
                                temperature=cfg.temperature)
        targets, old = trace_targets(trace, prompts, cfg.max_objects)
        rewards = score_rollouts(targets, samples, model.region, self.reward)
        injected = self.inject_ground_truth(samples, paths, targets, old, rewards) if cfg.inject_ground_truth else 0
        advantages, spread = group_advantages(rewards, cfg.scale_rewards)
        keep = [i for i in range(len(targets)) if spread[i // group]]
        rollouts = Rollouts(
            image_paths=[paths[i] for i in keep], targets=[targets[i] for i in keep],
            old_logprobs=torch.cat([old[i] for i in keep]) if keep else torch.zeros(0),
            ref_logprobs=None, advantages=advantages.flatten()[keep].to(model.device), rewards=rewards,
            skipped_groups=int((~spread).sum()), injected=injected,
            n_objects=torch.tensor([t.n_objects for t in targets]),
        )
        if keep and self.reference is not None:
            with self.reference.active():
                rollouts.ref_logprobs = self.replay(rollouts)[0]
        return rollouts

    def inject_ground_truth(self, samples: list[DetectionSample], paths: list[Path], targets: list[RegionTarget],
                            old: list[torch.Tensor], rewards: torch.Tensor) -> int:
        """In place: in each group scoring below the threshold everywhere, the worst rollout becomes the
        ground truth, its "old" log-probs scored under the rollout policy. Returns how many."""
        failed = (rewards.max(dim=1).values < self.config.inject_threshold).nonzero().flatten().tolist()
        if not failed:
            return 0
        model, group = self.model, self.config.num_rollouts
        slots = [b * group + int(rewards[b].argmin()) for b in failed]
        for b, i in zip(failed, slots):
            targets[i] = boxes_to_target(targets[i].prompt_ids, samples[b].boxes, model.region)
            rewards[b, i % group] = self.reward(target_boxes(targets[i], model.region), samples[b].boxes)
        scored = [targets[i] for i in slots]
        logp, sequence = replay_logprobs(model, self.prefixes([paths[i] for i in slots]), scored, self.config.temperature)
        for j, i in enumerate(slots):
            old[i] = logp[sequence == j]
        return len(slots)

    def prefixes(self, paths: list[Path]) -> list[EncodedImage]:
        """Each rollout's image prefix K/V, run once per distinct image (with gradients when training):
        the rollouts of a group share it, so a replay runs only their prompts and objects."""
        encoded = {path: self.model.prefix_kv(self.features(path)) for path in dict.fromkeys(paths)}
        return [encoded[path] for path in paths]

    def replay(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        return replay_logprobs(self.model, self.prefixes(rollouts.image_paths), rollouts.targets,
                               self.config.temperature)

    def score(self, metrics: dict) -> float:
        """Keep the checkpoint with the best mean reward of the greedy detections: what GRPO maximises."""
        return metrics["reward"]

    def policy_loss(self, rollouts: Rollouts) -> tuple[torch.Tensor, float, dict]:
        """(mean PPO loss over the batch's rollouts, their number, logs)."""
        new, sequence = self.replay(rollouts)
        loss, logs = ppo_loss(new, rollouts.old_logprobs.to(new.device), rollouts.advantages, sequence,
                              self.config.clip_eps, rollouts.ref_logprobs, self.config.kl_beta)
        return loss, float(len(rollouts.targets)), logs

    def _optimizer_step(self, window: list[list[DetectionSample]]) -> dict:
        """Sample this rank's groups, then `num_iterations` updates unless no rank has a group to learn from."""
        with self.autocast:
            rollouts = [self.collect(batch) for batch in window if batch]
        learnable = [r for r in rollouts if r.targets]
        rewards = torch.cat([r.rewards.flatten() for r in rollouts]) if rollouts else torch.zeros(0)
        n_objects = torch.cat([r.n_objects for r in rollouts]).float() if rollouts else torch.zeros(0)
        counts = [len(learnable), float(rewards.sum()), float((rewards**2).sum()), rewards.numel(),
                  sum(r.skipped_groups for r in rollouts), sum(r.rewards.shape[0] for r in rollouts),
                  float(n_objects.sum()), float((n_objects == 0).sum()), sum(r.injected for r in rollouts)]
        learnable_anywhere, r_sum, r_sq, n, skipped, groups, objects, empty, injected = \
            distributed.all_reduce_sum(counts, self.model.device)
        lr = self.optimizer.param_groups[0]["lr"]
        updates = []
        for _ in range(self.config.num_iterations if learnable_anywhere else 0):
            logs = self._accumulate(learnable)
            updates.append({**logs, "grad_norm": self._apply_gradients()})
        if updates:
            self.scheduler.step()
        self.state.step += 1
        mean = r_sum / max(n, 1)
        logs = {
            "loss": 0.0,
            **{k: sum(u[k] for u in updates) / len(updates) for k in (updates[0] if updates else {})},
            "reward_mean": mean,
            "reward_std": max(r_sq / max(n, 1) - mean**2, 0.0) ** 0.5,
            "skipped_groups": int(skipped),
            "groups": int(groups),
            "objects_per_rollout": objects / max(n, 1),
            "empty_rollouts": empty / max(n, 1),
            "updates": len(updates),
            "lr": lr,
        }
        if self.config.inject_ground_truth:
            logs["injected"] = int(injected)
        return logs

