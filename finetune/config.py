"""The run configuration: the flags every script shares (`CommonConfig`) and those of the trainers
(`TrainConfig`), each field with its default and `--help` line, checked on construction so a bad value
stops a run before anything is built; and `flags_dict`, the flags as a run records them.

A script's own config subclasses one of these; `finetune.cli.run_cli` turns it into a command line.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from finetune.cli import flag
from finetune.validation import check_field_types, check_output_dir, require
from moondream2.errors import UserInputError


@dataclass
class CommonConfig:
    """Flags every script shares, with the same names and defaults everywhere."""

    # the released weights, as in the original scripts; tiny presets are opt-in
    model: str = flag("md2", "md2 (Moondream 2, downloaded on first use), md3, or random-init tiny, tiny-md3, small, "
                             "medium (offline)")
    weights: str | None = flag(None, "base weights, a .safetensors file or folder of shards (md2: "
                                     "moondream2/model.safetensors)")
    tokenizer: str | None = flag(None, "tokenizer.json path or hub id; default: moondream/starmie-v1 for real models, "
                                       "builtin for tiny")
    dataset: str = flag("datasets/chess-pieces", "dataset directory in COCO, YOLO, Pascal VOC, CSV, JSONL or parquet "
                                                 "layout, a COCO JSON, or synthetic")
    device: str | None = flag(None, "cuda, mps or cpu; default: the first available in that order")
    output_dir: str = flag(".", "where checkpoints, logs and pictures go")
    seed: int = flag(0, "random seed for init, shuffling, dropout and sampling")

    def __post_init__(self):
        check_field_types(self)


@dataclass
class TrainConfig(CommonConfig):
    """Flags of the supervised and RL trainers."""

    max_steps: int | None = flag(None, "stop after this many optimizer steps (default: run all epochs)")
    eval_interval: int = flag(50, "evaluate on the validation split every this many optimizer steps")
    wandb: bool = flag(False, "also log to Weights & Biases (needs `pip install wandb` and a login)")
    resume: str | None = flag(None, "resume from a resume_*.pt file written by an earlier run")
    lr: float = flag(1e-5, "peak learning rate (AdamW), reached after warm-up, then cosine decay to 10%")
    epochs: int = flag(5, "passes over the training samples")
    batch_size: int = flag(4, "(image, class) sequences per forward pass, padded together")
    grad_accum_steps: int = flag(1, "forward passes per optimizer step (loss divided by the window)")
    classes_per_image_batch: int = flag(0, "at most this many classes of one image in a row of a batch; 0: all of them "
                                           "(each image's prefix runs once for all its classes in a step: fastest), "
                                           "1: batches of distinct images")
    warmup_ratio: float = flag(0.05, "share of the optimizer steps over which the learning rate rises linearly to --lr")
    weight_decay: float = flag(0.0, "AdamW weight decay of the trained parameters")
    max_grad_norm: float = flag(1.0, "clip the gradient's global norm to this before each optimizer step")
    use_lora: bool = flag(True, "train LoRA adapters on the text blocks (False: train the chosen parts in full)")
    lora_rank: int = flag(32, "rank r of each adapter pair (A: in x r, B: r x out)")
    lora_alpha: float = flag(64.0, "adapter scale numerator: a layer adds (alpha / r) x dropout(x) A B")
    lora_dropout: float = flag(0.1, "dropout on the adapters' input while training (off at evaluation)")
    lora_targets: tuple = flag(("qkv", "proj", "fc1", "fc2"), "Linear layers of the text blocks that get adapters")
    train_region: bool = flag(True, "train the region head (coordinate/size encoders and decoders)")
    train_vision: bool = flag(False, "train the vision encoder too (disables the image feature cache)")
    train_text: bool | None = flag(None, "train the text blocks and output head in full (default: only when "
                                         "--use_lora=False)")
    train_router: bool = flag(False, "Moondream 3: train the mixture-of-experts routers too (frozen otherwise, even "
                                     "with --train_text)")
    expert_adapters: bool = flag(False, "Moondream 3: give every expert its own LoRA pair (default: attention and "
                                        "dense MLPs only)")
    grad_checkpointing: bool = flag(False, "recompute each text block in backward instead of storing activations (less "
                                           "memory, ~30% slower)")
    fsdp: bool = flag(False, "under torchrun: shard weights, gradients and optimizer state (FSDP) instead of copying "
                             "them (DDP)")
    classes: tuple | None = flag(None, "only these class names, e.g. --classes='[white-king,black-king]'")
    rename: dict | None = flag(None, "rename classes in prompts, e.g. --rename='{bb: black bishop}'")
    negatives_per_positive: float = flag(0.5, "image/class pairs with no objects per pair with objects (teaches "
                                              "'none')")
    skip_bad_images: bool = flag(False, "skip unreadable images (with a warning) instead of stopping")
    max_objects: int = flag(50, "detection cap at evaluation")
    eval_limit: int | None = flag(None, "evaluate on at most this many images per split")
    eval_batch_size: int = flag(16, "classes decoded together per image at evaluation")
    num_pictures: int = flag(8, "validation images drawn with predictions at every evaluation "
                                "(pictures_TRAINER/step_STEP/), and test images at the end")
    feature_cache: str = flag("memory", "memory, disk or off: reuse image features across classes and epochs (frozen "
                                        "vision)")
    init_lora: str | None = flag(None, "start from this adapter checkpoint (e.g. SFT output before RL)")
    bin_sigma: float = flag(0.0, "supervised trainers: spread each coordinate/size target over nearby bins (Gaussian "
                                 "std, in bins); 0 = the exact bin")
    baseline_eval: bool = flag(True, "evaluate the starting model on the validation and test splits before training, "
                                     "for the final base-vs-fine-tuned report (off: e.g. a random init, which finds "
                                     "nothing)")
    overfit_batch_size: int | None = flag(None, "train and validate on the first N training images only, to check "
                                                "quickly that a setup can learn")
    md_version: str | None = flag(None, "the original scripts' model switch: 2 or 3 picks Moondream 2 or 3 of --model "
                                        "(md2/md3, tiny/tiny-md3)")
    constant_lr: bool = flag(False, "keep the learning rate at --lr throughout (no warm-up, no decay)")
    schedule_steps: int | None = flag(None, "length of the warm-up + cosine schedule in optimizer steps (default: the "
                                            "run's own length); a longer one stops the run part-way along it")
    wandb_project: str | None = flag(None, "Weights & Biases project to log to (implies --wandb)")
    run_name: str | None = flag(None, "Weights & Biases run name (default: the trainer's name)")
    early_stopping_patience: int | None = flag(None, "stop after this many evaluations in a row without a better "
                                                     "validation score; the best checkpoint, final report and test "
                                                     "metrics follow as usual")

    # The original scripts' names for our flags (see finetune.cli): their command lines keep working.
    FLAG_ALIASES = {
        "learning_rate": "lr",
        "num_epochs": "epochs",
        "validation_samples": "eval_limit",
        "max_plot_samples": "num_pictures",
        "lora_target_modules": "lora_targets",
        "model_path": "weights",
        "dataset_name": "dataset=datasets/{}",
    }

    def __post_init__(self):
        super().__post_init__()
        if self.md_version is not None:
            self.model = model_for_version(self.model, self.md_version)
            print(f"note: --md_version={self.md_version} is --model={self.model} here", file=sys.stderr)
        for name in ("batch_size", "grad_accum_steps", "epochs", "lora_rank", "max_objects", "eval_batch_size"):
            require(self, name, getattr(self, name) >= 1, "use 1 or more")
        require(self, "eval_limit", self.eval_limit is None or self.eval_limit >= 1, "use 1 or more, or leave it unset")
        require(self, "num_pictures", self.num_pictures >= 0, "use 0 or more")
        require(self, "lr", self.lr > 0, "must be positive, e.g. --lr=1e-5")
        require(self, "max_grad_norm", self.max_grad_norm > 0, "must be positive (the clipping threshold)")
        require(self, "lora_alpha", self.lora_alpha > 0, "must be positive")
        require(self, "lora_dropout", 0 <= self.lora_dropout < 1, "use a probability in [0, 1)")
        require(self, "warmup_ratio", 0 <= self.warmup_ratio <= 1, "use a fraction in [0, 1]")
        require(self, "weight_decay", self.weight_decay >= 0, "use 0 or more")
        require(self, "lora_targets", len(self.lora_targets) > 0, "name at least one layer, e.g. --lora_targets='[qkv]'")
        require(self, "feature_cache", self.feature_cache in ("memory", "disk", "off"), "use memory, disk or off")
        require(self, "bin_sigma", self.bin_sigma >= 0, "use 0 (exact bins) or more")
        require(self, "max_steps", self.max_steps is None or self.max_steps >= 1,
                "use 1 or more, or leave it unset to run every epoch")
        require(self, "eval_interval", self.eval_interval >= 1, "use 1 or more (optimizer steps)")
        require(self, "classes_per_image_batch", self.classes_per_image_batch >= 0,
                "use 0 (all of an image's classes together) or 1 or more")
        require(self, "schedule_steps", self.schedule_steps is None or self.schedule_steps >= 1,
                "use 1 or more, or leave it unset to fit the schedule to the run")
        require(self, "early_stopping_patience", self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                "use 1 or more evaluations, or leave it unset to run every step")
        require(self, "overfit_batch_size", self.overfit_batch_size is None or self.overfit_batch_size >= 1,
                "use 1 or more images, or leave it unset to train on the whole split")
        check_output_dir("output_dir", self.output_dir)


# --md_version of the original scripts, applied to --model: each version's counterpart of a preset.
VERSION_MODELS = {"2": {"md3": "md2", "tiny-md3": "tiny"}, "3": {"md2": "md3", "tiny": "tiny-md3"}}


def model_for_version(model: str, version: str) -> str:
    """--model switched to Moondream `version` (md2 -> md3, tiny -> tiny-md3 and back)."""
    if version not in VERSION_MODELS:
        raise UserInputError(f"--md_version={version}: use 2 or 3")
    own = {"2": ("md2", "tiny"), "3": ("md3", "tiny-md3")}[version]
    if model in own:
        return model
    if model not in VERSION_MODELS[version]:
        raise UserInputError(f"--md_version={version}: --model={model} has no Moondream {version} counterpart; "
                             f"use --model={' or --model='.join(own)}")
    return VERSION_MODELS[version][model]


def flags_dict(config: CommonConfig) -> dict:
    """The flags as JSON values (tuples as lists), as logs, checkpoints and resume files record them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
