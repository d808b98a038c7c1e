"""The fast SFT trainer: prefix-cached scoring equals the full pass, augmentation, pointing, a short run."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, random_image
from safetensors.torch import load_file

from datasets import DetectionSplit, ImageRecord, canonical_order
from finetune.checkpoint import read_metadata
from finetune.feature_cache import FeatureCache, PrefixCache, prefix_is_frozen
from finetune.preparation import prepare_model
from finetune.sequences import DECISION, H, W, boxes_to_target, build_action_batch, supervised_loss
from finetune.supervised import Example, TeacherForcing, hflip_boxes, make_examples
from moondream2.region import coord_to_bin
from sft_trainer import SFTConfig, main

BOXES = ((0.1, 0.2, 0.3, 0.5), (0.5, 0.1, 0.9, 0.4), (0.42, 0.6, 0.58, 0.95))


@pytest.fixture(scope="module")
def region_only():
    """Tiny model training only its region head: the setting where prefixes are cached."""
    model = make_tiny_model(0)
    model.requires_grad_(False)
    model.region.requires_grad_(True)
    return model


def features(model, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.config.vision.n_patches, model.config.text.dim, generator=g) * 0.5


def loss_and_grads(model, images, targets):
    model.zero_grad()
    loss, parts = supervised_loss(model, build_action_batch(model, images, targets))
    loss.backward()
    return loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prefix_cached_loss_and_gradient_equal_the_full_pass(region_only):
    model = region_only
    a, b = features(model, 1), features(model, 2)
    targets = [
        boxes_to_target(model.prompt_tokens("detect", "a"), BOXES, model.region),
        boxes_to_target(model.prompt_tokens("point", "longer class name"), BOXES[:2], model.region, with_size=False),
        boxes_to_target(model.prompt_tokens("detect", "c"), [], model.region),
    ]
    full, full_parts, full_grads = loss_and_grads(model, [a, b, a], targets)
    enc_a, enc_b = model.encode_image(a), model.encode_image(b)
    cached, cached_parts, cached_grads = loss_and_grads(model, [enc_a, enc_b, enc_a], targets)

    assert torch.allclose(full, cached, atol=1e-6), (full, cached)
    assert full_parts == pytest.approx(cached_parts, abs=1e-5)
    assert full_grads.keys() == cached_grads.keys() and full_grads  # the region head, nothing else
    assert all(n.startswith("region.") for n in full_grads)
    for name in full_grads:
        assert torch.allclose(full_grads[name], cached_grads[name], rtol=1e-4, atol=1e-7), name
        assert full_grads[name].abs().sum() > 0, name  # gradient flows through the suffix


def test_prefix_cache_applies_only_while_the_decoder_is_frozen(tmp_path):
    common = dict(model="tiny", output_dir=str(tmp_path), lora_rank=4, lora_alpha=8)
    assert prefix_is_frozen(prepare_model(SFTConfig(**common, region_only=True)))
    assert not prefix_is_frozen(prepare_model(SFTConfig(**common, use_lora=True)))
    assert not prefix_is_frozen(prepare_model(SFTConfig(**common, use_lora=False, train_text=True)))


def test_teacher_forcing_with_and_without_the_prefix_cache_agree(region_only, tmp_path):
    model = region_only
    path = tmp_path / "image.png"
    random_image(96, 80, seed=3).save(path)
    cache = FeatureCache(model, "memory", tmp_path)
    batch = [Example(path, "a", "detect", False, BOXES), Example(path, "b", "point", True, BOXES[:1]),
             Example(path, "c", "detect", True, ())]
    full, n_full, _ = TeacherForcing(model, cache)(batch)
    prefixes = PrefixCache(model, cache, budget_mb=64)
    cached, n_cached, _ = TeacherForcing(model, cache, prefixes)(batch)
    assert torch.allclose(full, cached, atol=1e-6) and n_full == n_cached
    assert len(prefixes.entries) == 2  # one prefix per side of the image


def test_hflip_mirrors_boxes_and_restores_canonical_order():
    left, right = (0.1, 0.4, 0.3, 0.6), (0.6, 0.4, 0.9, 0.6)  # same row: order is left to right
    flipped = hflip_boxes((left, right))
    assert [pytest.approx(b) for b in flipped] == [(0.1, 0.4, 0.4, 0.6), (0.7, 0.4, 0.9, 0.6)]
    assert [pytest.approx(b) for b in hflip_boxes(hflip_boxes(BOXES))] == list(canonical_order(BOXES))


def test_flipped_features_are_those_of_the_mirrored_image_under_another_key(region_only, tmp_path):
    model = region_only
    path = tmp_path / "image.png"
    image = random_image(96, 80, seed=4)
    image.save(path)
    cache = FeatureCache(model, "memory", tmp_path)
    flipped = cache(path, hflip=True)
    assert FeatureCache.key(path, True) != FeatureCache.key(path)
    assert set(cache.memory) == {FeatureCache.key(path, True)}
    expected = model.image_embeddings(image.transpose(0))  # PIL: 0 = FLIP_LEFT_RIGHT
    assert torch.allclose(flipped, expected, atol=1e-6)
    assert not torch.allclose(cache(path), flipped, atol=1e-3)
    assert len(cache.memory) == 2


def tiny_split(tmp_path) -> DetectionSplit:
    images = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        boxes = {"a": list(BOXES[: 1 + i % 3]), **({"b": [BOXES[2]]} if i % 2 else {})}
        images.append(ImageRecord(path, 64, 64, i, boxes))
    return DetectionSplit(images, ["a", "b"], tmp_path)


def test_examples_flip_per_image_and_are_reproducible(tmp_path):
    split = tiny_split(tmp_path)
    examples = make_examples(split, 1.0, seed=5, hflip_prob=1.0)
    assert all(e.hflip for e in examples)
    for e in examples:
        original = split.images[int(e.image_path.stem)].boxes_by_class.get(e.class_name, [])
        assert e.boxes == hflip_boxes(tuple(original))
    half = make_examples(split, 1.0, seed=5, hflip_prob=0.5)
    assert half == make_examples(split, 1.0, seed=5, hflip_prob=0.5)
    by_image = {}
    for e in half:
        by_image.setdefault(e.image_path, set()).add(e.hflip)
    assert all(len(sides) == 1 for sides in by_image.values())  # all classes of an image share one side


def test_shuffle_is_off_by_default_and_keeps_the_objects(tmp_path):
    split = tiny_split(tmp_path)
    canonical = make_examples(split, 0.0, seed=1)
    assert all(list(e.boxes) == split.images[int(e.image_path.stem)].boxes_by_class[e.class_name] for e in canonical)
    shuffled = make_examples(split, 0.0, seed=1, shuffle_objects=True)
    assert [sorted(e.boxes) for e in shuffled] == [sorted(e.boxes) for e in canonical]
    assert any(s.boxes != c.boxes for s, c in zip(shuffled, canonical))


def test_point_targets_are_box_centres_without_size_slots(region_only, tmp_path):
    model = region_only
    examples = make_examples(tiny_split(tmp_path), 0.0, seed=2, task="point")
    assert {e.task for e in examples} == {"point"}
    target = boxes_to_target(model.prompt_tokens("point", "a"), BOXES, model.region, with_size=False)
    bins = model.region.coord_bins
    assert target.size_bins is None
    assert target.x_bins.tolist() == coord_to_bin(torch.tensor([0.2, 0.7, 0.5]), bins).tolist()
    assert target.y_bins.tolist() == coord_to_bin(torch.tensor([0.35, 0.25, 0.775]), bins).tolist()
    kinds = build_action_batch(model, [features(model, 1)], [target]).kind.tolist()
    assert W not in kinds and H not in kinds
    assert kinds.count(DECISION) == len(BOXES) + 1  # continue before each point, then stop
    mixed = make_examples(tiny_split(tmp_path), 1.0, seed=2, task="both")
    assert {e.task for e in mixed} == {"detect", "point"}
    assert mixed == make_examples(tiny_split(tmp_path), 1.0, seed=2, task="both")


def test_two_step_run_writes_the_final_checkpoint_and_point_metrics(tmp_path):
    config = SFTConfig(model="tiny", dataset="synthetic", output_dir=str(tmp_path), max_steps=2, eval_limit=2,
                       max_objects=3, num_pictures=1, lora_rank=4, lora_alpha=8, task="both", hflip_prob=0.5,
                       eval_interval=100)
    summary = main(config)
    final = tmp_path / "moondream_lora_finetune_sft.safetensors"
    assert Path(summary["final_path"]) == final and final.is_file()
    assert all("lora_" in k or k.startswith("region.") for k in load_file(str(final)))
    assert read_metadata(final)["trainer"] == "sft" and read_metadata(final)["step"] == 2
    log = [json.loads(line) for line in (tmp_path / "log_sft.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2]
    evals = [r for r in log if r["event"] == "eval"]
    assert all({"f1", "map", "point_f1", "point_precision", "point_recall"} <= r.keys() for r in evals)
    assert (tmp_path / "resume_sft.pt").is_file()


def test_a_batch_nothing_trained_reaches_steps_with_zero_gradients(region_only, tmp_path):
    """Region head only, a batch of negatives: the stop decisions come from the frozen decoder, so the
    loss has no gradient path; the step must still run backward (on every process) and change nothing."""
    from finetune.distributed import LossModule

    path = tmp_path / "image.png"
    random_image(64, 64, seed=1).save(path)
    cache = FeatureCache(region_only, "memory", tmp_path)
    negatives = [Example(path, "a", "detect", False, ()), Example(path, "b", "detect", False, ())]
    module = LossModule(region_only, TeacherForcing(region_only, cache, PrefixCache(region_only, cache, 64)))
    region_only.zero_grad()
    loss, weight, _ = module(negatives)
    assert weight == 2 and float(loss.detach()) > 0  # two stop decisions, scored
    (loss * weight).backward()
    grads = [p.grad for p in region_only.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)
