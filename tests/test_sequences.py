"""The one-pass teacher-forced objective equals the step-by-step decode path, loss and gradient."""

import math

import pytest
import torch

from finetune.sequences import (
    DECISION,
    RegionTarget,
    action_logprobs,
    boxes_to_target,
    build_action_batch,
    soft_bin_targets,
    supervised_loss,
)
from moondream2 import MoondreamConfig, MoondreamModel
from moondream2.decoding import EncodedImage, Generation, pick, run_region_loop
from moondream2.region import bin_to_coord, bin_to_size
from moondream2.text import KVCache, attention_mask

BOXES = [(0.1, 0.2, 0.3, 0.5), (0.5, 0.1, 0.9, 0.4), (0.42, 0.6, 0.58, 0.95)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MoondreamModel(MoondreamConfig.preset("tiny"))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.nn.init.normal_(m.region.coord_features, std=2.0)
    torch.nn.init.normal_(m.region.size_features, std=2.0)
    return m


def image_embeds(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.config.vision.n_patches, model.config.text.dim, generator=g) * 0.5


def stepwise_logprobs(model, embeds: torch.Tensor, target: RegionTarget) -> torch.Tensor:
    """Teacher-forced decoding through the real KV-cache path, one token at a time, with autograd."""
    region, prefix = model.region, model.config.prefix_len
    cache = KVCache(model.config.text, 1, prefix, embeds.device, embeds.dtype, differentiable=True)
    positions = torch.arange(prefix).unsqueeze(0)
    model.text(model.prefix_embeddings(embeds).unsqueeze(0), positions, attention_mask(positions, prefix, prefix), cache)
    gen = Generation(model, [EncodedImage(cache.k, cache.v)], [target.prompt_ids], 3 * target.n_objects,
                     differentiable=True)

    def logp(logits, choice):
        return torch.log_softmax(logits, -1)[..., choice].squeeze(0)

    out = []
    for i in range(target.n_objects):
        out.append(-model.decision_token_logprobs(gen.logits())[1].squeeze(0))
        x, y = target.x_bins[i], target.y_bins[i]
        out.append(-logp(region.decode_coordinate(gen.hidden), x))
        gen.feed(region.encode_coordinate(bin_to_coord(x, region.coord_bins).view(1, 1)))
        out.append(-logp(region.decode_coordinate(gen.hidden), y))
        gen.feed(region.encode_coordinate(bin_to_coord(y, region.coord_bins).view(1, 1)))
        size_logits = region.decode_size(gen.hidden)[0]
        out.append(-logp(size_logits[0], target.size_bins[i, 0]))
        out.append(-logp(size_logits[1], target.size_bins[i, 1]))
        gen.feed(region.encode_size(bin_to_size(target.size_bins[i], region.size_bins).view(1, 2)))
    out.append(-model.decision_token_logprobs(gen.logits())[0].squeeze(0))
    return torch.stack(out)


def test_one_pass_loss_and_gradient_equal_stepwise_decode(model):
    embeds = image_embeds(model)
    target = boxes_to_target(model.prompt_tokens("detect", "box"), BOXES, model.region)

    model.zero_grad()
    loss, _ = supervised_loss(model, build_action_batch(model, [embeds], [target]))
    loss.backward()
    one_pass = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    reference = stepwise_logprobs(model, embeds, target).mean()
    reference.backward()
    stepwise = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert torch.allclose(loss, reference, atol=1e-5), (loss.item(), reference.item())
    assert one_pass.keys() == stepwise.keys()
    assert any("text.blocks.0.attn.qkv" in n for n in one_pass)  # gradient reaches early keys/values
    for name in one_pass:
        assert torch.allclose(one_pass[name], stepwise[name], rtol=1e-3, atol=1e-6), name


def test_empty_target_trains_only_the_stop_decision(model):
    target = boxes_to_target(model.prompt_tokens("detect", "box"), [], model.region)
    batch = build_action_batch(model, [image_embeds(model)], [target])
    assert batch.kind.tolist() == [DECISION] and batch.choice.tolist() == [0]


def test_padded_batch_equals_sequences_scored_alone(model):
    embeds = image_embeds(model)
    targets = [
        boxes_to_target(model.prompt_tokens("detect", "a"), BOXES[:1], model.region),
        boxes_to_target(model.prompt_tokens("detect", "longer class name"), BOXES, model.region),
        boxes_to_target(model.prompt_tokens("detect", "c"), [], model.region),
    ]
    with torch.no_grad():
        together = action_logprobs(model, build_action_batch(model, [embeds] * 3, targets))
        alone = torch.cat([action_logprobs(model, build_action_batch(model, [embeds], [t])) for t in targets])
    assert torch.allclose(together, alone, atol=1e-5)


def test_replayed_logprobs_equal_sampled_logprobs(model):
    """What GRPO needs: the log-prob recorded while sampling equals the teacher-forced replay."""
    from PIL import Image

    image = Image.new("RGB", (64, 48), (200, 30, 30))
    prompt = model.prompt_tokens("detect", "box")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        trace = run_region_loop(model, [model.encode_image(image)] * 4, [prompt] * 4, max_objects=6,
                                temperature=1.0, generator=gen)
        embeds = model.image_embeddings(image)
        targets = [
            RegionTarget(prompt, trace.x_bins[b, :n], trace.y_bins[b, :n], trace.size_bins[b, :n], stopped=n < 6)
            for b, n in enumerate(trace.n_objects.tolist())
        ]
        batch = build_action_batch(model, [embeds] * 4, targets)
        replay = torch.zeros(4).index_add_(0, batch.sequence, action_logprobs(model, batch, temperature=1.0))
    recorded = torch.stack([trace.logprobs[b, :n].sum() for b, n in enumerate(trace.n_objects.tolist())])
    recorded = recorded + trace.stop_logprob
    assert len(set(trace.n_objects.tolist())) > 1 or trace.n_objects.sum() > 0
    assert torch.allclose(recorded, replay, atol=1e-4), (recorded, replay)


def test_pick_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0]])
    index, logp = pick(logits, 0.0)
    assert index.item() == 1 and torch.isclose(logp, torch.log_softmax(logits, -1)[0, 1])


def test_soft_bin_targets_are_a_normalised_gaussian_around_the_chosen_bin():
    weights = soft_bin_targets(torch.tensor([1, 0]), n_bins=3, sigma=1.0)
    e = math.exp(-0.5)  # one bin away, one sigma
    expected = torch.tensor([[e, 1.0, e], [1.0, e, math.exp(-2.0)]])
    assert torch.allclose(weights, expected / expected.sum(-1, keepdim=True))


def test_bin_sigma_scores_coordinates_by_the_expected_logprob_of_nearby_bins(model):
    embeds = image_embeds(model)
    target = boxes_to_target(model.prompt_tokens("detect", "box"), BOXES[:1], model.region)
    batch = build_action_batch(model, [embeds], [target])
    with torch.no_grad():
        exact = action_logprobs(model, batch, decision_tokens=True)
        soft = action_logprobs(model, batch, decision_tokens=True, bin_sigma=2.0)
        hidden = model.hidden_states(batch.embeds).flatten(0, 1)
        x_read = batch.read_at[0]  # the first action is the first object's x
        logp = torch.log_softmax(model.region.decode_coordinate(hidden[x_read]), -1)
    bins = torch.arange(logp.shape[-1], dtype=torch.float32)
    gauss = torch.exp(-0.5 * ((bins - float(batch.choice[0])) / 2.0) ** 2)
    assert torch.allclose(soft[0], (gauss / gauss.sum() * logp).sum(), atol=1e-5)
    decisions = batch.kind == DECISION  # the stop decision is not a bin: unchanged
    assert torch.equal(soft[decisions], exact[decisions])
    assert not torch.allclose(soft[~decisions], exact[~decisions])
