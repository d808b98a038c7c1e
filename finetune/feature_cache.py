"""Image encodings kept across the steps of a run, so a frozen part of the model runs once per image.

Three levels; the first two last across steps, so they are valid only while what produces them is frozen:
- `FeatureCache`: image -> vision features, while the vision tower is frozen (memory or disk);
- `PrefixCache`: image -> the decoder's [BOS][image tokens] keys/values, while nothing before the
  prompt is trained (`prefix_is_frozen`), bounded in memory, least recently used first out;
- `StepPrefixes` and `shared_prefixes`: within one step only, each distinct image's prefix run once
  for all the sequences that share it (with gradients when the decoder trains).
A horizontally flipped image is another image: its encodings are kept under their own key.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from datasets import load_image
from finetune.checkpoint import torch_save
from finetune.files import atomic_write
from finetune.config import TrainConfig
from moondream2.decoding import EncodedImage


class FeatureCache:
    """Image -> vision features (n_patches, dim), computed once while the vision tower is frozen.

    Epochs after the first, and every class of an image, skip the vision encoder. `disk` keeps them
    as files under the output directory instead of in memory, for datasets too large for RAM; a
    file's name hashes the vision weights and settings and the image file's size and time, so a run
    with another model, crop setting or an edited image never reads stale features, and an unreadable
    file (a run killed mid-write before writes were atomic) is recomputed.
    A horizontally flipped image is another image: its features are cached under their own key.
    """

    def __init__(self, model, mode: str, directory: Path):
        self.model, self.mode, self.directory = model, mode, directory
        self.memory: dict[str, torch.Tensor] = {}
        self.fingerprint = vision_fingerprint(model) if mode == "disk" else ""

    @classmethod
    def for_run(cls, model, config: TrainConfig) -> "FeatureCache":
        """The cache a trainer uses: `--feature_cache`, off while the vision tower trains."""
        mode = "off" if config.train_vision else config.feature_cache
        return cls(model, mode, Path(config.output_dir) / "feature_cache")

    @property
    def eval_encode(self) -> Callable | None:
        """The evaluation hook when features are cached (None: evaluation encodes each image)."""
        return None if self.mode == "off" else self.encoded

    def __call__(self, path: Path, hflip: bool = False) -> torch.Tensor:
        key = self.key(path, hflip)
        if self.mode == "off":
            return self.model.image_embeddings(_load(path, hflip))
        if key in self.memory:
            return self.memory[key].to(self.model.device)
        if self.mode == "disk":
            return self._from_disk(path, hflip)
        with torch.no_grad():
            features = self.model.image_embeddings(_load(path, hflip))
        self.memory[key] = features
        return features

    def _from_disk(self, path: Path, hflip: bool) -> torch.Tensor:
        stat = Path(path).stat()
        source = f"{self.fingerprint}|{self.key(path, hflip)}|{stat.st_size}|{stat.st_mtime_ns}"
        file = self.directory / f"{hashlib.sha1(source.encode()).hexdigest()[:16]}_{Path(path).stem[:40]}.pt"
        with contextlib.suppress(Exception):  # missing, truncated or not features: a miss
            return torch.load(file, weights_only=True).to(self.model.device)
        with torch.no_grad():
            features = self.model.image_embeddings(_load(path, hflip))
        cpu = features.cpu()
        atomic_write(file, lambda tmp: torch_save(cpu, tmp))
        return features

    @staticmethod
    def key(path: Path, hflip: bool = False) -> str:
        return f"{path}|hflip" if hflip else str(path)

    def encoded(self, record) -> EncodedImage:
        """Evaluation hook: the image prefix encoded from cached features."""
        return self.model.encode_image(self(record.path))


def vision_fingerprint(model) -> str:
    """A hash of the vision settings, dtype and a strided sample of every vision weight: it tells
    models apart (two checkpoints differ throughout) without hashing gigabytes."""
    digest = hashlib.sha1(repr(model.config.vision).encode())
    for name, p in model.vision.state_dict().items():
        sample = p.detach().flatten()[:: max(1, p.numel() // 4096)].float().cpu()
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _load(path: Path, hflip: bool) -> Image.Image:
    image = load_image(path)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if hflip else image


def prefix_is_frozen(model) -> bool:
    """True when no trained parameter can change the image prefix's keys and values."""
    return not any(p.requires_grad for p in [*model.vision.parameters(), *model.text.parameters()])


class PrefixCache:
    """(image, flip) -> `EncodedImage` (prefix K/V per layer), least recently used first out.

    Only valid while `prefix_is_frozen(model)`. Bounded by `budget_mb`: the real model's prefix is
    ~140 MB per image in bfloat16, so a large dataset keeps the most recent images (image-grouped
    batches still share one encoding per image).
    """

    def __init__(self, model, features: FeatureCache, budget_mb: float):
        text = model.config.text
        per_image = 2 * text.n_layers * text.n_kv_heads * model.config.prefix_len * text.head_dim * model.dtype.itemsize
        self.capacity = max(1, int(budget_mb * 2**20 // per_image))
        self.model, self.features = model, features
        self.entries: OrderedDict[str, EncodedImage] = OrderedDict()

    def __call__(self, path: Path, hflip: bool = False) -> EncodedImage:
        key = FeatureCache.key(path, hflip)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        encoded = self.model.encode_image(self.features(path, hflip))
        self.entries[key] = encoded
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return encoded

    def encoded(self, record) -> EncodedImage:
        """Evaluation hook: the same prefixes serve validation while the decoder is frozen."""
        return self(record.path)


class StepPrefixes:
    """(image, flip) -> its prefix K/V, run now with gradients into whatever trains before the prompt.

    The supervised trainers' encoder when the decoder (or the vision tower) trains: a batch encodes
    each distinct image once (`TeacherForcing.encode`) and all of its classes attend to that one
    prefix, so a step runs 730 + k x (prompt + objects) tokens instead of k x (730 + prompt +
    objects), with the same loss and gradients. Nothing is kept across steps.
    """

    def __init__(self, model, features: FeatureCache):
        self.model, self.features = model, features

    def __call__(self, path: Path, hflip: bool = False) -> EncodedImage:
        return self.model.prefix_kv(self.features(path, hflip))


def shared_prefixes(model, features: Callable[[Path], torch.Tensor], paths: list[Path]) -> list[EncodedImage]:
    """Each path's image prefix K/V, run once per distinct image (with gradients when training): the
    sequences of one image (GRPO: a group's rollouts) share it, so a replay runs only their prompts
    and objects."""
    encode = StepPrefixes(model, features)
    encoded = {path: encode(path) for path in dict.fromkeys(paths)}
    return [encoded[path] for path in paths]
