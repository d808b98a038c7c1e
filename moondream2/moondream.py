"""The Moondream model: vision encoder + text decoder + region head, with the inference API."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .config import MoondreamConfig
from .decoding import EncodedImage, generate_text, run_region_loop, trace_to_objects
from .errors import UserInputError
from .image_crops import normalize_crops, overlap_crop_image
from .region import RegionHead
from .text import KVCache, TextDecoder, attention_mask
from .tokenizer import load_tokenizer
from .vision import VisionEncoder
from .weights import to_module_layout

DETECT_SETTINGS = {"max_objects", "temperature"}
QUERY_SETTINGS = {"max_tokens", "temperature", "top_p"}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class MoondreamModel(nn.Module):
    def __init__(self, config: MoondreamConfig | None = None, setup_caches: bool = True, tokenizer=None):
        """`setup_caches` is accepted for compatibility with the original API and does nothing:
        KV caches are allocated per call, sized to that call's sequences, and never saved."""
        super().__init__()
        self.config = config if config is not None else MoondreamConfig()
        self.vision = VisionEncoder(self.config.vision)
        self.text = TextDecoder(self.config.text)
        self.region = RegionHead(self.config.region)
        self._tokenizer = tokenizer

    # ---- weights -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts every published key layout (see `weights.py`); strict loads stay strict.

        Moondream 3 revisions differ by an optional region LayerNorm; the head grows one when the
        checkpoint has it, so either revision loads into the same preset.
        """
        state = to_module_layout(dict(state_dict))
        if "region.ln.weight" in state and not self.config.region.use_layernorm:
            self.region.add_layernorm()
        return super().load_state_dict(state, strict=strict, assign=assign)

    @property
    def tokenizer(self):
        """Loaded on first use, so building a real-size model works offline until it has to talk."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer.source)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.text.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.wte.dtype

    # ---- pieces the trainers reuse ------------------------------------------------------------
    def image_embeddings(self, image: Image.Image) -> torch.Tensor:
        """(n_patches, dim) image tokens: crops -> vision encoder -> projection."""
        crops = overlap_crop_image(image, self.config.vision)
        pixels = normalize_crops(crops.crops, self.device, self.vision.patch_emb.weight.dtype)
        return self.vision(pixels, crops.tiling)

    def prefix_embeddings(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(..., prefix_len, dim): BOS followed by the image tokens."""
        bos = self.text.embed(torch.tensor([self.config.tokenizer.bos_id], device=image_embeds.device))
        bos = bos.to(image_embeds.dtype).expand(*image_embeds.shape[:-2], 1, -1)
        return torch.cat([bos, image_embeds], dim=-2)

    def hidden_states(self, embeds: torch.Tensor, prefix: EncodedImage | None = None) -> torch.Tensor:
        """Whole-sequence forward (B, T, dim) at positions 0..T-1 without a cache: the training path.

        Numerically the same computation as prefill + step-by-step decoding. With `prefix` (the image
        prefix K/V of each sequence, batch dim B), `embeds` is what follows the prefix, at positions
        prefix_len.. and attending to it: while nothing before the prompt is trained, the prefix can
        be computed once per image and each step runs only the prompt and objects.
        """
        b, t = embeds.shape[:2]
        if prefix is None:
            positions = torch.arange(t, device=embeds.device).expand(b, -1)
            return self.text(embeds, positions, attention_mask(positions, t, self.config.prefix_len))
        start = self.config.prefix_len
        positions = start + torch.arange(t, device=embeds.device).expand(b, -1)
        cache = KVCache(self.config.text, b, start + t, embeds.device, prefix.k[0].dtype, differentiable=True)
        for layer in range(self.config.text.n_layers):
            cache.k[layer][:, :, :start] = prefix.k[layer]
            cache.v[layer][:, :, :start] = prefix.v[layer]
        return self.text(embeds, positions, attention_mask(positions, start + t, start), cache)

    def prompt_tokens(self, task: str, argument: str) -> list[int]:
        """Template prefix + tokens of " argument" + suffix (the leading space is part of the format)."""
        template = self.config.tokenizer.templates[task]
        return template["prefix"] + self.tokenizer.encode(" " + argument).ids + template["suffix"]

    def decision_logprobs(
        self, lm_logits: torch.Tensor, temperature: float = 1.0, after_prompt: torch.Tensor | bool = False
    ):
        """(log P(stop), log P(continue), greedy stop) of the "another object?" decision.

        Moondream 2 stops when the full-vocabulary argmax is end-of-text. Moondream 3 does the same
        right after the prompt (`after_prompt`: "is there any object?") and chooses only between
        end-of-text and the coordinate token after each object, as the original does. Either way
        the decision is binary: continue is any token but end-of-text. The original never samples
        it; sampled, every decision is this coin at `temperature`, so GRPO can learn all of them.
        """
        tok = self.config.tokenizer
        logits = lm_logits.float() / (temperature if temperature > 0 else 1.0)
        full = F.log_softmax(logits, dim=-1)
        pair = F.log_softmax(logits[..., [tok.eos_id, tok.coord_id]], dim=-1)
        restricted = self._restricted(after_prompt, logits.device)
        logp_stop = torch.where(restricted, pair[..., 0], full[..., tok.eos_id])
        greedy_stop = torch.where(restricted, pair[..., 0] >= pair[..., 1], full.argmax(-1) == tok.eos_id)
        return logp_stop, torch.log(-torch.expm1(logp_stop)), greedy_stop

    def decision_token_logprobs(
        self, lm_logits: torch.Tensor, after_prompt: torch.Tensor | bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P(end-of-text), log P(coordinate token)) over the tokens the decision reads: the
        supervised targets of "stop" and "continue".

        Where the greedy loop stops on a full-vocabulary argmax of end-of-text (Moondream 2, and
        Moondream 3 right after the prompt), teaching "continue" as 1 - P(stop) could leave
        end-of-text the argmax of a model that means to continue; the coordinate token as the
        "continue" label cannot. Where Moondream 3 reads only the two tokens, this equals
        `decision_logprobs`.
        """
        tokens = [self.config.tokenizer.eos_id, self.config.tokenizer.coord_id]
        logits = lm_logits.float()
        full = F.log_softmax(logits, dim=-1)[..., tokens]
        restricted = self._restricted(after_prompt, logits.device).unsqueeze(-1)
        return torch.where(restricted, F.log_softmax(logits[..., tokens], dim=-1), full).unbind(-1)

    def _restricted(self, after_prompt: torch.Tensor | bool, device: torch.device) -> torch.Tensor:
        """Which decisions read only end-of-text and the coordinate token: Moondream 3's after an object."""
        return torch.as_tensor(after_prompt, device=device).logical_not() & self.config.restrict_stop_decision

    def decide_stop(self, lm_logits, temperature: float = 0.0, generator=None, after_prompt: bool = False):
        """Greedy or sampled stop decision, with the log-prob of the decision taken."""
        logp_stop, logp_continue, greedy_stop = self.decision_logprobs(lm_logits, temperature, after_prompt)
        if temperature > 0:
            stop = torch.bernoulli(logp_stop.exp(), generator=generator).bool()
        else:
            stop = greedy_stop
        return stop, torch.where(stop, logp_stop, logp_continue)

    # ---- inference API ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: Image.Image | EncodedImage | torch.Tensor) -> EncodedImage:
        """Run the image prefix once; the result can be reused for any number of prompts.

        Also accepts precomputed `image_embeddings(image)` (what trainers cache while vision is frozen).
        """
        if isinstance(image, EncodedImage):
            return image
        if isinstance(image, torch.Tensor):
            embeds = image
        elif isinstance(image, Image.Image):
            embeds = self.image_embeddings(image)
        else:
            raise UserInputError(f"expected a PIL image, got {type(image).__name__}; open it with PIL.Image.open")
        return self.prefix_kv(embeds)

    def prefix_kv(self, image_embeds: torch.Tensor) -> EncodedImage:
        """[BOS][image tokens] through the decoder: its K/V per layer. Differentiable (training replays
        many sequences against one image's prefix); `encode_image` is the inference entry point."""
        embeds = self.prefix_embeddings(image_embeds.to(self.device, self.dtype)).unsqueeze(0)
        prefix = self.config.prefix_len
        cache = KVCache(self.config.text, 1, prefix, self.device, embeds.dtype)
        positions = torch.arange(prefix, device=self.device).unsqueeze(0)
        self.text(embeds, positions, attention_mask(positions, prefix, prefix), cache)
        return EncodedImage(k=cache.k, v=cache.v)

    def detect(self, image, object: str, settings: dict | None = None) -> dict:
        """{"objects": [{"x_min", "y_min", "x_max", "y_max", "score"}]} in 0..1 image coordinates."""
        settings = _check_settings(settings, DETECT_SETTINGS)
        return {"objects": self.detect_batch([(image, object)], settings)[0]}

    def point(self, image, object: str, settings: dict | None = None) -> dict:
        """{"points": [{"x", "y", "score"}]} in 0..1 image coordinates."""
        settings = _check_settings(settings, DETECT_SETTINGS)
        return {"points": self.detect_batch([(image, object)], settings, task="point")[0]}

    @torch.no_grad()
    def detect_batch(self, requests: Sequence[tuple], settings: dict | None = None, task: str = "detect"):
        """Detect (or point) for many (image, object) pairs at once, decoding them as one batch.

        Each distinct image is encoded once, so several classes of one image share the encoding.
        Greedy results equal calling `detect` one pair at a time.
        """
        settings = _check_settings(settings, DETECT_SETTINGS)
        encoded: dict[int, EncodedImage] = {}
        images = []
        for image, _ in requests:
            if id(image) not in encoded:
                encoded[id(image)] = self.encode_image(image)
            images.append(encoded[id(image)])
        prompts = [self.prompt_tokens(task, obj) for _, obj in requests]
        trace = run_region_loop(
            self,
            images,
            prompts,
            max_objects=int(settings.get("max_objects", self.config.max_objects)),
            with_size=task == "detect",
            temperature=float(settings.get("temperature", 0.0)),
        )
        return trace_to_objects(trace, self.region, with_size=task == "detect")

    @torch.no_grad()
    def query(self, image, question: str, settings: dict | None = None) -> dict:
        """{"answer": str}; greedy unless settings["temperature"] > 0 (then top-p sampling)."""
        settings = _check_settings(settings, QUERY_SETTINGS)
        tok = self.config.tokenizer
        template = tok.templates["query"]
        prompt = template["prefix"] + self.tokenizer.encode(question).ids + template["suffix"]
        if self.config.repeat_answer_marker:  # Moondream 2's prompt ends …3, 3; kept for fidelity
            prompt = prompt + [tok.answer_id]
        return {"answer": self._generate(image, prompt, settings)}

    @torch.no_grad()
    def caption(self, image, length: str = "normal", settings: dict | None = None) -> dict:
        """{"caption": str} from the original model's caption prompt of that length (short, normal,
        long); greedy unless settings["temperature"] > 0, like `query`."""
        settings = _check_settings(settings, QUERY_SETTINGS)
        templates = self.config.tokenizer.templates["caption"]
        if length not in templates:
            raise UserInputError(f"caption length {length!r}: use one of {', '.join(templates)}")
        return {"caption": self._generate(image, list(templates[length]), settings)}

    def _generate(self, image, prompt: list[int], settings: dict) -> str:
        """Text decoded after `prompt` on the image: what `query` and `caption` share."""
        tokens = generate_text(
            self,
            self.encode_image(image),
            prompt,
            max_tokens=int(settings.get("max_tokens", 128)),
            temperature=float(settings.get("temperature", 0.0)),
            top_p=float(settings.get("top_p", self.config.top_p)),
        )
        return self.tokenizer.decode(tokens)


def _check_settings(settings: dict | None, allowed: set[str]) -> dict:
    settings = dict(settings or {})
    unknown = set(settings) - allowed
    if unknown:
        raise UserInputError(f"unknown settings {sorted(unknown)}; supported: {sorted(allowed)}")
    return settings
