"""The one sequence builder: teacher-forced detect/point sequences and the log-probs of their actions.

A sequence is exactly what `detect()` runs through the decoder:

    [BOS][image tokens] prompt… | x1 y1 s1 | x2 y2 s2 | …

where each object slot holds the region-encoder embedding inference would feed back (the decoded bin
value, cast to the inference dtype). Each action is read where inference reads it: x from the slot
before it (the last prompt token or the previous size), y from the x slot, the size from the y slot,
and the "another object?" decision from the last prompt token and from every size slot. Points drop
the size slot and decide at the y slot. The decision at the last prompt token is marked: Moondream 3
reads it over the whole vocabulary and the later ones over two tokens (`decision_logprobs`).

Given an image's prefix K/V (`EncodedImage`) instead of its features, the builder makes only the part
after [BOS][image tokens] and scoring attends to the given prefix: the same numbers, without running
the 730 prefix tokens on every step while nothing before the prompt is trained.

`action_logprobs` scores every action of a batch in one causal forward pass. Supervised training
minimises their negative mean (cross-entropy on bins and on the stop decision); GRPO uses the same
numbers for sampled actions, so training and inference can never disagree about positions or bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moondream2.decoding import EncodedImage
from moondream2.region import bin_to_coord, bin_to_size, coord_to_bin, size_to_bin

X, Y, W, H, DECISION = range(5)
ACTION_NAMES = ("x", "y", "w", "h", "stop")
# What a prompt asks for (`model.prompt_tokens(task, name)`); "both" trains and evaluates each of the two.
TASKS = {"detect": ("detect",), "point": ("point",), "both": ("detect", "point")}


@dataclass
class RegionTarget:
    """One prompt and the objects that should follow it, as bins; `stopped` = the list ends with a stop.

    `stopped` is False only for sampled rollouts cut off by max_objects (no final decision was taken).
    """

    prompt_ids: list[int]
    x_bins: torch.Tensor  # (N,) long
    y_bins: torch.Tensor  # (N,)
    size_bins: torch.Tensor | None  # (N, 2) for boxes, None for points
    stopped: bool = True

    @property
    def n_objects(self) -> int:
        return int(self.x_bins.shape[0])


def boxes_to_target(prompt_ids: list[int], boxes, region, with_size: bool = True) -> RegionTarget:
    """Normalised (x_min, y_min, x_max, y_max) boxes -> centre and size bins (points: centres only)."""
    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    size = torch.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=-1)
    return RegionTarget(
        prompt_ids=list(prompt_ids),
        x_bins=coord_to_bin(cx, region.coord_bins),
        y_bins=coord_to_bin(cy, region.coord_bins),
        size_bins=size_to_bin(size, region.size_bins) if with_size else None,
    )


def points_to_target(prompt_ids: list[int], points, region) -> RegionTarget:
    p = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    return RegionTarget(list(prompt_ids), coord_to_bin(p[:, 0], region.coord_bins),
                        coord_to_bin(p[:, 1], region.coord_bins), None)


@dataclass
class ActionBatch:
    """Padded input embeddings plus, for every action, where to read it and what was chosen."""

    embeds: torch.Tensor  # (B, T, dim)
    read_at: torch.Tensor  # (K,) flat index b * T + t of the hidden state that predicts the action
    kind: torch.Tensor  # (K,) X, Y, W, H or DECISION
    choice: torch.Tensor  # (K,) bin index, or 1 = continue / 0 = stop for decisions
    sequence: torch.Tensor  # (K,) which sequence the action belongs to
    after_prompt: torch.Tensor  # (K,) bool: a decision read at the last prompt token
    prefix: EncodedImage | None = None  # each sequence's image prefix K/V; embeds then start after it


def _object_embeddings(model, target: RegionTarget, feed_dtype: torch.dtype) -> torch.Tensor:
    """(slots_per_object * N, dim) embeddings that inference feeds back for these bins."""
    region = model.region

    def fed(values: torch.Tensor) -> torch.Tensor:
        return values.to(feed_dtype).float()

    device = region.coord_features.device
    xs = fed(bin_to_coord(target.x_bins.to(device), region.coord_bins)).unsqueeze(-1)
    ys = fed(bin_to_coord(target.y_bins.to(device), region.coord_bins)).unsqueeze(-1)
    slots = [region.encode_coordinate(xs), region.encode_coordinate(ys)]
    if target.size_bins is not None:
        slots.append(region.encode_size(fed(bin_to_size(target.size_bins.to(device), region.size_bins))))
    return torch.stack(slots, dim=1).reshape(-1, slots[0].shape[-1])


def build_action_batch(
    model, image_embeds: list[torch.Tensor] | list[EncodedImage], targets: list[RegionTarget],
    feed_dtype: torch.dtype | None = None,
) -> ActionBatch:
    """image_embeds[b]: (n_patches, dim) for sequence b (the same tensor may serve several sequences),
    or, for all sequences, the `EncodedImage` of each one's prefix (then only the suffix is built).

    feed_dtype: the dtype inference runs in; decoded values are rounded through it before being
    re-encoded, exactly as `detect()` does (bfloat16 on CUDA). Defaults to the region head's dtype.
    """
    feed_dtype = feed_dtype or model.region.coord_features.dtype
    cached = isinstance(image_embeds[0], EncodedImage)
    prompt_at = 0 if cached else model.config.prefix_len  # index in embeds of the first prompt token
    sequences, reads, prompt_ends = [], [], []
    for b, (image, target) in enumerate(zip(image_embeds, targets)):
        like = image.k[0] if cached else image
        prompt = torch.tensor(target.prompt_ids, device=like.device)
        parts = [] if cached else [model.prefix_embeddings(image)]
        parts.append(model.text.embed(prompt).to(like.dtype))
        n, slots = target.n_objects, 2 if target.size_bins is None else 3
        if n:
            parts.append(_object_embeddings(model, target, feed_dtype).to(like.dtype))
        sequences.append(torch.cat(parts))

        first_slot = prompt_at + len(target.prompt_ids)
        prompt_ends.append(first_slot - 1)
        # The state that starts object i: the last prompt token, then the last slot of object i-1.
        starts = [first_slot - 1] + [first_slot + slots * i + slots - 1 for i in range(n)]
        for i in range(n):
            reads.append((b, starts[i], X, target.x_bins[i]))
            reads.append((b, first_slot + slots * i, Y, target.y_bins[i]))
            if target.size_bins is not None:
                reads.append((b, first_slot + slots * i + 1, W, target.size_bins[i, 0]))
                reads.append((b, first_slot + slots * i + 1, H, target.size_bins[i, 1]))
            reads.append((b, starts[i], DECISION, 1))
        if target.stopped:
            reads.append((b, starts[n], DECISION, 0))

    embeds = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    device, length = embeds.device, embeds.shape[1]
    seq, pos, kind, choice = (torch.tensor([int(r[i]) for r in reads], device=device) for i in range(4))
    after_prompt = (kind == DECISION) & (pos == torch.tensor(prompt_ends, device=device)[seq])
    prefix = None
    if cached:
        layers = range(len(image_embeds[0].k))
        prefix = EncodedImage(k=[torch.cat([image.k[i] for image in image_embeds]) for i in layers],
                              v=[torch.cat([image.v[i] for image in image_embeds]) for i in layers])
    return ActionBatch(embeds=embeds, read_at=seq * length + pos, kind=kind, choice=choice, sequence=seq,
                       after_prompt=after_prompt, prefix=prefix)


def action_logprobs(model, batch: ActionBatch, temperature: float = 1.0, decision_tokens: bool = False,
                    bin_sigma: float = 0.0, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) log-probability of every action under the model, from one causal forward pass.

    The distributions are softmax(logits / temperature), the ones sampling draws from; the stop
    decision is the model's binary continue/stop probability (the policy GRPO samples), or with
    `decision_tokens` the probability of the end-of-text / coordinate token (the supervised target,
    see `MoondreamModel.decision_token_logprobs`).

    `bin_sigma` > 0 scores a coordinate or size action by the expected log-probability under a
    Gaussian over bins centred on the chosen one (std `bin_sigma` bins): a soft target that also
    rewards near misses, which a model trained from scratch needs to find positions at all.

    `hidden`: the batch's (B * T, dim) hidden states when the caller already ran the forward pass.
    """
    if hidden is None:
        hidden = model.hidden_states(batch.embeds, batch.prefix).flatten(0, 1)
    region = model.region
    out = torch.zeros(batch.kind.shape[0], device=hidden.device, dtype=torch.float32)

    def gather(logits: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        if bin_sigma > 0:
            return (soft_bin_targets(choice, logp.shape[-1], bin_sigma) * logp).sum(-1)
        return logp.gather(-1, choice.unsqueeze(-1)).squeeze(-1)

    coord = (batch.kind == X) | (batch.kind == Y)
    if coord.any():
        out[coord] = gather(region.decode_coordinate(hidden[batch.read_at[coord]]), batch.choice[coord])
    size = (batch.kind == W) | (batch.kind == H)
    if size.any():
        size_logits = region.decode_size(hidden[batch.read_at[size]])  # (k, 2, bins)
        row = (batch.kind[size] == H).long()
        out[size] = gather(size_logits[torch.arange(row.shape[0], device=row.device), row], batch.choice[size])
    decision = batch.kind == DECISION
    if decision.any():
        lm_logits = model.text.logits(hidden[batch.read_at[decision]])
        after_prompt = batch.after_prompt[decision]
        if decision_tokens:
            logp_stop, logp_continue = model.decision_token_logprobs(lm_logits, after_prompt)
        else:
            logp_stop, logp_continue, _ = model.decision_logprobs(lm_logits, temperature, after_prompt)
        out[decision] = torch.where(batch.choice[decision] == 1, logp_continue, logp_stop)
    return out


def soft_bin_targets(choice: torch.Tensor, n_bins: int, sigma: float) -> torch.Tensor:
    """(K, n_bins) Gaussian weights around each chosen bin, summing to 1 (truncated at the ends)."""
    bins = torch.arange(n_bins, device=choice.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((bins[None, :] - choice[:, None].float()) / sigma) ** 2)
    return weights / weights.sum(-1, keepdim=True)


def supervised_loss(model, batch: ActionBatch, bin_sigma: float = 0.0, hidden: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over every action of the batch, plus the mean per action kind for logs.

    `bin_sigma`: soft coordinate and size targets (see `action_logprobs`); 0 is the exact bin.
    `hidden`: as in `action_logprobs`.
    """
    logp = action_logprobs(model, batch, decision_tokens=True, bin_sigma=bin_sigma, hidden=hidden)
    parts = {
        name: float(-logp[batch.kind == k].detach().mean()) for k, name in enumerate(ACTION_NAMES) if (batch.kind == k).any()
    }
    return -logp.mean(), parts
