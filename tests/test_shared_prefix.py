"""One prefix per image per step (`StepPrefixes`): every class of an image attends to a single run of its
[BOS][image tokens] prefix. The oracle is the whole-sequence pass, which runs each sequence's prefix on its
own: the loss and the gradient of every trained parameter must match it at float32 rounding."""

import pytest
import torch
from conftest import make_tiny_model, random_image

from finetune.config import TrainConfig
from finetune.feature_cache import FeatureCache, PrefixCache, StepPrefixes
from finetune.lora import inject_lora_into_model
from finetune.supervised import Example, TeacherForcing, prefix_source

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
