"""GRPO for detection: the ratio starts at exactly 1, rewards are pure, flat groups teach nothing,
the reference policy is the start policy, and a short run of the script survives a partial batch."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_image
from datasets import write_synthetic_coco
from finetune.cli import run_cli
from finetune.feature_cache import FeatureCache
from finetune.grpo import GRPOConfig, GRPOTrainer
from finetune.grpo_loss import (
    ReferencePolicy,
    group_advantages,
    ppo_loss,
    replay_logprobs,
    score_rollouts,
    target_objects,
    trace_targets,
)
from finetune.preparation import image_groups, load_data, prepare_model
from finetune.rewards import REWARDS, RewardTerm
from finetune.sequences import boxes_to_target
from grpo_trainer import main
from moondream2.decoding import run_region_loop

BOXES = ((0.1, 0.2, 0.3, 0.5), (0.5, 0.1, 0.9, 0.4))
FAST = dict(model="tiny", eval_limit=2, max_objects=3, num_pictures=1, lora_rank=4, lora_alpha=8,
            num_rollouts=4, batch_size=2, eval_interval=100)


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here on one thread (see conftest)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """3 tiny train images with 4 (image, class) pairs that have boxes (seed 2: every split has boxes)."""
    return write_synthetic_coco(tmp_path_factory.mktemp("shapes"), n_train=3, n_valid=2, n_test=2, seed=2,
                                image_size=96, max_objects=2)


def stopping_model(eos_bias: float) -> torch.nn.Module:
    """A tiny model whose stop decision is a real coin flip (random init almost never stops)."""
    model = make_tiny_model(0)
    with torch.no_grad():
        model.text.lm_head.bias[model.config.tokenizer.eos_id] += eos_bias
    return model


def test_recorded_logprobs_equal_replayed_logprobs():
    """Before any update the importance ratio of every action is 1: empty, stopped and cut-off rollouts."""
    model, max_objects = stopping_model(8.0), 3
    prompt = model.prompt_tokens("detect", "box")
    features = [model.image_embeddings(random_image(96, 96, seed)) for seed in (1, 2)]
    images = [model.encode_image(f) for f in features for _ in range(8)]
    with torch.no_grad():
        trace = run_region_loop(model, images, [prompt] * 16, max_objects, temperature=1.0,
                                generator=torch.Generator().manual_seed(0))
        targets, old = trace_targets(trace, [prompt] * 16, max_objects)
        new, sequence = replay_logprobs(model, [f for f in features for _ in range(8)], targets, 1.0)
    counts = trace.n_objects.tolist()
    assert 0 in counts and max_objects in counts and any(0 < n < max_objects for n in counts), counts
    assert torch.equal(sequence.bincount(minlength=16), torch.tensor([4 * n + (n < max_objects) for n in counts]))
    ratio = (new - torch.cat(old)).exp()
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), (ratio - 1).abs().max()


def test_point_rollouts_replay_to_their_recorded_logprobs():
    """--task=point samples x, y and the stop decision only; the replay scores exactly those actions."""
    model, max_objects = stopping_model(8.0), 3
    prompt = model.prompt_tokens("point", "box")
    feature = model.image_embeddings(random_image(96, 96, 4))
    with torch.no_grad():
        trace = run_region_loop(model, [model.encode_image(feature)] * 12, [prompt] * 12, max_objects, with_size=False,
                                temperature=1.0, generator=torch.Generator().manual_seed(0))
        targets, old = trace_targets(trace, [prompt] * 12, max_objects, with_size=False)
        new, sequence = replay_logprobs(model, [feature] * 12, targets, 1.0)
    counts = trace.n_objects.tolist()
    assert all(t.size_bins is None for t in targets) and len(set(counts)) > 1, counts
    assert torch.equal(sequence.bincount(minlength=12), torch.tensor([3 * n + (n < max_objects) for n in counts]))
    assert torch.allclose(new, torch.cat(old), atol=1e-5)
    points = target_objects(targets[counts.index(max(counts))], model.region)
    assert len(points) == max(counts) and all(len(p) == 2 and 0 <= min(p) <= max(p) < 1 for p in points)


def test_replay_on_a_shared_image_prefix_equals_whole_sequences():
    """The trainer replays a group against its image's prefix K/V, run once with gradients: the same
    log-probs and the same gradients (text blocks included) as replaying whole sequences."""
    model = stopping_model(8.0)
    model.requires_grad_(True)
    prompt = model.prompt_tokens("detect", "box")
    feature = model.image_embeddings(random_image(96, 96, 5)).detach()
    with torch.no_grad():
        trace = run_region_loop(model, [model.encode_image(feature)] * 6, [prompt] * 6, 3, temperature=1.0,
                                generator=torch.Generator().manual_seed(2))
    targets, _ = trace_targets(trace, [prompt] * 6, 3)
    grads = []
    for images in ([feature] * 6, [model.prefix_kv(feature)] * 6):
        model.zero_grad(set_to_none=True)
        logp, _ = replay_logprobs(model, images, targets, 1.0)
        logp.sum().backward()
        grads.append((logp.detach(), model.text.blocks[0].attn.qkv.weight.grad.clone(),
                      model.region.coord_decoder.fc1.weight.grad.clone()))
    for whole, shared in zip(*grads):
        assert torch.allclose(whole, shared, atol=1e-5, rtol=1e-4), (whole - shared).abs().max()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_ratio_is_one_at_other_temperatures(temperature):
    model = stopping_model(8.0)
    prompt = model.prompt_tokens("detect", "box")
    feature = model.image_embeddings(random_image(96, 96, 3))
    with torch.no_grad():
        trace = run_region_loop(model, [model.encode_image(feature)] * 6, [prompt] * 6, 3, temperature=temperature,
                                generator=torch.Generator().manual_seed(1))
        targets, old = trace_targets(trace, [prompt] * 6, 3)
        new, _ = replay_logprobs(model, [feature] * 6, targets, temperature)
    assert torch.allclose(new, torch.cat(old), atol=1e-5)


@pytest.mark.parametrize("reward", sorted(REWARDS))
def test_identical_rollouts_get_identical_rewards(reward):
    from datasets import DetectionSample

    model = make_tiny_model(0)
    sample = DetectionSample(Path("x.png"), 0, "box", BOXES)
    perfect = boxes_to_target([1, 2], BOXES, model.region)
    terms = [RewardTerm(reward, REWARDS[reward])]
    rewards = score_rollouts([perfect] * 3, [sample], model.region, terms, [(96, 96)])
    assert rewards.shape == (1, 3, 1) and torch.all(rewards == rewards[0, 0]) and rewards[0, 0, 0] > 0.9
    empty = boxes_to_target([1, 2], [], model.region)
    negative = DetectionSample(Path("x.png"), 0, "box", ())
    scores = score_rollouts([empty, empty, perfect], [negative], model.region, terms, [(96, 96)])
    assert scores.tolist() == [[[1.0], [1.0], [0.0]]]


@pytest.mark.parametrize("scale", ["group", "none"])
def test_flat_group_has_zero_advantage_and_is_skipped(scale):
    rewards = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    advantages, spread = group_advantages(rewards, scale)
    assert spread.tolist() == [False, True, False]
    assert torch.equal(advantages[[0, 2]], torch.zeros(2, 4))
    assert advantages[1].sum().abs() < 1e-6 and advantages[1, 1] > 0 > advantages[1, 0]
    if scale == "group":
        assert advantages[1].std() == pytest.approx(1.0, abs=1e-3)
    else:
        assert advantages[1].tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0])


def test_ppo_loss_averages_per_rollout_then_over_rollouts_and_clips():
    # rollout 0: 3 actions at ratio 1; rollout 1: one action at ratio e^0.5 (clipped for A > 0)
    new = torch.tensor([0.0, 0.0, 0.0, 0.5], requires_grad=True)
    old = torch.zeros(4)
    loss, weight, logs = ppo_loss(new, old, torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 0, 1]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.0 + 2.0 * 1.2) / 2) and weight == 2
    assert logs["clip_fraction"] == pytest.approx(0.25)
    loss.backward()
    assert new.grad.tolist() == pytest.approx([-1 / 6, -1 / 6, -1 / 6, 0.0])  # clipped action: no gradient


# A hand-worked batch: rollout 0 takes 4 actions, rollout 1 three. Log-ratios new - old and advantages:
#   action       0     1     2     3  |   4     5     6
#   log ratio    0    0.3  -0.3   0.1 | -0.5  -0.4   0.1      advantages: A0 = 1, A1 = -2
# With clip_eps 0.2 the per-action loss -min(r A, clip(r, 0.8, 1.2) A) is
#   a0: r = 1                           -> -1
#   a1: r = e^0.3 = 1.35 > 1.2, A > 0   -> clipped high: -1.2, no gradient
#   a2: r = e^-0.3 = 0.74 < 0.8, A > 0  -> min(0.74, 0.8) = 0.74: -e^-0.3, not clipped (a clip never lowers a loss)
#   a3: r = e^0.1 = 1.105               -> -e^0.1
#   a4: r = e^-0.5 = 0.61 < 0.8, A < 0  -> min(-1.21, -1.6) = -1.6: clipped low, +1.6, no gradient
#   a5: r = e^-0.4 = 0.67 < 0.8, A < 0  -> clipped low, +1.6, no gradient
#   a6: r = e^0.1, A < 0                -> +2 e^0.1
# Clipped: 1 of 7 at the high end, 2 of 7 at the low end. Where unclipped, d loss / d log r = -r A / N
# with N what the loss type divides that action's term by.
HAND_NEW = [0.0, 0.3, -0.3, 0.1, -0.5, -0.4, 0.1]
HAND_SEQUENCE = [0, 0, 0, 0, 1, 1, 1]
HAND_ADVANTAGES = [1.0, -2.0]
HAND_PER_ACTION = [-1.0, -1.2, -math.exp(-0.3), -math.exp(0.1), 1.6, 1.6, 2 * math.exp(0.1)]
HAND_SLOPE = [-1.0, 0.0, -math.exp(-0.3), -math.exp(0.1), 0.0, 0.0, 2 * math.exp(0.1)]  # -r A, 0 where clipped


def hand_loss(**kwargs):
    new = torch.tensor(HAND_NEW, requires_grad=True)
    loss, weight, logs = ppo_loss(new, torch.zeros(7), torch.tensor(HAND_ADVANTAGES), torch.tensor(HAND_SEQUENCE),
                                  clip_eps=0.2, **kwargs)
    loss.backward()
    return loss.item(), weight, logs, new.grad.tolist()


def test_grpo_loss_is_the_mean_over_rollouts_of_each_rollouts_mean():
    loss, weight, logs, grad = hand_loss(loss_type="grpo")
    rollout_0, rollout_1 = sum(HAND_PER_ACTION[:4]) / 4, sum(HAND_PER_ACTION[4:]) / 3
    assert loss == pytest.approx((rollout_0 + rollout_1) / 2) and weight == 2
    assert logs["clip_fraction_high"] == pytest.approx(1 / 7) and logs["clip_fraction_low"] == pytest.approx(2 / 7)
    assert logs["clip_fraction"] == pytest.approx(3 / 7)
    assert grad == pytest.approx([g / (4 * 2) for g in HAND_SLOPE[:4]] + [g / (3 * 2) for g in HAND_SLOPE[4:]])


def test_bnpo_loss_is_the_mean_over_every_action():
    loss, weight, _, grad = hand_loss(loss_type="bnpo")
    assert loss == pytest.approx(sum(HAND_PER_ACTION) / 7) and weight == 7
    assert grad == pytest.approx([g / 7 for g in HAND_SLOPE])


def test_dr_grpo_loss_divides_each_rollouts_sum_by_a_constant():
    loss, weight, _, grad = hand_loss(loss_type="dr_grpo", max_actions=8)
    assert loss == pytest.approx(sum(HAND_PER_ACTION) / (2 * 8)) and weight == 2
    assert grad == pytest.approx([g / 16 for g in HAND_SLOPE])
    with pytest.raises(ValueError):
        hand_loss(loss_type="dr_grpo")


def test_clip_eps_high_widens_only_the_upper_clip():
    # Clip range [0.8, 1.4]: a1 (r = 1.35) is no longer clipped; a4 and a5 (A < 0) still are.
    loss, _, logs, grad = hand_loss(clip_eps_high=0.4)
    per_action = [-1.0, -math.exp(0.3)] + HAND_PER_ACTION[2:]
    assert loss == pytest.approx((sum(per_action[:4]) / 4 + sum(per_action[4:]) / 3) / 2)
    assert logs["clip_fraction_high"] == 0.0 and logs["clip_fraction_low"] == pytest.approx(2 / 7)
    assert grad[1] == pytest.approx(-math.exp(0.3) / 8) and grad[4] == grad[5] == 0.0


def test_reference_is_the_start_policy_without_lora():
    model = make_tiny_model(0)
    model.requires_grad_(False)
    trained = model.region.coord_decoder.fc1.weight
    trained.requires_grad_(True)
    start = trained.detach().clone()
    reference = ReferencePolicy(model)
    with torch.no_grad():
        trained.add_(1.0)
    with reference.active():
        assert torch.equal(trained, start)
    assert torch.equal(trained, start + 1.0)
    assert len(reference.frozen) == 1  # a copy of the trained tensor only


def grpo_trainer(config: GRPOConfig) -> GRPOTrainer:
    model = prepare_model(config)
    data = load_data(config)
    features = FeatureCache(model, "memory", Path(config.output_dir) / "cache")

    def make_items(epoch):
        return image_groups(data.train.samples(config.negatives_per_positive, seed=epoch), seed=epoch)

    return GRPOTrainer(config, model, data, make_items, features)


def first_batch(trainer: GRPOTrainer) -> list:
    return trainer.make_items(0)[: trainer.config.batch_size]


def test_kl_is_zero_at_the_start_and_only_trained_params_get_gradients(data_dir, tmp_path):
    # Injected ground truth guarantees reward spread on a random model; its "old" log-probs are scored.
    config = GRPOConfig(**FAST, dataset=str(data_dir), output_dir=str(tmp_path), inject_ground_truth=True,
                        inject_threshold=1.01, kl_beta=0.5, lr=1e-2, warmup_ratio=0.0)
    trainer = grpo_trainer(config)
    model = trainer.model
    assert trainer.reference.switch_off_adapters  # fresh adapters: the reference is the base model
    batch = first_batch(trainer)
    rollouts = trainer.collect(batch)
    assert rollouts.injected == len(batch) and rollouts.targets
    new, _ = trainer.replay(rollouts)
    assert torch.allclose(new.detach(), rollouts.old_logprobs, atol=1e-5)  # ratio 1, ground truth included
    loss, weight, logs = trainer.policy_loss(rollouts)
    assert weight == len(rollouts.targets)
    assert logs["kl"] == 0.0 and logs["clip_fraction"] == 0.0
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    named = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_B" in n for n in named) and any(n.startswith("region.") for n in named)
    assert all(p.dtype == torch.float32 for p in named.values())
    model.zero_grad(set_to_none=True)

    logs = trainer.optimizer_step([batch])
    assert logs["updates"] == 1 and logs["injected"] == len(batch) and logs["grad_norm"] > 0
    _, _, after = trainer.policy_loss(trainer.collect(batch))
    assert after["kl"] > 0  # the policy moved away from the reference


def test_flat_rewards_skip_the_update(data_dir, tmp_path, monkeypatch):
    config = GRPOConfig(**FAST, dataset=str(data_dir), output_dir=str(tmp_path))
    trainer = grpo_trainer(config)
    trainer.rewards = [RewardTerm("flat", lambda pred, gt, size: 0.5)]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    logs = trainer.optimizer_step([first_batch(trainer)])
    assert logs["skipped_groups"] == logs["groups"] == config.batch_size and logs["updates"] == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_flag_errors():
    from moondream2.errors import UserInputError

    for bad in (dict(num_rollouts=1), dict(temperature=0.0), dict(reward="nope"), dict(lora_dropout=0.1), dict(fsdp=True),
                dict(loss_type="dapo"), dict(scale_rewards="std"), dict(clip_eps_high=0.0), dict(sft_weight=-1.0),
                dict(task="both"), dict(task="point", reward="iou"), dict(reward="iou,f1", reward_weights=(1.0,)),
                dict(reward="/nonexistent/r.py:f")):
        with pytest.raises(UserInputError):
            GRPOConfig(**bad)
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"  # the flag's boolean form
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"


def test_short_run_with_a_partial_last_batch(data_dir, tmp_path):
    config = GRPOConfig(**FAST, dataset=str(data_dir), output_dir=str(tmp_path), epochs=1, negatives_per_positive=0.25,
                        inject_ground_truth=True, inject_threshold=1.01)
    samples = load_data(config).train.samples(config.negatives_per_positive, seed=config.seed)
    assert len(samples) == 5  # batches of 2, 2 and 1
    summary = main(config)
    assert Path(summary["final_path"]).name == "moondream_lora_finetune_grpo.safetensors"
    log = [json.loads(line) for line in (tmp_path / "log_grpo.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "train"]
    assert [r["groups"] for r in steps] == [2, 2, 1]
    assert all(r["updates"] == 1 and r["injected"] == r["groups"] for r in steps)
    assert {"reward_mean", "reward_std", "skipped_groups", "grad_norm", "lr", "loss"} <= steps[0].keys()
    assert {"rewards/iou/mean", "rewards/iou/std", "skipped_fraction", "clip_fraction_low", "clip_fraction_high", "kl",
            "objects_per_rollout", "truncated_rollouts", *GRPOTrainer.progress_keys} <= steps[0].keys()
    assert (tmp_path / "resume_grpo.pt").is_file()


USER_REWARDS = """
def hits_left_half(pred, gt, image_size):
    width, height = image_size
    assert (width, height) == (96, 96)  # the synthetic images' size, in pixels
    return float(sum(p[0] < 0.5 for p in pred))

def boom(pred, gt, image_size):
    raise KeyError("no such box")

def nan(pred, gt, image_size):
    return float("nan")
"""


def test_several_rewards_are_weighted_and_logged_each(data_dir, tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(USER_REWARDS)
    config = GRPOConfig(**FAST, dataset=str(data_dir), output_dir=str(tmp_path), max_steps=2, baseline_eval=False,
                        reward=("f1", f"{rewards}:hits_left_half"), reward_weights=(1.0, 0.25))
    trainer = grpo_trainer(config)
    assert [(t.name, t.weight) for t in trainer.rewards] == [("f1", 1.0), (f"{rewards}:hits_left_half", 0.25)]
    torch.manual_seed(0)
    logs = trainer.optimizer_step([first_batch(trainer)])
    f1, user = logs["rewards/f1/mean"], logs[f"rewards/{rewards}:hits_left_half/mean"]
    assert user > 0 and logs["reward_mean"] == pytest.approx(f1 + 0.25 * user)
    assert logs[f"rewards/{rewards}:hits_left_half/std"] >= 0


@pytest.mark.parametrize("function, says", [("boom", "raised KeyError: 'no such box'"),
                                            ("nan", "returned nan: a reward must be a finite number")])
def test_a_failing_reward_stops_the_run_with_one_line_naming_it(function, says, data_dir, tmp_path, capsys):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(USER_REWARDS)
    argv = [f"--{k}={v}" for k, v in FAST.items()] + [
        f"--dataset={data_dir}", f"--output_dir={tmp_path / 'out'}", "--baseline_eval=False", "--reward=iou",
        f"--reward={rewards}:{function}"]
    with pytest.raises(SystemExit) as stop:
        run_cli(GRPOConfig, main, "grpo", argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --reward={rewards}:{function} {says}" and not any("Traceback" in line for line in err)


def test_a_short_pointing_run(data_dir, tmp_path):
    config = GRPOConfig(**FAST, dataset=str(data_dir), output_dir=str(tmp_path), task="point", max_steps=2,
                        inject_ground_truth=True, inject_threshold=1.01, sft_weight=0.5, mask_truncated=True)
    summary = main(config)
    log = [json.loads(line) for line in (tmp_path / "log_grpo.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "train"]
    assert len(steps) == 2 and all(r["updates"] == 1 and r["injected"] == r["groups"] for r in steps)
    assert {"rewards/point_f1/mean", "sft_loss", "truncated_rollouts"} <= steps[0].keys()
    final = summary["metrics"]["final"]
    assert "point_f1" in final and "f1" not in final  # evaluated by pointing, checkpoints chosen on point F1
