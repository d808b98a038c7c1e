"""Every trainer flag that changes the maths reaches the computation: the same call with the flag
flipped gives the (hand-derived) different result."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import finetune.grpo
import finetune.supervised
import grpo_trainer
import sft_trainer
import sft_trainer_detect_grad
from datasets import load_split, write_synthetic_coco
from finetune.config import TrainConfig
from finetune.feature_cache import FeatureCache
from finetune.grpo import GRPOConfig, GRPOTrainer
from finetune.grpo_loss import ppo_loss
from finetune.preparation import image_groups, load_data, prepare_model
from finetune.rewards import RewardTerm
from finetune.sequences import boxes_to_target, build_action_batch, supervised_loss

FAST = dict(model="tiny", eval_limit=2, max_objects=3, num_pictures=1, lora_rank=4, lora_alpha=8,
            num_rollouts=4, batch_size=2, eval_interval=100)


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here on one thread (see conftest)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("shapes"), n_train=4, n_valid=2, n_test=2, seed=0,
                                image_size=96, max_objects=2)


# ---- LoRA ------------------------------------------------------------------------------------------
def adapter_delta(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the adapter adds to one qkv output, x A B) for a model prepared with --lora_alpha=alpha."""
    model = prepare_model(TrainConfig(model="tiny", lora_rank=4, lora_alpha=alpha, lora_dropout=0.0, seed=0))
    qkv = model.text.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.lora_B.fill_(0.1)
        x = torch.linspace(-1, 1, qkv.in_features).unsqueeze(0)
        return qkv(x) - F.linear(x, qkv.weight, qkv.bias), x @ qkv.lora_A @ qkv.lora_B


@pytest.mark.parametrize("alpha", [8.0, 16.0])
def test_lora_alpha_scales_the_adapter_by_alpha_over_rank(alpha):
    delta, xab = adapter_delta(alpha)
    assert torch.allclose(delta, xab * alpha / 4, rtol=1e-4, atol=1e-6)


# ---- GRPO ------------------------------------------------------------------------------------------
def make_grpo_trainer(data_dir, tmp_path, **flags) -> GRPOTrainer:
    config = GRPOConfig(**{**FAST, **flags}, dataset=str(data_dir), output_dir=str(tmp_path))
    model = prepare_model(config)
    data = load_data(config)
    features = FeatureCache(model, "memory", tmp_path / "cache")

    def make_items(epoch):
        return image_groups(data.train.samples(config.negatives_per_positive, seed=epoch), seed=epoch)

    trainer = GRPOTrainer(config, model, data, make_items, features)
    # A reward with spread in every group on a random model: the sum of the sampled x_min.
    trainer.rewards = [RewardTerm("x_min", lambda pred, gt, size: float(sum(box[0] for box in pred)))]
    return trainer


def collect(trainer: GRPOTrainer, seed: int = 0):
    torch.manual_seed(seed)  # rollouts sample from the global generator: same seed, same rollouts
    rollouts = trainer.collect(trainer.make_items(0)[: trainer.config.batch_size])
    assert rollouts.skipped_groups == 0
    return rollouts


def test_scale_rewards_divides_advantages_by_the_group_or_batch_std(data_dir, tmp_path):
    trainer = make_grpo_trainer(data_dir, tmp_path, kl_beta=0.0)
    runs = {}
    for scale in ("group", "batch", "none"):
        trainer.config.scale_rewards = scale
        runs[scale] = collect(trainer)
    rewards = runs["group"].rewards
    assert torch.equal(rewards, runs["none"].rewards) and torch.equal(rewards, runs["batch"].rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    assert torch.allclose(runs["none"].advantages, centred.flatten(), atol=1e-6)
    assert torch.allclose(runs["group"].advantages, (centred / (rewards.std(dim=1, keepdim=True) + 1e-4)).flatten(),
                          atol=1e-5)
    assert torch.allclose(runs["batch"].advantages, (centred / (rewards.std() + 1e-4)).flatten(), atol=1e-5)


def test_kl_beta_weights_the_k3_penalty_in_the_trainer_loss(data_dir, tmp_path):
    assert make_grpo_trainer(data_dir, tmp_path, kl_beta=0.0).reference is None  # no reference pass
    trainer = make_grpo_trainer(data_dir, tmp_path, kl_beta=0.5)
    assert trainer.reference is not None
    rollouts = collect(trainer)
    # At the start the replay equals the old log-probs; put the reference 0.5 nats below them:
    # log r = ref - new = -0.5 per action, k3 = e^-0.5 + 0.5 - 1.
    rollouts.ref_logprobs = rollouts.old_logprobs - 0.5
    k3 = math.exp(-0.5) + 0.5 - 1
    losses = {}
    for beta in (0.0, 0.5, 2.0):
        trainer.config.kl_beta = beta
        losses[beta] = trainer.policy_loss(rollouts)[0].item()
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * k3, abs=1e-4)
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * k3, abs=1e-4)


def test_clip_eps_bounds_the_ratio_of_positive_advantage_rollouts(data_dir, tmp_path):
    trainer = make_grpo_trainer(data_dir, tmp_path, kl_beta=0.0)
    rollouts = collect(trainer)
    rollouts.old_logprobs = rollouts.old_logprobs - 1.0  # every action's ratio is now e
    adv = rollouts.advantages
    for eps in (0.2, 0.5):
        trainer.config.clip_eps = eps
        # A > 0: clipped to (1 + eps) A; A < 0: min(e A, (1 + eps) A) = e A. Loss = -mean over rollouts.
        expected = -torch.where(adv > 0, (1 + eps) * adv, math.e * adv).mean().item()
        assert trainer.policy_loss(rollouts)[0].item() == pytest.approx(expected, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo"])
def test_loss_type_sets_what_the_trainer_loss_averages_over(loss_type, data_dir, tmp_path):
    trainer = make_grpo_trainer(data_dir, tmp_path, kl_beta=0.0, loss_type=loss_type, clip_eps_high=0.5)
    rollouts = collect(trainer)
    rollouts.old_logprobs = rollouts.old_logprobs - 1.0  # every action's ratio is e: A > 0 clipped to 1.5 A
    per_rollout = [(-(1.5 if a > 0 else math.e) * a, 4 * t.n_objects + t.stopped)  # (loss per action, actions)
                   for a, t in zip(rollouts.advantages.tolist(), rollouts.targets)]
    total = sum(loss * n for loss, n in per_rollout)
    actions = sum(n for _, n in per_rollout)
    loss, weight, _ = trainer.policy_loss(rollouts)
    if loss_type == "bnpo":
        assert weight == actions and loss.item() == pytest.approx(total / actions, rel=1e-3, abs=1e-5)
    else:  # the constant: x, y, size and continue for each of max_objects=3 objects
        assert weight == len(per_rollout) and loss.item() == pytest.approx(total / (len(per_rollout) * 12), rel=1e-3,
                                                                            abs=1e-5)


def stopping_half_the_time(trainer: GRPOTrainer) -> GRPOTrainer:
    """Raise the end-of-text logit so a rollout stops early about as often as max_objects cuts it off."""
    model = trainer.model
    with torch.no_grad():
        model.text.lm_head.bias[model.config.tokenizer.eos_id] += 6.0
    return trainer


def test_mask_truncated_zeroes_the_advantage_of_rollouts_cut_off_by_max_objects(data_dir, tmp_path):
    trainer = stopping_half_the_time(make_grpo_trainer(data_dir, tmp_path, kl_beta=0.0))
    plain = collect(trainer)
    trainer.config.mask_truncated = True
    masked = collect(trainer)
    assert torch.equal(plain.rewards, masked.rewards)
    cut = torch.tensor([not t.stopped for t in masked.targets])
    assert [t.n_objects for t in masked.targets if not t.stopped] == [3] * int(cut.sum())
    assert 0 < cut.sum() < len(cut), "the batch needs rollouts of both kinds"
    assert torch.all(masked.advantages[cut] == 0) and torch.equal(masked.advantages[~cut], plain.advantages[~cut])
    assert masked.truncated.sum() == cut.sum()  # all groups have spread here: every rollout is replayed


def test_every_update_compares_the_policy_with_the_rollout_policy(data_dir, tmp_path, monkeypatch):
    """With --num_iterations=3 the old log-probs stay those the rollouts were sampled with: the second
    and third ratios are not reset to 1, and they are clipped."""
    trainer = make_grpo_trainer(data_dir, tmp_path, kl_beta=0.0, num_iterations=3, lr=5e-2, warmup_ratio=0.0,
                                clip_eps=0.05)
    calls = []

    def spy(new, old, *args, **kwargs):
        calls.append((new.detach().clone(), old.clone()))
        return ppo_loss(new, old, *args, **kwargs)

    monkeypatch.setattr(finetune.grpo, "ppo_loss", spy)
    torch.manual_seed(0)
    logs = trainer.optimizer_step([trainer.make_items(0)[: trainer.config.batch_size]])
    assert logs["updates"] == 3 and len(calls) == 3
    old = calls[0][1]
    assert all(torch.equal(o, old) for _, o in calls)
    assert torch.allclose(calls[0][0], old, atol=1e-5)  # before any update the ratio is 1
    assert (calls[1][0] - old).abs().max() > 1e-3 and (calls[2][0] - calls[1][0]).abs().max() > 1e-4
    assert logs["clip_fraction"] > 0


def gradients(trainer: GRPOTrainer, rollouts, sft_weight: float) -> tuple[dict, dict]:
    trainer.config.sft_weight = sft_weight
    trainer.model.zero_grad(set_to_none=True)
    loss, _, logs = trainer.policy_loss(rollouts)
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}, logs


def test_sft_weight_zero_leaves_the_gradients_unchanged(data_dir, tmp_path):
    without = make_grpo_trainer(data_dir, tmp_path / "a", kl_beta=0.0)
    with_zero = make_grpo_trainer(data_dir, tmp_path / "b", kl_beta=0.0, sft_weight=0.0)
    expected, logs = gradients(without, collect(without), 0.0)
    got, logs_zero = gradients(with_zero, collect(with_zero), 0.0)
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
    assert "sft_loss" not in logs and "sft_loss" not in logs_zero


def test_sft_weight_adds_w_times_the_teacher_forced_gradient_of_the_ground_truth(data_dir, tmp_path):
    trainer = make_grpo_trainer(data_dir, tmp_path, kl_beta=0.0)
    rollouts = collect(trainer)
    model = trainer.model
    rl, _ = gradients(trainer, rollouts, 0.0)
    mixed, logs = gradients(trainer, rollouts, 0.5)
    # The ground truth of the batch, as whole teacher-forced sequences (image features, not prefixes).
    model.zero_grad(set_to_none=True)
    samples = rollouts.samples
    targets = [boxes_to_target(model.prompt_tokens("detect", s.class_name), s.boxes, model.region) for s in samples]
    batch = build_action_batch(model, [trainer.features(s.image_path) for s in samples], targets, feed_dtype=model.dtype)
    sft, _ = supervised_loss(model, batch)
    sft.backward()
    assert logs["sft_loss"] == pytest.approx(sft.item(), rel=1e-4)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(mixed[name] - rl.get(name, 0.0), 0.5 * p.grad, atol=1e-6, rtol=1e-3), name


# ---- negatives_per_positive ------------------------------------------------------------------------
class CaptureItems:
    """Stands in for the trainer class: `fit()` returns the first epoch's items."""

    def __init__(self, config, *args, **kwargs):
        self.make_items = next(a for a in args if callable(a) and not isinstance(a, torch.nn.Module))

    def fit(self):
        return self.make_items(0)


def run_items(monkeypatch, script: str, data_dir, tmp_path, npp: float) -> list:
    if script == "grpo":
        monkeypatch.setattr(finetune.grpo, "GRPOTrainer", CaptureItems)
        config = GRPOConfig(**FAST, dataset=str(data_dir), output_dir=str(tmp_path), negatives_per_positive=npp)
        return grpo_trainer.main(config)
    monkeypatch.setattr(finetune.supervised, "Trainer", CaptureItems)
    if script == "sft":
        return sft_trainer.main(sft_trainer.SFTConfig(model="tiny", dataset=str(data_dir), output_dir=str(tmp_path),
                                                      negatives_per_positive=npp))
    return sft_trainer_detect_grad.main(sft_trainer_detect_grad.DetectGradConfig(
        model="tiny", dataset=str(data_dir), output_dir=str(tmp_path), negatives_per_positive=npp))


@pytest.mark.parametrize("script", ["sft", "detect_grad", "grpo"])
def test_negatives_per_positive_sets_the_share_of_empty_pairs(script, monkeypatch, data_dir, tmp_path):
    split = load_split(data_dir, "train")
    pairs = len(split.images) * len(split.class_names)
    none = run_items(monkeypatch, script, data_dir, tmp_path, 0.0)
    positives = len(none)
    assert positives > 0 and all(item.boxes for item in none)
    for npp in (0.5, 1.0):
        items = run_items(monkeypatch, script, data_dir, tmp_path, npp)
        negatives = sum(not item.boxes for item in items)
        assert negatives == min(pairs - positives, round(npp * positives)) > 0
        assert len(items) - negatives == positives
