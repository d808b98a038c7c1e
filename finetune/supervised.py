"""Teacher-forced supervised fine-tuning, shared by `sft_trainer.py` and `sft_trainer_detect_grad.py`.

A batch is a list of `Example`s: one (image, class, task) with its target objects, after augmentation.
`TeacherForcing` turns it into the mean cross-entropy of every action (`finetune.sequences`), from
cached image features. Each distinct image of a batch runs its [BOS][image tokens] prefix through the
decoder once, and every class asked of it runs only its prompt and object slots, attending to that
prefix's keys/values:
- while nothing before the prompt is trained (vision and text decoder frozen: the region head alone),
  the prefix does not change, so `PrefixCache` keeps it across steps (`sft_trainer.py`);
- with LoRA, the text blocks or the vision tower trained, `StepPrefixes` runs it again each step,
  with gradients, for all of that image's sequences at once: the same loss and gradients as whole
  sequences, for 730 tokens per image instead of per class.
Under FSDP every rank must run the decoder as often as the others, so each step runs whole sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from datasets import Box, DetectionSplit, canonical_order
from finetune import distributed
from finetune.config import TrainConfig
from finetune.feature_cache import FeatureCache, PrefixCache, StepPrefixes, prefix_is_frozen
from finetune.preparation import describe_trainable, image_groups, load_data, prepare_model
from finetune.sequences import TASKS, ActionBatch, boxes_to_target, build_action_batch, supervised_loss
from finetune.trainer import Trainer
from moondream2.decoding import EncodedImage


@dataclass(frozen=True)
class Example:
    """One training sequence: the (possibly mirrored) image, the prompt's class and task, the targets.

    `boxes` are in the coordinates of the image as the model sees it (mirrored when `hflip`), in the
    order the model is taught to emit them. Pointing targets are the box centres: the loaders have
    no keypoints.
    """

    image_path: Path
    class_name: str
    task: str  # "detect" or "point"
    hflip: bool
    boxes: tuple[Box, ...]


def hflip_boxes(boxes: tuple[Box, ...]) -> tuple[Box, ...]:
    """Boxes of the horizontally mirrored image, back in canonical (top-to-bottom, left-to-right) order."""
    return canonical_order((1.0 - x_max, y_min, 1.0 - x_min, y_max) for x_min, y_min, x_max, y_max in boxes)


def make_examples(split: DetectionSplit, negatives_per_positive: float, seed: int, task: str = "detect",
                  hflip_prob: float = 0.0, shuffle_objects: bool = False, classes_per_group: int = 0) -> list[Example]:
    """One epoch of examples, grouped by image (a batch shares image encodings); `seed` fixes everything.

    `task="both"` picks detect or point per example. A flip is decided per image, so all classes of
    an image share one (flipped or not) encoding. `classes_per_group`: see `image_groups`.
    """
    samples = image_groups(split.samples(negatives_per_positive, seed=seed), seed=seed,
                           classes_per_group=classes_per_group)
    rng = random.Random(f"augment-{seed}")  # its own stream: the sample order stays that of image_groups
    flipped: dict[Path, bool] = {}
    examples = []
    for s in samples:
        if s.image_path not in flipped:
            flipped[s.image_path] = hflip_prob > 0 and rng.random() < hflip_prob
        hflip = flipped[s.image_path]
        boxes = hflip_boxes(s.boxes) if hflip else s.boxes
        if shuffle_objects:
            boxes = tuple(rng.sample(boxes, len(boxes)))
        kind = rng.choice(TASKS["both"]) if task == "both" else task
        examples.append(Example(s.image_path, s.class_name, kind, hflip, boxes))
    return examples


class TeacherForcing:
    """`loss_fn` of the supervised trainers: a batch of `Example`s -> (mean loss, number of actions,
    mean loss per action kind). The count lets a window weigh every action alike, whatever the batch."""

    def __init__(self, model, features: FeatureCache, prefixes: PrefixCache | StepPrefixes | None = None,
                 bin_sigma: float = 0.0):
        self.model, self.features, self.prefixes, self.bin_sigma = model, features, prefixes, bin_sigma

    def __call__(self, batch: list[Example]) -> tuple[torch.Tensor, float, dict[str, float]]:
        return self.sequence_loss(self.actions(batch, self.encode(batch)))

    def encode(self, batch: list[Example]) -> dict[tuple[Path, bool], torch.Tensor | EncodedImage]:
        """One encoding per distinct (image, flip) of the batch: its prefix K/V, or its features for
        whole sequences (`prefixes` None, or a step's prefixes that no two sequences would share:
        then a shared prefix saves nothing and its copies of the keys/values cost memory)."""
        distinct = {(e.image_path, e.hflip) for e in batch}
        alone = isinstance(self.prefixes, StepPrefixes) and len(distinct) == len(batch)
        source = self.features if alone or self.prefixes is None else self.prefixes
        images: dict[tuple[Path, bool], torch.Tensor | EncodedImage] = {}
        for e in batch:
            if (e.image_path, e.hflip) not in images:
                images[(e.image_path, e.hflip)] = source(e.image_path, e.hflip)
        return images

    def actions(self, batch: list[Example], images: dict) -> ActionBatch:
        """The teacher-forced sequences of `batch`, its images encoded by `encode`."""
        model = self.model
        targets = [boxes_to_target(model.prompt_tokens(e.task, e.class_name), e.boxes, model.region,
                                   with_size=e.task == "detect") for e in batch]
        return build_action_batch(model, [images[(e.image_path, e.hflip)] for e in batch], targets,
                                  feed_dtype=model.dtype)

    def sequence_loss(self, sequences: ActionBatch, hidden: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, float, dict[str, float]]:
        """`hidden`: the batch's hidden states when a subclass already ran the forward pass."""
        loss, parts = supervised_loss(self.model, sequences, self.bin_sigma, hidden=hidden)
        return loss, float(sequences.kind.numel()), parts


def train_supervised(config: TrainConfig, name: str, task: str = "detect", hflip_prob: float = 0.0,
                     shuffle_objects: bool = False, prefix_cache_mb: float = 0.0,
                     loss_class: Callable[..., TeacherForcing] = TeacherForcing) -> dict:
    """Model, data, caches and `Trainer` for a teacher-forced run; returns `Trainer.fit()`'s summary.

    `prefix_cache_mb` > 0 caches image prefixes across steps when they are frozen (see `PrefixCache`);
    otherwise each step runs each distinct image's prefix once (`StepPrefixes`), except under FSDP.
    `loss_class(model, features, prefixes, bin_sigma)` builds the loss function; a subclass of
    `TeacherForcing` may add terms (pretraining does). It is built before the optimizer, so
    parameters it adds to the model train too.
    """
    model = prepare_model(config)
    data = load_data(config)
    features = FeatureCache.for_run(model, config)
    prefixes = prefix_source(model, features, config, prefix_cache_mb)
    how = {PrefixCache: "cached image prefixes, prompt + objects per step",
           StepPrefixes: "one prefix per image per step, prompt + objects per class",
           type(None): "whole sequences per step"}[type(prefixes)]
    if distributed.process().is_main:
        tqdm.write(f"{describe_trainable(model)}; {how}")

    def make_items(epoch: int) -> list[Example]:
        return make_examples(data.train, config.negatives_per_positive, config.seed + epoch, task, hflip_prob,
                             shuffle_objects, config.classes_per_image_batch)

    eval_encode = prefixes.encoded if isinstance(prefixes, PrefixCache) else features.eval_encode
    loss_fn = loss_class(model, features, prefixes, config.bin_sigma)
    trainer = Trainer(config, name, model, data, make_items, loss_fn, eval_encode=eval_encode, eval_task=task)
    return trainer.fit()


def prefix_source(model, features: FeatureCache, config: TrainConfig, prefix_cache_mb: float
                  ) -> PrefixCache | StepPrefixes | None:
    """How a run encodes its images' prefixes (see the module docstring); None: whole sequences.

    Under FSDP every rank must run the decoder equally often per step, and the number of distinct
    images in a batch differs between ranks.
    """
    if config.fsdp:
        return None
    if prefix_cache_mb > 0 and prefix_is_frozen(model):
        return PrefixCache(model, features, prefix_cache_mb)
    return StepPrefixes(model, features)
