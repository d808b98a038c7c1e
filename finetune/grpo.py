"""GRPO for detection and pointing: sample groups of answers, score them, and push the policy toward the better ones.

One training step, for a batch of (image, class) samples:

1. Rollouts (no grad): `num_rollouts` detections (or pointings) per sample from the current policy at
   `temperature`; every action is sampled (x, y and size bins, and each continue/stop decision), and
   the log-prob of the distribution actually sampled from is recorded. Empty answers are rollouts
   like any other.
2. Rewards: pure per-rollout scores against all ground-truth boxes (`finetune.rewards`: built-in or
   the user's `module:function`), summed with their weights.
3. Advantages: reward minus its group's mean, divided by the group's std, the batch's, or nothing
   (`scale_rewards`). A group whose rewards are all equal carries no signal and is left out of the
   update; with `mask_truncated`, rollouts cut off by `max_objects` get advantage 0.
4. Updates (`num_iterations` of them): the sampled actions are replayed teacher-forced in one causal
   pass under the current policy (each image's prefix runs once, shared by its group's rollouts);
   PPO-clipped ratio against the rollout policy per action (upper bound `clip_eps_high` when set,
   DAPO) plus `kl_beta` times the k3 estimate of KL(policy || reference), reduced as `loss_type`
   says, plus `sft_weight` times the teacher-forced loss of the batch's ground truth.

Actions are the units sampling draws: x, y, the (w, h) size pair (one joint draw, log-prob w + h), and
each continue/stop decision. `loss_type` decides how they are averaged (`reduce_actions`); the default,
per rollout first, gives every rollout the same weight whatever its length, so an empty rollout (one
action: stop) counts as much as one with many boxes.

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
from finetune.cli import flag
from finetune.config import TrainConfig
from finetune.lora import adapters_disabled, lora_modules
from finetune.preparation import Data
from finetune.rewards import BUILTIN, ImageSize, RewardTerm, reward_terms
from finetune.sequences import H, RegionTarget, action_logprobs, boxes_to_target, build_action_batch
from finetune.supervised import Example, TeacherForcing
from finetune.trainer import Trainer
from finetune.validation import require
from moondream2.decoding import EncodedImage, RegionTrace, run_region_loop
from moondream2.errors import UserInputError
from moondream2.region import bin_to_coord, bin_to_size


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")  # see `reduce_actions`
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig(TrainConfig):
    """Flags of `grpo_trainer.py`: the shared training flags plus the RL ones."""

    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = flag(5, "(image, class) samples per rollout batch; each is sampled --num_rollouts times")
    grad_accum_steps: int = flag(1, "rollout batches per optimizer update")
    max_objects: int = flag(50, "detection cap, for rollouts and at evaluation")
    lora_dropout: float = flag(0.0, "must be 0 for GRPO: the importance ratio compares one deterministic policy")
    task: str = flag("detect", "detect (boxes) or point (centres; a hit is a point inside a ground-truth box, one per "
                               "box)")
    num_rollouts: int = flag(8, "detections sampled per (image, class): the group whose rewards are compared")
    temperature: float = flag(1.0, "sampling temperature of the rollouts (bins and stop decisions alike)")
    reward: tuple | None = flag(None, "rewards summed per rollout: iou, f1, count_mix (detect), point_f1 (point) or "
                                      "module:function (a .py file or module; fn(pred, gt_boxes, image_size) -> "
                                      "float); several: a,b or repeat the flag; default: iou / point_f1")
    reward_weights: tuple[float, ...] | None = flag(None, "one weight per --reward, in order (default: 1 each)")
    scale_rewards: str = flag("group", "divide advantages by the reward std of the group, the batch, or none (Dr. "
                                       "GRPO); True/False: group/none")
    loss_type: str = flag("grpo", "grpo: mean per rollout, then over rollouts; bnpo: mean over all actions (DAPO); "
                                  "dr_grpo: sum over a constant (Dr. GRPO)")
    num_iterations: int = flag(1, "PPO updates per batch of rollouts (each one's ratio is against the rollout policy)")
    clip_eps: float = flag(0.2, "PPO clip range of the per-action probability ratio (the lower one when "
                                "--clip_eps_high is set)")
    clip_eps_high: float | None = flag(None, "upper clip range of the ratio, e.g. 0.28 (DAPO's clip-higher); default: "
                                             "--clip_eps")
    mask_truncated: bool = flag(False, "rollouts cut off by --max_objects get advantage 0 (they never chose to stop)")
    kl_beta: float = flag(0.04, "weight of the k3 KL penalty to the starting policy (0: no reference pass)")
    sft_weight: float = flag(0.0, "add this times the teacher-forced loss of the batch's ground truth to every update "
                                  "(0: off)")
    inject_ground_truth: bool = flag(False, "when every rollout of a group scores below --inject_threshold, replace "
                                            "the worst by the ground truth")
    inject_threshold: float = flag(0.5, "reward below which a whole group counts as failed (see --inject_ground_truth)")
    overfit_train: bool = flag(False, "train and validate on the same first --batch_size training images (a quick "
                                      "setup check)")

    FLAG_ALIASES = {**TrainConfig.FLAG_ALIASES, "train_steps": "num_iterations"}
    REPEATABLE_FLAGS = ("reward", "reward_weights")

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):  # the flag's earlier form, before the type check
            self.scale_rewards = "group" if self.scale_rewards else "none"
        super().__post_init__()
        if self.overfit_train and self.overfit_batch_size is None:
            self.overfit_batch_size = self.batch_size
        require(self, "task", self.task in BUILTIN, f"use {' or '.join(BUILTIN)}")
        reward_terms(self.reward, self.reward_weights, self.task)  # imports the user's rewards: fail now, not later
        require(self, "scale_rewards", self.scale_rewards in SCALE_REWARDS, f"use {', '.join(SCALE_REWARDS)}")
        require(self, "loss_type", self.loss_type in LOSS_TYPES, f"use {', '.join(LOSS_TYPES)}")
        require(self, "clip_eps_high", self.clip_eps_high is None or self.clip_eps_high > 0,
                "must be positive, or leave it unset for --clip_eps")
        require(self, "sft_weight", self.sft_weight >= 0, "use 0 (off) or more")
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

    @property
    def max_actions(self) -> int:
        """The most actions one rollout can take (cut off at max_objects: x, y, [size,] continue each)."""
        return (4 if self.task == "detect" else 3) * self.max_objects


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


# ---- the trainer ---------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """What one batch of samples produced: the rollouts worth replaying, and numbers for the log."""

    samples: list[DetectionSample]  # the batch (its ground truth is --sft_weight's target)
    image_paths: list[Path]  # per replayed rollout (the features are looked up again, with grad if trained)
    targets: list[RegionTarget]
    old_logprobs: torch.Tensor  # (A,) in replay order
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor  # (n,) one per replayed rollout
    scores: torch.Tensor  # (B, G, R) each reward of all rollouts
    rewards: torch.Tensor  # (B, G) their weighted sum
    skipped_groups: int
    injected: int
    n_objects: torch.Tensor  # (B * G,) objects per rollout
    truncated: torch.Tensor  # (B * G,) cut off by max_objects


class GRPOTrainer(Trainer):
    """`Trainer` whose step is: sample rollouts for each batch of the window, then `num_iterations` updates.

    A step (for --max_steps and --eval_interval) is one window of rollout batches; it takes
    `num_iterations` optimizer updates at one learning rate, or none when no group had reward spread
    (the schedule then does not advance either). Every update's ratio compares the current policy with
    the rollout policy (the recorded log-probs), so later updates are clipped, not restarted at 1.
    """

    progress_keys = ("reward_mean", "kl", "clip_fraction", "lr")

    def __init__(self, config: GRPOConfig, model, data: Data, make_items: Callable[[int], list[DetectionSample]],
                 features: Callable[[Path], torch.Tensor], eval_encode: Callable | None = None):
        super().__init__(config, "grpo", model, data, make_items, self.policy_loss, eval_encode, eval_task=config.task)
        self.features = features
        self.rewards = reward_terms(config.reward, config.reward_weights, config.task)
        self.image_sizes = {record.path: (record.width, record.height) for record in data.train.images}
        self.teacher = TeacherForcing(model, features, bin_sigma=config.bin_sigma)  # for --sft_weight
        self.reference = ReferencePolicy(model) if config.kl_beta > 0 else None

    @torch.no_grad()
    def collect(self, samples: list[DetectionSample]) -> Rollouts:
        cfg, model = self.config, self.model
        group, with_size = cfg.num_rollouts, cfg.task == "detect"
        paths = [s.image_path for s in samples for _ in range(group)]
        prompts = [model.prompt_tokens(cfg.task, s.class_name) for s in samples for _ in range(group)]
        trace = run_region_loop(model, self.prefixes(paths), prompts, cfg.max_objects, with_size=with_size,
                                temperature=cfg.temperature)
        targets, old = trace_targets(trace, prompts, cfg.max_objects, with_size)
        scores = score_rollouts(targets, samples, model.region, self.rewards, self.sizes(samples))
        injected = self.inject_ground_truth(samples, paths, targets, old, scores) if cfg.inject_ground_truth else 0
        rewards = weighted_total(scores, self.rewards)
        advantages, spread = group_advantages(rewards, cfg.scale_rewards)
        truncated = torch.tensor([not t.stopped for t in targets])
        if cfg.mask_truncated:
            advantages = advantages.masked_fill(truncated.view_as(advantages), 0.0)
        keep = [i for i in range(len(targets)) if spread[i // group]]
        rollouts = Rollouts(
            samples=samples, image_paths=[paths[i] for i in keep], targets=[targets[i] for i in keep],
            old_logprobs=torch.cat([old[i] for i in keep]) if keep else torch.zeros(0),
            ref_logprobs=None, advantages=advantages.flatten()[keep].to(model.device), scores=scores, rewards=rewards,
            skipped_groups=int((~spread).sum()), injected=injected,
            n_objects=torch.tensor([t.n_objects for t in targets]), truncated=truncated,
        )
        if keep and self.reference is not None:
            with self.reference.active():
                rollouts.ref_logprobs = self.replay(rollouts)[0]
        return rollouts

    def sizes(self, samples: list[DetectionSample]) -> list[ImageSize]:
        return [self.image_sizes[s.image_path] for s in samples]

    def inject_ground_truth(self, samples: list[DetectionSample], paths: list[Path], targets: list[RegionTarget],
                            old: list[torch.Tensor], scores: torch.Tensor) -> int:
        """In place: in each group scoring below the threshold everywhere, the worst rollout becomes the
        ground truth, scored, and its "old" log-probs scored under the rollout policy. Returns how many."""
        totals = weighted_total(scores, self.rewards)
        failed = (totals.max(dim=1).values < self.config.inject_threshold).nonzero().flatten().tolist()
        if not failed:
            return 0
        model, group = self.model, self.config.num_rollouts
        slots = [b * group + int(totals[b].argmin()) for b in failed]
        for b, i in zip(failed, slots):
            targets[i] = boxes_to_target(targets[i].prompt_ids, samples[b].boxes, model.region,
                                         with_size=self.config.task == "detect")
        truth = [samples[b] for b in failed]
        rescored = score_rollouts([targets[i] for i in slots], truth, model.region, self.rewards, self.sizes(truth))
        for k, (b, i) in enumerate(zip(failed, slots)):
            scores[b, i % group] = rescored[k, 0]
        logp, sequence = replay_logprobs(model, self.prefixes([paths[i] for i in slots]), [targets[i] for i in slots],
                                         self.config.temperature)
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
        """Keep the checkpoint with the best mean IoU reward of the greedy detections (what GRPO maximises
        by default); for pointing, the best point F1."""
        return metrics["reward"] if self.config.task == "detect" else super().score(metrics)

    def policy_loss(self, rollouts: Rollouts) -> tuple[torch.Tensor, float, dict]:
        """(the batch's PPO loss, plus --sft_weight times the teacher-forced loss of its ground truth;
        its weight in the step; logs). Each image's prefix runs once for both."""
        cfg, n = self.config, len(rollouts.image_paths)
        truth = [s.image_path for s in rollouts.samples] if cfg.sft_weight > 0 else []
        images = self.prefixes(rollouts.image_paths + truth)
        new, sequence = replay_logprobs(self.model, images[:n], rollouts.targets, cfg.temperature)
        loss, weight, logs = ppo_loss(new, rollouts.old_logprobs.to(new.device), rollouts.advantages, sequence,
                                      cfg.clip_eps, rollouts.ref_logprobs, cfg.kl_beta, cfg.clip_eps_high,
                                      cfg.loss_type, cfg.max_actions)
        if truth:
            examples = [Example(s.image_path, s.class_name, cfg.task, False, s.boxes) for s in rollouts.samples]
            encoded = {(p, False): e for p, e in zip(truth, images[n:])}
            supervised, _, _ = self.teacher.sequence_loss(self.teacher.actions(examples, encoded))
            loss = loss + cfg.sft_weight * supervised
            logs["sft_loss"] = float(supervised.detach())
        return loss, weight, logs

    def _optimizer_step(self, window: list[list[DetectionSample]]) -> dict:
        """Sample this rank's groups, then `num_iterations` updates unless no rank has a group to learn from."""
        with self.autocast:
            rollouts = [self.collect(batch) for batch in window if batch]
        learnable = [r for r in rollouts if r.targets]
        learnable_anywhere, logs = self.rollout_logs(rollouts)
        lr = self.optimizer.param_groups[0]["lr"]
        updates = []
        for _ in range(self.config.num_iterations if learnable_anywhere else 0):
            update_logs = self._accumulate(learnable)
            updates.append({**update_logs, "grad_norm": self._apply_gradients()})
        if updates:
            self.scheduler.step()
        self.state.step += 1
        return {
            "loss": 0.0,
            **{k: sum(u[k] for u in updates) / len(updates) for k in (updates[0] if updates else {})},
            **logs,
            "updates": len(updates),
            "lr": lr,
        }

    def rollout_logs(self, rollouts: list[Rollouts]) -> tuple[bool, dict]:
        """Whether any process has a group to learn from, and the step's rollout statistics over all
        processes: reward mean and std (in total and per reward), flat groups skipped, objects per
        rollout, empty and truncated rollouts."""
        names = [r.name for r in self.rewards]
        scores = torch.cat([r.scores.flatten(0, 1) for r in rollouts]) if rollouts else torch.zeros(0, len(names))
        rewards = torch.cat([r.rewards.flatten() for r in rollouts]) if rollouts else torch.zeros(0)
        n_objects = torch.cat([r.n_objects for r in rollouts]).float() if rollouts else torch.zeros(0)
        truncated = torch.cat([r.truncated for r in rollouts]) if rollouts else torch.zeros(0, dtype=torch.bool)
        local = {
            "learnable": sum(bool(r.targets) for r in rollouts), "n": rewards.numel(),
            "groups": sum(r.rewards.shape[0] for r in rollouts), "skipped": sum(r.skipped_groups for r in rollouts),
            "injected": sum(r.injected for r in rollouts), "objects": float(n_objects.sum()),
            "empty": float((n_objects == 0).sum()), "truncated": float(truncated.sum()),
            "reward": float(rewards.sum()), "reward_sq": float((rewards**2).sum()),
            **{f"score{i}": float(scores[:, i].sum()) for i in range(len(names))},
            **{f"score{i}_sq": float((scores[:, i] ** 2).sum()) for i in range(len(names))},
        }
        total = dict(zip(local, distributed.all_reduce_sum(list(local.values()), self.model.device)))
        n = max(total["n"], 1)

        def mean_std(key: str) -> tuple[float, float]:
            mean = total[key] / n
            return mean, max(total[f"{key}_sq"] / n - mean**2, 0.0) ** 0.5

        logs = dict(zip(("reward_mean", "reward_std"), mean_std("reward")))
        for i, name in enumerate(names):
            logs[f"rewards/{name}/mean"], logs[f"rewards/{name}/std"] = mean_std(f"score{i}")
        logs.update({
            "skipped_groups": int(total["skipped"]),
            "groups": int(total["groups"]),
            "skipped_fraction": total["skipped"] / max(total["groups"], 1),
            "objects_per_rollout": total["objects"] / n,
            "empty_rollouts": total["empty"] / n,
            "truncated_rollouts": total["truncated"] / n,
        })
        if self.config.inject_ground_truth:
            logs["injected"] = int(total["injected"])
        return total["learnable"] > 0, logs
