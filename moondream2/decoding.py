"""Batched generation: the detect/point region loop and plain text answers.

Many sequences (several classes of one image, several images) decode in lockstep. Prompts are
right-padded; sequence b writes its k-th generated token at position `prompt_end[b] + k`, so padding
slots are overwritten before any real token could attend to them, and the mask hides them until then.
The KV cache holds exactly the longest sequence of the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .region import bin_to_coord, bin_to_size
from .text import KVCache, attention_mask


@dataclass
class EncodedImage:
    """KV cache of the image prefix (BOS + image tokens), reusable across prompts."""

    k: list[torch.Tensor]  # per block: (1, kv_heads, prefix_len, head_dim)
    v: list[torch.Tensor]


@dataclass
class RegionTrace:
    """Everything the region loop chose, per sequence (B) and object slot (N); for scoring and RL."""

    n_objects: torch.Tensor  # (B,) objects emitted before the stop decision
    x_bins: torch.Tensor  # (B, N)
    y_bins: torch.Tensor
    size_bins: torch.Tensor  # (B, N, 2); unused for points
    logprobs: torch.Tensor  # (B, N, 4 or 3): log-prob of x, y, (w+h), and "continue" before the object
    stop_logprob: torch.Tensor  # (B,) log-prob of the final "stop" (0 when max_objects cut it off)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # only with record_logits=True


def pick(logits: torch.Tensor, temperature: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax (temperature 0) or a sample from softmax(logits / T); returns (index, its log-prob).

    The log-prob is that of the distribution actually sampled from (T = 1 when greedy, which makes it
    the model's own confidence).
    """
    logp = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
    if temperature > 0:
        flat = logp.reshape(-1, logp.shape[-1]).exp()
        index = torch.multinomial(flat, 1, generator=generator).view(logp.shape[:-1])
    else:
        index = logp.argmax(dim=-1)
    return index, logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)


class Generation:
    """A batch of sequences sharing one KV cache, stepping one token at a time in lockstep."""

    def __init__(
        self, model, images: list[EncodedImage], prompts: list[list[int]], max_new_tokens: int,
        differentiable: bool = False,
    ):
        text, config = model.text, model.config
        self.model = model
        prefix, longest = config.prefix_len, max(len(p) for p in prompts)
        capacity = prefix + longest + max_new_tokens
        if capacity > config.text.max_context:
            raise ValueError(
                f"sequence of {capacity} tokens exceeds the model's context of {config.text.max_context}; "
                "lower max_objects / max_tokens or shorten the prompt"
            )
        device, dtype = images[0].k[0].device, images[0].k[0].dtype
        self.cache = KVCache(config.text, len(prompts), capacity, device, dtype, differentiable)
        for layer in range(config.text.n_layers):
            self.cache.k[layer][:, :, :prefix] = torch.cat([image.k[layer] for image in images])
            self.cache.v[layer][:, :, :prefix] = torch.cat([image.v[layer] for image in images])

        ids = torch.full((len(prompts), longest), config.tokenizer.eos_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, : len(prompt)] = torch.tensor(prompt)
        ids = ids.to(device)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        positions = prefix + torch.arange(longest, device=device).expand(len(prompts), -1)
        self.kv_len = prefix + longest
        hidden = text(text.embed(ids), positions, attention_mask(positions, self.kv_len, prefix), self.cache)
        self.hidden = hidden[torch.arange(len(prompts), device=device), lengths - 1]
        self.next_pos = prefix + lengths

    def logits(self) -> torch.Tensor:
        return self.model.text.logits(self.hidden)

    def feed(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed one embedding per sequence (B, dim); returns and keeps the new hidden states."""
        text, prefix = self.model.text, self.model.config.prefix_len
        self.kv_len += 1
        positions = self.next_pos.unsqueeze(1)
        mask = attention_mask(positions, self.kv_len, prefix)
        self.hidden = text(embeds.unsqueeze(1), positions, mask, self.cache)[:, 0]
        self.next_pos = self.next_pos + 1
        return self.hidden


def run_region_loop(
    model,
    images: list[EncodedImage],
    prompts: list[list[int]],
    max_objects: int,
    with_size: bool = True,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    record_logits: bool = False,
) -> RegionTrace:
    """The detect (x, y, size per object) or point (x, y) loop of Moondream, for a batch of prompts."""
    region = model.region
    steps_per_object = 3 if with_size else 2
    gen = Generation(model, images, prompts, steps_per_object * max_objects)
    batch, device = len(prompts), gen.hidden.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    n_objects = torch.zeros(batch, dtype=torch.long, device=device)
    stop_logprob = torch.zeros(batch, device=device)
    x_bins, y_bins, size_bins, logprobs = [], [], [], []
    recorded: dict[str, list[torch.Tensor]] = {"lm": [], "x": [], "y": [], "size": []}
    lm_logits = gen.logits()
    if record_logits:
        recorded["prompt_lm"] = [lm_logits]
        recorded["prompt_hidden"] = [gen.hidden]

    def emb_dtype(t: torch.Tensor) -> torch.Tensor:
        return t.to(region.coord_features.dtype)

    for i in range(max_objects):
        stop, logp_decision = model.decide_stop(lm_logits, temperature, generator, after_prompt=i == 0)
        stop_logprob = torch.where(active & stop, logp_decision, stop_logprob)
        active = active & ~stop
        if not bool(active.any()):
            break
        n_objects += active.long()

        x_logits = region.decode_coordinate(gen.hidden)
        x_bin, logp_x = pick(x_logits, temperature, generator)
        gen.feed(region.encode_coordinate(emb_dtype(bin_to_coord(x_bin, region.coord_bins)).unsqueeze(-1)))
        y_logits = region.decode_coordinate(gen.hidden)
        y_bin, logp_y = pick(y_logits, temperature, generator)
        gen.feed(region.encode_coordinate(emb_dtype(bin_to_coord(y_bin, region.coord_bins)).unsqueeze(-1)))
        step_logps = [logp_x, logp_y]
        if with_size:
            size_logits = region.decode_size(gen.hidden)
            wh_bin, logp_wh = pick(size_logits, temperature, generator)
            gen.feed(region.encode_size(emb_dtype(bin_to_size(wh_bin, region.size_bins))))
            size_bins.append(wh_bin)
            step_logps.append(logp_wh.sum(-1))
        lm_logits = gen.logits()
        x_bins.append(x_bin)
        y_bins.append(y_bin)
        logprobs.append(torch.stack(step_logps + [logp_decision], dim=-1))
        if record_logits:
            recorded["x"].append(x_logits)
            recorded["y"].append(y_logits)
            recorded["lm"].append(lm_logits)
            if with_size:
                recorded["size"].append(size_logits)

    def stack(items: list[torch.Tensor], *trailing: int, dtype=torch.long) -> torch.Tensor:
        if items:
            return torch.stack(items, dim=1)
        return torch.zeros(batch, 0, *trailing, dtype=dtype, device=device)

    return RegionTrace(
        n_objects=n_objects,
        x_bins=stack(x_bins),
        y_bins=stack(y_bins),
        size_bins=stack(size_bins, 2) if with_size else stack([], 2),
        logprobs=stack(logprobs, steps_per_object + 1, dtype=torch.float32),
        stop_logprob=stop_logprob,
        logits={k: torch.stack(v, dim=1) for k, v in recorded.items() if v} if record_logits else {},
    )


def trace_to_objects(trace: RegionTrace, region, with_size: bool = True) -> list[list[dict]]:
    """Per sequence, the emitted boxes (x_min..y_max) or points (x, y) with a confidence score.

    The score is P(continue) for that object times the geometric mean of its coordinate/size
    probabilities: how sure the model was that an object is there, and where.
    """
    results = []
    n_bins, n_size = region.coord_bins, region.size_bins
    for b in range(trace.x_bins.shape[0]):
        n = int(trace.n_objects[b])
        xs = bin_to_coord(trace.x_bins[b, :n], n_bins).tolist()
        ys = bin_to_coord(trace.y_bins[b, :n], n_bins).tolist()
        lp = trace.logprobs[b, :n].double()
        location = lp[:, :-1].sum(-1) / (4 if with_size else 2)
        scores = (lp[:, -1] + location).exp().tolist()
        objects = []
        if with_size:
            sizes = bin_to_size(trace.size_bins[b, :n], n_size).tolist()
            for x, y, (w, h), s in zip(xs, ys, sizes, scores):
                objects.append(
                    {"x_min": x - w / 2, "y_min": y - h / 2, "x_max": x + w / 2, "y_max": y + h / 2, "score": s}
                )
        else:
            objects = [{"x": x, "y": y, "score": s} for x, y, s in zip(xs, ys, scores)]
        results.append(objects)
    return results


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def generate_text(
    model, image: EncodedImage, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Answer tokens after `prompt` until end of text or `max_tokens` (the answer marker is banned)."""
    tok = model.config.tokenizer
    gen = Generation(model, [image], [prompt], max_tokens)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = gen.logits()[0].float()
        logits[tok.answer_id] = -math.inf
        if temperature > 0:
            probs = top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())
        if token == tok.eos_id:
            break
        out.append(token)
        gen.feed(model.text.embed(torch.tensor([token], device=logits.device)))
    return out
