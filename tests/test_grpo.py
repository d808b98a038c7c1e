"""GRPO for detection: the ratio starts at exactly 1, rewards are pure, flat groups teach nothing,
the reference policy is the start policy, and a short run of the script survives a partial batch."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_image
from datasets import write_synthetic_coco
from finetune.grpo import (
    GRPOConfig,
    GRPOTrainer,
    ReferencePolicy,
    group_advantages,
    ppo_loss,
    replay_logprobs,
    score_rollouts,
    trace_targets,
)
from finetune.rewards import REWARDS
from finetune.sequences import boxes_to_target
from finetune.training import FeatureCache, image_groups, load_data, prepare_model
from grpo_trainer import main
from moondream2.decoding import run_region_loop

BOXES = ((0.1, 0.2, 0.3, 0.5), (0.5, 0.1, 0.9, 0.4))
FAST = dict(model="tiny", eval_limit=2, max_objects=3, num_pictures=1, lora_rank=4, lora_alpha=8,
            num_rollouts=4, batch_size=2, eval_interval=100)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


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
    rewards = score_rollouts([perfect] * 3, [sample], model.region, REWARDS[reward])
    assert rewards.shape == (1, 3) and torch.all(rewards == rewards[0, 0]) and rewards[0, 0] > 0.9
    empty = boxes_to_target([1, 2], [], model.region)
    negative = DetectionSample(Path("x.png"), 0, "box", ())
    assert score_rollouts([empty, empty, perfect], [negative], model.region, REWARDS[reward]).tolist() == [[1.0, 1.0, 0.0]]


@pytest.mark.parametrize("scale", [True, False])
def test_flat_group_has_zero_advantage_and_is_skipped(scale):
    rewards = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    advantages, spread = group_advantages(rewards, scale)
    assert spread.tolist() == [False, True, False]
    assert torch.equal(advantages[[0, 2]], torch.zeros(2, 4))
    assert advantages[1].sum().abs() < 1e-6 and advantages[1, 1] > 0 > advantages[1, 0]
    if scale:
        assert advantages[1].std() == pytest.approx(1.0, abs=1e-3)
    else:
        assert advantages[1].tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0])


def test_ppo_loss_averages_per_rollout_then_over_rollouts_and_clips():
    # rollout 0: 3 actions at ratio 1; rollout 1: one action at ratio e^0.5 (clipped for A > 0)
    new = torch.tensor([0.0, 0.0, 0.0, 0.5], requires_grad=True)
    old = torch.zeros(4)
    loss, logs = ppo_loss(new, old, torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 0, 1]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.0 + 2.0 * 1.2) / 2)
    assert logs["clip_fraction"] == pytest.approx(0.25)
    loss.backward()
    assert new.grad.tolist() == pytest.approx([-1 / 6, -1 / 6, -1 / 6, 0.0])  # clipped action: no gradient


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

    logs = trainer._optimizer_step([batch])
    assert logs["updates"] == 1 and logs["injected"] == len(batch) and logs["grad_norm"] > 0
    _, _, after = trainer.policy_loss(trainer.collect(batch))
    assert after["kl"] > 0  # the policy moved away from the reference


def test_flat_rewards_skip_the_update(data_dir, tmp_path, monkeypatch):
    config = GRPOConfig(**FAST, dataset=str(data_dir), output_dir=str(tmp_path))
    trainer = grpo_trainer(config)
    trainer.reward = lambda pred, gt: 0.5
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    logs = trainer._optimizer_step([first_batch(trainer)])
    assert logs["skipped_groups"] == logs["groups"] == config.batch_size and logs["updates"] == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_flag_errors():
    from moondream2.errors import UserInputError

    for bad in (dict(num_rollouts=1), dict(temperature=0.0), dict(reward="nope"), dict(lora_dropout=0.1), dict(fsdp=True)):
        with pytest.raises(UserInputError):
            GRPOConfig(**bad)


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
    assert (tmp_path / "resume_grpo.pt").is_file()
