"""What a run trains, and on what: the model with exactly the chosen parts trainable, and the data splits.

`prepare_model(config)` is the base model (`finetune.base_model`) with LoRA adapters injected and the
parts the flags name made trainable in float32, everything else frozen. `load_data(config)` is the
dataset's train, validation and test splits (`Splits`); `image_groups` orders an epoch's samples so a
batch shares image encodings; `check_prompts_fit` refuses class names whose prompts leave no room to
answer before anything runs.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets import DetectionSample, DetectionSplit, has_split, load_split, write_synthetic_coco
from datasets.splits import ROBOFLOW_JSON
from datasets.synthetic import RINGS_WORLD
from finetune import distributed
from finetune.base_model import PROJECT_ROOT, build_model
from finetune.checkpoint import load_trained_weights
from finetune.config import CommonConfig, TrainConfig
from finetune.lora import inject_lora_into_model, target_choices
from moondream2.errors import UserInputError


def seed_everything(seed: int) -> None:
    """Seed the global generators that adapter init, dropout, shuffling and sampling draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- model -----------------------------------------------------------------------------------------
# What --train_text trains: the blocks and the output head that makes the stop decision (on a
# random-init model a frozen head caps P(end-of-text) near 0.1%, so "stop" could never be learned).
TEXT_TRAINED = ("text.blocks.", "text.post_ln.", "text.lm_head.")


def prepare_model(config: TrainConfig):
    """Base model + LoRA, with exactly the chosen parts trainable, in float32."""
    seed_everything(config.seed)  # adapter init draws from the global generator
    model = build_model(config.model, config.weights, config.tokenizer, config.device, config.seed)
    if config.use_lora:
        _check_lora_targets(model, config)
        inject_lora_into_model(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                               config.expert_adapters)
    model.text.gradient_checkpointing = config.grad_checkpointing
    model.requires_grad_(False)
    train_text = not config.use_lora if config.train_text is None else config.train_text
    for name, p in model.named_parameters():
        router = ".mlp.router." in name
        trained = (
            ("lora_" in name)
            or (config.train_region and name.startswith("region."))
            or (config.train_vision and name.startswith("vision."))
            or (train_text and name.startswith(TEXT_TRAINED) and not router)
            or (config.train_router and router)
        )
        if trained:
            p.data = p.data.float()  # AdamW steps float32 weights, never bfloat16 ones
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserInputError("nothing to train: enable --use_lora, --train_region or --train_vision")
    if config.init_lora:
        load_trained_weights(model, config.init_lora)
    return model


def _check_lora_targets(model, config: TrainConfig) -> None:
    """Every --lora_targets name must match a layer: a typo would otherwise quietly train nothing there."""
    choices = target_choices(model, config.expert_adapters)
    unknown = [t for t in config.lora_targets if t not in choices]
    if unknown:
        raise UserInputError(f"--lora_targets={list(config.lora_targets)}: {unknown[0]!r} matches no layer of the "
                             f"text blocks; choose from {', '.join(choices)}")


def describe_trainable(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"training {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"


# ---- data ------------------------------------------------------------------------------------------
@dataclass
class Splits:
    """A dataset's splits as a run uses them: validation picks the best checkpoint, test is the report."""

    train: DetectionSplit
    val: DetectionSplit | None
    test: DetectionSplit | None


SYNTHETIC = "synthetic"


def dataset_path(config: CommonConfig) -> Path:
    """The dataset directory or JSON; `--dataset=synthetic` generates, once, into `datasets/`,
    rings in any colour, a shape the shipped base never saw (`RINGS_WORLD`, fixed seed): the quick
    start's fine-tuning task. A relative path that is not under the working directory is
    looked up in the project, so the bundled default works from anywhere."""
    if config.dataset != SYNTHETIC:
        path = Path(config.dataset)
        bundled = PROJECT_ROOT / path
        return bundled if not path.is_absolute() and not path.exists() and bundled.exists() else path
    path = PROJECT_ROOT / "datasets" / "synthetic-rings"
    with distributed.main_first():
        if not (path / "test" / ROBOFLOW_JSON).is_file():  # written last: the dataset is complete
            write_synthetic_coco(path, n_train=200, n_valid=16, n_test=48, seed=0, world=RINGS_WORLD)
    return path


def load_data(config: TrainConfig) -> Splits:
    """Train, plus validation and test when the dataset has them, with one line saying which.

    A split that is there but does not load is an error, not a skip: without validation there is no
    baseline and no best checkpoint, without test no report, and a run should not lose them quietly.
    """
    root = dataset_path(config)

    def split(name: str) -> DetectionSplit | None:
        if name != "train" and not has_split(root, name):
            return None
        return load_split(root, name, list(config.classes) if config.classes else None, config.rename,
                          config.skip_bad_images)

    data = Splits(train=split("train"), val=split("valid"), test=split("test"))
    if config.overfit_batch_size:
        data = overfit_subset(data, config.overfit_batch_size)
    if distributed.process().is_main:
        tqdm.write("splits: " + "; ".join(_describe_split(name, s, lost) for name, s, lost in (
            ("train", data.train, ""), ("valid", data.val, "no baseline, no best checkpoint"),
            ("test", data.test, "no test report"))))
    return data


def overfit_subset(data: Splits, n: int) -> Splits:
    """The first `n` training images as both training and validation split: a model that cannot fit
    a handful of images it is scored on has a broken setup, which this shows in minutes."""
    subset = dataclasses.replace(data.train, images=data.train.images[:n])
    if distributed.process().is_main:
        tqdm.write(f"overfit check: training and validating on the first {len(subset.images)} training images")
    return Splits(train=subset, val=subset, test=data.test)


def _describe_split(name: str, split: DetectionSplit | None, lost: str) -> str:
    return f"{name} {len(split.images)} images" if split else f"{name} not found ({lost})"


def check_prompts_fit(model, splits: list[DetectionSplit | None], max_objects: int) -> None:
    """A class name whose prompt leaves no room for --max_objects objects in the context would stop
    the run at its first evaluation; say so before anything runs, with the limit."""
    text, steps = model.config.text, {"detect": 3, "point": 2}  # decoded tokens per object
    if model.config.prefix_len + steps["detect"] * max_objects >= text.max_context:
        fits = (text.max_context - model.config.prefix_len - 1) // steps["detect"]
        raise UserInputError(f"--max_objects={max_objects}: the context of {text.max_context} tokens fits at most {fits}")
    for split in filter(None, splits):
        for name in split.class_names:
            for task, per_object in steps.items():
                room = text.max_context - model.config.prefix_len - per_object * max_objects
                n = len(model.prompt_tokens(task, name))
                if n > room:
                    shown = name if len(name) <= 40 else name[:40] + "..."
                    raise UserInputError(
                        f"{split.source}: class name {shown!r} has a {task} prompt of {n} tokens; with "
                        f"--max_objects={max_objects} the context of {text.max_context} leaves room for {room}: "
                        "shorten it with --rename or lower --max_objects")


def image_groups(samples: list[DetectionSample], seed: int, classes_per_group: int = 0) -> list[DetectionSample]:
    """Shuffle by image, keeping each image's classes together so a batch shares image encodings.

    `classes_per_group` > 0 cuts each image's classes into runs of at most that many and shuffles the
    runs: 1 gives batches of distinct images (most variety, no sharing), 0 keeps all of an image's
    classes in one run (the most sharing: one prefix per image per step).
    """
    groups: dict[str, list[DetectionSample]] = {}
    for s in samples:
        groups.setdefault(str(s.image_path), []).append(s)
    rng = random.Random(seed)
    order = list(groups.values())
    rng.shuffle(order)
    for g in order:
        rng.shuffle(g)
    if classes_per_group:
        order = [g[i : i + classes_per_group] for g in order for i in range(0, len(g), classes_per_group)]
        rng.shuffle(order)
    return [s for g in order for s in g]
