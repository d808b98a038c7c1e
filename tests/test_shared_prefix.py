"""One prefix per image per step (`StepPrefixes`): every class of an image attends to a single run of its
[BOS][image tokens] prefix. The oracle is the whole-sequence pass, which runs each sequence's prefix on its
own: the loss and the gradient of every trained parameter must match it at float32 rounding."""

import pytest
import torch
from conftest import error_of, make_tiny_model, random_image

from datasets import DetectionSample, load_split, write_synthetic_coco

from finetune.config import TrainConfig
from finetune.feature_cache import FeatureCache, PrefixCache, StepPrefixes
from finetune.lora import inject_lora_into_model
from finetune.preparation import image_groups
from finetune.supervised import Example, TeacherForcing, make_examples, prefix_source

BOXES = ((0.1, 0.2, 0.3, 0.5), (0.5, 0.1, 0.9, 0.4), (0.42, 0.6, 0.58, 0.95))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, (w, h) in enumerate([(96, 80), (64, 120), (150, 90)]):  # several sizes and aspect ratios
        out.append(folder / f"image{i}.png")
        random_image(w, h, seed=i).save(out[-1])
    return out


def mixed_batch(paths) -> list[Example]:
    """Images with 1, 2 and 4 classes (one of them flipped, so a fourth distinct encoding), negatives,
    point prompts and prompts of different lengths (so the suffixes are padded)."""
    a, b, c = paths
    return [
        Example(a, "circle", "detect", False, BOXES),
        Example(b, "square", "detect", False, BOXES[:2]),
        Example(b, "star", "point", False, BOXES[:1]),
        Example(c, "ring", "detect", True, BOXES[1:]),
        Example(c, "cross", "detect", True, ()),
        Example(c, "a much longer class name", "point", True, BOXES),
        Example(c, "hexagon", "detect", True, BOXES[:1]),
        Example(c, "ring", "detect", False, ()),
    ]


def trained_model(parts: str):
    """A tiny random model training `parts`, LoRA adapters with non-zero B (so A gets a gradient) and
    no dropout (the two passes would draw different masks)."""
    model = make_tiny_model(0)
    if "lora" in parts:
        inject_lora_into_model(model, rank=4, alpha=8.0, dropout=0.0)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
        if (name.startswith("region.") or "lora_" in name or ("text" in parts and name.startswith("text.blocks."))
                or ("vision" in parts and name.startswith("vision."))):
            p.requires_grad_(True)
    return model


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss, weight, parts = loss_fn(batch)
    (loss * weight).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), weight, parts, grads


@pytest.mark.parametrize("parts", ["lora", "text", "lora+vision"])
def test_a_shared_prefix_gives_the_loss_and_gradients_of_whole_sequences(paths, tmp_path, parts):
    model = trained_model(parts)
    features = FeatureCache(model, "off" if "vision" in parts else "memory", tmp_path)
    batch = mixed_batch(paths)
    whole = loss_and_grads(model, TeacherForcing(model, features), batch)

    runs = []
    prefix_kv = model.prefix_kv
    model.prefix_kv = lambda embeds: runs.append(1) or prefix_kv(embeds)
    shared = loss_and_grads(model, TeacherForcing(model, features, StepPrefixes(model, features)), batch)
    assert len(runs) == 4  # a, b, c flipped, c: once each for the 8 sequences

    assert torch.allclose(whole[0], shared[0], rtol=1e-5, atol=1e-6), (whole[0], shared[0])
    assert whole[1] == shared[1]  # the same actions
    assert whole[2] == pytest.approx(shared[2], rel=1e-4, abs=1e-6)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert whole[3].keys() == shared[3].keys() == trained
    for name, g in whole[3].items():
        scale = g.abs().max().item()
        assert scale > 0, name  # every trained part is reached, the prefix's too
        assert (g - shared[3][name]).abs().max().item() <= 1e-4 * scale + 1e-9, name


def test_a_batch_of_distinct_images_runs_whole_sequences(paths, tmp_path):
    """Nothing to share: the prefix K/V copies a shared pass makes would only cost memory."""
    model = trained_model("lora")
    features = FeatureCache(model, "memory", tmp_path)
    loss_fn = TeacherForcing(model, features, StepPrefixes(model, features))
    distinct = [Example(p, "circle", "detect", False, BOXES[:1]) for p in paths]
    assert all(isinstance(v, torch.Tensor) for v in loss_fn.encode(distinct).values())
    repeated = distinct + [Example(paths[0], "square", "detect", False, ())]
    assert all(not isinstance(v, torch.Tensor) for v in loss_fn.encode(repeated).values())


def test_each_run_encodes_prefixes_the_cheapest_valid_way(tmp_path):
    model = trained_model("lora")
    features = FeatureCache(model, "memory", tmp_path)
    config = TrainConfig(model="tiny", output_dir=str(tmp_path))
    assert isinstance(prefix_source(model, features, config, prefix_cache_mb=0), StepPrefixes)
    # A frozen prefix (region head only) is cached across steps when the trainer gives it memory.
    model.requires_grad_(False)
    model.region.requires_grad_(True)
    assert isinstance(prefix_source(model, features, config, prefix_cache_mb=64), PrefixCache)
    assert isinstance(prefix_source(model, features, config, prefix_cache_mb=0), StepPrefixes)
    # FSDP: every rank runs the decoder equally often, whatever its batch's images.
    fsdp = TrainConfig(model="tiny", output_dir=str(tmp_path), fsdp=True)
    assert prefix_source(model, features, fsdp, prefix_cache_mb=64) is None


# ---- batches built for sharing ---------------------------------------------------------------------
def image_runs(samples) -> list[tuple[str, int]]:
    """(image, length) of each maximal run of consecutive samples of one image."""
    runs: list[tuple[str, int]] = []
    for s in samples:
        if runs and runs[-1][0] == s.image_path:
            runs[-1] = (s.image_path, runs[-1][1] + 1)
        else:
            runs.append((s.image_path, 1))
    return runs


def samples_of(classes_per_image: dict[str, int]) -> list[DetectionSample]:
    return [DetectionSample(image, i, f"class {c}", ()) for i, (image, n) in enumerate(classes_per_image.items())
            for c in range(n)]


def test_classes_per_group_cuts_each_images_classes_into_runs_of_at_most_that_many():
    samples = samples_of({"a": 5, "b": 2, "c": 1, "d": 12})
    together = image_groups(samples, seed=3)
    assert sorted(together, key=str) == sorted(samples, key=str)
    assert sorted(n for _, n in image_runs(together)) == [1, 2, 5, 12]  # one run per image
    assert image_groups(samples, seed=3, classes_per_group=0) == together  # 0: today's order, unchanged

    cut = image_groups(samples, seed=3, classes_per_group=4)
    assert sorted(cut, key=str) == sorted(samples, key=str)
    lengths = {}
    for image, n in image_runs(cut):  # runs of one image may meet after the shuffle: never longer than 2 x 4
        lengths.setdefault(image, []).append(n)
    assert all(n <= 8 for ns in lengths.values() for n in ns)
    assert sum(lengths["d"]) == 12 and sum(lengths["a"]) == 5
    assert image_groups(samples, seed=3, classes_per_group=4) == cut  # reproducible

    single = image_groups(samples, seed=3, classes_per_group=1)
    assert single != together and sorted(single, key=str) == sorted(samples, key=str)
    assert len(image_runs(single)) > 4  # the images' classes are spread out


def test_the_flag_reaches_the_trainers_batches(tmp_path):
    root = write_synthetic_coco(tmp_path / "shapes", n_train=6, n_valid=1, n_test=1, seed=0, image_size=64)
    split = load_split(root, "train")
    grouped = make_examples(split, 1.0, seed=0)
    spread = make_examples(split, 1.0, seed=0, classes_per_group=1)
    assert sorted(map(repr, grouped)) == sorted(map(repr, spread))
    assert len(image_runs(grouped)) == len({e.image_path for e in grouped})
    assert len(image_runs(spread)) > len(image_runs(grouped))
    assert "classes_per_image_batch" in error_of(TrainConfig, model="tiny", classes_per_image_batch=-1)
