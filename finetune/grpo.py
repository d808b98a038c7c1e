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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from datasets import DetectionSample
from finetune import distributed
from finetune.cli import flag
from finetune.config import TrainConfig
from finetune.feature_cache import FeatureCache, shared_prefixes
from finetune.grpo_loss import (
    LOSS_TYPES,
    SCALE_REWARDS,
    ReferencePolicy,
    group_advantages,
    ppo_loss,
    replay_logprobs,
    score_rollouts,
    trace_targets,
    weighted_total,
)
from finetune.preparation import Splits, image_groups, load_data, prepare_model
from finetune.rewards import BUILTIN, ImageSize, reward_terms
from finetune.sequences import RegionTarget, boxes_to_target
from finetune.supervised import Example, TeacherForcing
from finetune.trainer import Trainer
from finetune.validation import require
from moondream2.decoding import EncodedImage, run_region_loop
from moondream2.errors import UserInputError


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

    def __init__(self, config: GRPOConfig, model, data: Splits, make_items: Callable[[int], list[DetectionSample]],
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
        """Each rollout's image prefix K/V, once per distinct image: a group's rollouts share it."""
        return shared_prefixes(self.model, self.features, paths)

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

    def optimizer_step(self, window: list[list[DetectionSample]]) -> dict:
        """Sample this rank's groups, then `num_iterations` updates unless no rank has a group to learn from."""
        with self.autocast:
            rollouts = [self.collect(batch) for batch in window if batch]
        learnable = [r for r in rollouts if r.targets]
        learnable_anywhere, logs = self.rollout_logs(rollouts)
        lr = self.optimizer.param_groups[0]["lr"]
        updates = []
        for _ in range(self.config.num_iterations if learnable_anywhere else 0):
            update_logs = self.accumulate(learnable)
            updates.append({**update_logs, "grad_norm": self.apply_gradients()})
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


def train_grpo(config: GRPOConfig) -> dict:
    """Model, data, feature cache and `GRPOTrainer` for a GRPO run; returns `Trainer.fit()`'s summary.

    An epoch is the training split's (image, class) samples, grouped by image so a batch shares
    image encodings, in a new order each epoch.
    """
    model = prepare_model(config)
    data = load_data(config)
    features = FeatureCache.for_run(model, config)

    def make_items(epoch: int) -> list[DetectionSample]:
        return image_groups(data.train.samples(config.negatives_per_positive, seed=config.seed + epoch),
                            seed=config.seed + epoch, classes_per_group=config.classes_per_image_batch)

    trainer = GRPOTrainer(config, model, data, make_items, features, eval_encode=features.eval_encode)
    return trainer.fit()
