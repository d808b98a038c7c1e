"""What every trainer shares: flags, model preparation, data, the optimisation loop and its bookkeeping.

A trainer script supplies only what is its own (an epoch's items, and how a batch of them becomes a
loss, or how GRPO makes one); `Trainer` does the rest the same way for all: batching (sharded over
processes under torchrun, see `finetune.distributed`), AdamW over float32 trainable parameters, bf16
autocast on CUDA, warm-up + cosine schedule, gradient accumulation (the step's gradient is the mean
over every unit of its window, a final partial step), clipping, periodic evaluation with best/final
checkpoints, JSON-lines logs, atomic resumable state, and a Ctrl-C that saves before exiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from tqdm import tqdm

from datasets import DetectionSample, DetectionSplit, has_split, load_image, load_split, write_synthetic_coco
from datasets.splits import ROBOFLOW_JSON
from datasets.synthetic import NEW_SHAPES_WORLD
from finetune import distributed
from finetune.checkpoint import (
    RESUME_FORMAT,
    atomic_write,
    full_state_dict,
    load_resume_state,
    load_trained_weights,
    rng_state,
    save_resume_state,
    save_weights,
    set_rng_state,
    torch_save,
    trained_state_dict,
)
from finetune.evaluation import evaluate_split, format_metrics_table, save_comparisons, save_pictures
from finetune.lora import inject_lora_into_model, target_choices
from finetune.plot import plot_log
from finetune.runlog import RunLog
from finetune.setup import PROJECT_ROOT, build_model, seed_everything
from finetune.validation import check_field_types, check_output_dir, require
from moondream2.decoding import EncodedImage
from moondream2.errors import DiskFull, UserInputError


@dataclass
class CommonConfig:
    """Flags every script shares, with the same names and defaults everywhere."""

    model: str = "md2"  # the released weights, as in the original scripts; tiny presets are opt-in
    weights: str | None = None
    tokenizer: str | None = None
    dataset: str = "datasets/chess-pieces"  # or "synthetic"
    device: str | None = None
    output_dir: str = "."
    seed: int = 0

    def __post_init__(self):
        check_field_types(self)


@dataclass
class TrainConfig(CommonConfig):
    """Flags of the supervised and RL trainers."""

    max_steps: int | None = None
    eval_interval: int = 50
    wandb: bool = False
    resume: str | None = None
    lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 4
    grad_accum_steps: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    use_lora: bool = True
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.1
    lora_targets: tuple = ("qkv", "proj", "fc1", "fc2")
    train_region: bool = True
    train_vision: bool = False
    train_text: bool | None = None
    train_router: bool = False
    expert_adapters: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    classes: tuple | None = None
    rename: dict | None = None
    negatives_per_positive: float = 0.5
    skip_bad_images: bool = False
    max_objects: int = 50
    eval_limit: int | None = None
    eval_batch_size: int = 16
    num_pictures: int = 8
    feature_cache: str = "memory"
    init_lora: str | None = None
    bin_sigma: float = 0.0
    baseline_eval: bool = True
    overfit_batch_size: int | None = None
    md_version: str | None = None
    constant_lr: bool = False
    wandb_project: str | None = None
    run_name: str | None = None
    early_stopping_patience: int | None = None

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

    FLAG_HELP = {
        "lr": "peak learning rate (AdamW), reached after warm-up, then cosine decay to 10%",
        "epochs": "passes over the training samples",
        "batch_size": "(image, class) sequences per forward pass, padded together",
        "grad_accum_steps": "forward passes per optimizer step (loss divided by the window)",
        "warmup_ratio": "share of the optimizer steps over which the learning rate rises linearly to --lr",
        "weight_decay": "AdamW weight decay of the trained parameters",
        "max_grad_norm": "clip the gradient's global norm to this before each optimizer step",
        "lora_rank": "rank r of each adapter pair (A: in x r, B: r x out)",
        "lora_alpha": "adapter scale numerator: a layer adds (alpha / r) x dropout(x) A B",
        "lora_dropout": "dropout on the adapters' input while training (off at evaluation)",
        "skip_bad_images": "skip unreadable images (with a warning) instead of stopping",
        "eval_batch_size": "classes decoded together per image at evaluation",
        "use_lora": "train LoRA adapters on the text blocks (False: train the chosen parts in full)",
        "train_region": "train the region head (coordinate/size encoders and decoders)",
        "train_vision": "train the vision encoder too (disables the image feature cache)",
        "train_text": "train the text blocks and output head in full (default: only when --use_lora=False)",
        "train_router": "Moondream 3: train the mixture-of-experts routers too (frozen otherwise, even with --train_text)",
        "expert_adapters": "Moondream 3: give every expert its own LoRA pair (default: attention and dense MLPs only)",
        "grad_checkpointing": "recompute each text block in backward instead of storing activations (less memory, ~30% slower)",
        "fsdp": "under torchrun: shard weights, gradients and optimizer state (FSDP) instead of copying them (DDP)",
        "classes": "only these class names, e.g. --classes='[white-king,black-king]'",
        "rename": "rename classes in prompts, e.g. --rename='{bb: black bishop}'",
        "negatives_per_positive": "image/class pairs with no objects per pair with objects (teaches 'none')",
        "max_objects": "detection cap at evaluation",
        "eval_limit": "evaluate on at most this many images per split",
        "feature_cache": "memory, disk or off: reuse image features across classes and epochs (frozen vision)",
        "init_lora": "start from this adapter checkpoint (e.g. SFT output before RL)",
        "lora_targets": "Linear layers of the text blocks that get adapters",
        "num_pictures": "validation images drawn with predictions at every evaluation (pictures_TRAINER/step_STEP/), and test images at the end",
        "baseline_eval": "evaluate the starting model on the validation and test splits before training, for the final base-vs-fine-tuned report (off: e.g. a random init, which finds nothing)",
        "bin_sigma": "supervised trainers: spread each coordinate/size target over nearby bins (Gaussian std, in bins); 0 = the exact bin",
        "overfit_batch_size": "train and validate on the first N training images only, to check quickly that a setup can learn",
        "md_version": "the original scripts' model switch: 2 or 3 picks Moondream 2 or 3 of --model (md2/md3, tiny/tiny-md3)",
        "constant_lr": "keep the learning rate at --lr throughout (no warm-up, no decay)",
        "wandb_project": "Weights & Biases project to log to (implies --wandb)",
        "run_name": "Weights & Biases run name (default: the trainer's name)",
        "early_stopping_patience": "stop after this many evaluations in a row without a better validation score; the best checkpoint, final report and test metrics follow as usual",
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


def checkpoint_names(config: TrainConfig, trainer: str) -> tuple[str, str]:
    """(best-name pattern with {step}, final name), as the original scripts named them."""
    kind = "lora_" if config.use_lora else ""
    return (f"moondream_{kind}best_step_{{step}}_{trainer}.safetensors", f"moondream_{kind}finetune_{trainer}.safetensors")


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
class Data:
    train: DetectionSplit
    val: DetectionSplit | None
    test: DetectionSplit | None


SYNTHETIC = "synthetic"




def dataset_path(config: CommonConfig) -> Path:
    """The dataset directory or JSON; `--dataset=synthetic` generates, once, into `datasets/`,
    a shapes dataset of the three shapes the shipped base never saw (hexagon, cross, ring; fixed seed):
    the quick start's fine-tuning task. A relative path that is not under the working directory is
    looked up in the project, so the bundled default works from anywhere."""
    if config.dataset != SYNTHETIC:
        path = Path(config.dataset)
        bundled = PROJECT_ROOT / path
        return bundled if not path.is_absolute() and not path.exists() and bundled.exists() else path
    path = PROJECT_ROOT / "datasets" / "synthetic-new-shapes"
    with distributed.main_first():
        if not (path / "test" / ROBOFLOW_JSON).is_file():  # written last: the dataset is complete
            write_synthetic_coco(path, n_train=200, n_valid=16, n_test=32, seed=0, world=NEW_SHAPES_WORLD)
    return path


def load_data(config: TrainConfig) -> Data:
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

    data = Data(train=split("train"), val=split("valid"), test=split("test"))
    if config.overfit_batch_size:
        data = overfit_subset(data, config.overfit_batch_size)
    if distributed.process().is_main:
        tqdm.write("splits: " + "; ".join(_describe_split(name, s, lost) for name, s, lost in (
            ("train", data.train, ""), ("valid", data.val, "no baseline, no best checkpoint"),
            ("test", data.test, "no test report"))))
    return data


def overfit_subset(data: Data, n: int) -> Data:
    """The first `n` training images as both training and validation split: a model that cannot fit
    a handful of images it is scored on has a broken setup, which this shows in minutes."""
    subset = dataclasses.replace(data.train, images=data.train.images[:n])
    if distributed.process().is_main:
        tqdm.write(f"overfit check: training and validating on the first {len(subset.images)} training images")
    return Data(train=subset, val=subset, test=data.test)


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


def image_groups(samples: list[DetectionSample], seed: int) -> list[DetectionSample]:
    """Shuffle by image, keeping each image's classes together so a batch shares image encodings."""
    groups: dict[str, list[DetectionSample]] = {}
    for s in samples:
        groups.setdefault(str(s.image_path), []).append(s)
    rng = random.Random(seed)
    order = list(groups.values())
    rng.shuffle(order)
    for g in order:
        rng.shuffle(g)
    return [s for g in order for s in g]


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


# ---- the loop --------------------------------------------------------------------------------------
def lr_multiplier(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to `floor`. Step 0 already trains (at 1/warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    items_in_epoch: int = 0  # items of this epoch already folded into an optimizer step (any world size)
    best_metric: float = -math.inf
    best_step: int | None = None
    best_path: str | None = None
    baseline: dict | None = None
    best_metrics: dict | None = None
    evals_without_improvement: int = 0  # for --early_stopping_patience
    extra: dict = field(default_factory=dict)


LossFn = Callable[[Any], tuple[torch.Tensor, float, dict]]


class NonFiniteLoss(UserInputError):
    """The loss or gradient norm became NaN or infinite: the run stopped before the weights took it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, `kill`), handled as Ctrl-C so the run stays resumable."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """Raise `Terminated` on SIGTERM while training; later ones are ignored so the save can finish."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """Optimisation and bookkeeping around a script's epoch of items and its loss function.

    `make_items(epoch)` gives the epoch's items in training order (the same list on every process);
    `loss_fn(batch) -> (mean loss, weight, logs)` gives a batch's mean loss over `weight` units
    (actions, rollouts), so a window of batches on any number of processes is weighted exactly as
    one big batch.
    """

    progress_keys: tuple[str, ...] = ("loss", "lr")  # the train-log entries the progress bar shows

    def __init__(self, config: TrainConfig, name: str, model, data: Data, make_items: Callable[[int], list],
                 loss_fn: LossFn, eval_encode: Callable | None = None, eval_task: str = "detect"):
        self.config, self.name, self.model, self.data = config, name, model, data
        self.make_items = make_items
        self.eval_encode, self.eval_task = eval_encode, eval_task
        check_prompts_fit(model, [data.train, data.val, data.test], config.max_objects)
        self.process = distributed.process()
        self.engine = distributed.wrap(model, loss_fn, shard=config.fsdp)
        if config.fsdp and not self.process.distributed:
            self.say("--fsdp=True shards over the processes of a torchrun launch; with one process it does nothing")
        self.output_dir = Path(config.output_dir)
        self.best_pattern, self.final_name = checkpoint_names(config, name)
        self.resume_path = self.output_dir / f"resume_{name}.pt"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.global_batch = config.batch_size * self.process.world_size
        batches_per_epoch = math.ceil(len(make_items(0)) / self.global_batch)
        total = math.ceil(batches_per_epoch / config.grad_accum_steps) * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        warmup = max(1, round(config.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 1.0 if config.constant_lr else lr_multiplier(s, self.total_steps, warmup)
        )
        self.state = TrainState()
        self.base_pictures: list[Image.Image] = []  # the starting model's test pictures (evaluate_base_on_test)
        self.reporting = False  # set once the final state is saved and the report swaps in the best weights
        # Every random stream as it was before the step in progress (None between steps): Ctrl-C
        # mid-step saves this one, so the resumed step redraws the same dropout masks and samples.
        self.rng_before_step: dict | None = None
        self.stopped_early_with: dict | None = None  # validation metrics of the step --early_stopping_patience stopped at
        if config.early_stopping_patience and data.val is None:
            self.say("--early_stopping_patience needs a validation split to compare; without one every step runs")
        self.log = RunLog(self.output_dir, name, _jsonable(dataclasses.asdict(config)),
                          config.wandb or config.wandb_project is not None, config.wandb_project,
                          enabled=self.process.is_main, run_name=config.run_name)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else contextlib.nullcontext()
        )

    # -- evaluation and checkpoints --
    def evaluate(self, split: DetectionSplit | None, desc: str, n_pictures: int = 0):
        if split is None:
            return None
        cfg = self.config
        with distributed.gathered(self.engine):
            return evaluate_split(self.model, split, cfg.eval_batch_size, cfg.max_objects, cfg.eval_limit,
                                  n_pictures=n_pictures, encode=self.eval_encode, desc=desc, task=self.eval_task,
                                  progress=self.process.is_main)

    def metadata(self, metrics: dict | None) -> dict:
        """What rebuilds the model from the file alone (`load_finetuned`): base, seed of a random init,
        tokenizer and adapter settings; plus what a model card reports: data, flags, validation metrics."""
        cfg = self.config
        lora = getattr(self.model, "lora_settings", None)
        return {
            "format": "moondream-finetune/1",
            "trainer": self.name,
            "model": cfg.model,
            "base_weights": cfg.weights or "default",
            "seed": cfg.seed,
            "tokenizer": cfg.tokenizer,
            "complete": not cfg.use_lora,
            "lora": lora.to_dict() if lora is not None else None,
            "trained": {"lora": cfg.use_lora, "region": cfg.train_region, "vision": cfg.train_vision},
            "step": self.state.step,
            "dataset": cfg.dataset,
            "flags": _jsonable(dataclasses.asdict(cfg)),
            "metrics": {"val": metrics, "baseline": self.state.baseline},
        }

    def save_checkpoint(self, path: Path, metrics: dict | None) -> None:
        """A LoRA run writes its trained tensors; a full fine-tune the whole model, which loads strictly
        into a fresh one as the original scripts' checkpoints did."""
        tensors = None if self.config.use_lora else full_state_dict(self.model)
        save_weights(self.model, path, self.metadata(metrics), tensors)

    def validate_and_checkpoint(self) -> dict | None:
        """Every rank evaluates its shard and gets the same metrics; rank 0 writes the best checkpoint
        (gathered from every rank under FSDP). The first --num_pictures validation images are drawn
        each time, into pictures_TRAINER/step_STEP/, so a user can flip through how predictions change."""
        main = self.process.is_main
        n_pictures = self.config.num_pictures if main else 0
        result = self.evaluate(self.data.val, desc=f"val@{self.state.step}", n_pictures=n_pictures)
        if result is None:
            return None
        metrics = result.metrics
        self.log.write({"event": "eval", "split": "val", "step": self.state.step, **_flat(metrics)})
        if result.pictures:
            names = [r["image"] for r in result.predictions[: len(result.pictures)]]
            saved = save_pictures(result.pictures, names, self.output_dir / f"pictures_{self.name}" / f"step_{self.state.step}")
            self.log.images("val_pictures", saved[:-1], self.state.step)  # without the contact sheet
        if self.state.baseline is None:
            self.state.baseline = metrics
        score = self.score(metrics)
        if self.state.step > 0 and score > self.state.best_metric:
            old = self.state.best_path
            path = self.output_dir / self.best_pattern.format(step=self.state.step)
            self.save_checkpoint(path, metrics)
            if main and old and old != str(path) and Path(old).exists():
                Path(old).unlink()
            self.state.best_metric, self.state.best_step, self.state.best_path = score, self.state.step, str(path)
            self.state.best_metrics = metrics
            self.state.evals_without_improvement = 0
        elif self.state.step == 0:
            self.state.best_metric = score
        else:
            self.state.evals_without_improvement += 1
        shown = " ".join(f"{k} {_fmt(metrics[k])}" for k in ("f1", "map", "point_f1") if k in metrics)
        where = "the baseline" if self.state.best_step is None else f"step {self.state.best_step}"
        self.say(f"step {self.state.step}: val {shown} (best score {self.state.best_metric:.4f} at {where})")
        return metrics

    def score(self, metrics: dict) -> float:
        """Model selection (higher is better): F1, see `_score`."""
        return _score(metrics)

    def say(self, message: str) -> None:
        if self.process.is_main:
            tqdm.write(message)

    def save_resume(self) -> None:
        """Whole trained tensors and optimizer state keyed by name: resumable on any number of processes."""
        trained = trained_state_dict(self.model)
        optimizer = distributed.optimizer_state(self.model, self.optimizer)
        if self.process.is_main:
            save_resume_state(self.resume_path, {
                "format": RESUME_FORMAT,
                "trained": trained,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "state": dataclasses.asdict(self.state),
                "rng": self.rng_before_step or rng_state(),
                "config": _jsonable(dataclasses.asdict(self.config)),
            })
        distributed.barrier()  # nobody reads a checkpoint rank 0 is still writing

    def load_resume(self, path: str) -> None:
        """Continue a run, on any number of processes: the position is counted in items, not batches."""
        saved = load_resume_state(path)
        own = dict(self.model.named_parameters())
        missing = [k for k in saved["trained"] if k not in own or not own[k].requires_grad]
        if missing:
            raise UserInputError(f"--resume={path} trained {missing[0]}, which this run does not train; use the same flags")
        if saved.get("format") != RESUME_FORMAT:
            raise UserInputError(f"--resume={path} was written by an older version of this trainer; start a new run")
        for k, v in saved["trained"].items():
            distributed.copy_whole(own[k], v)
        distributed.load_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # The saved learning rate followed the saved run's length; continue on this run's schedule.
        for group, base, rule in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * rule(self.scheduler.last_epoch)
        self.state = TrainState(**saved["state"])
        set_rng_state(saved["rng"])
        if self.process.distributed:  # rank 0's saved stream, made distinct per rank
            seed_everything(self.config.seed + 1000 * self.state.step + self.process.rank)
        self.say(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})")

    # -- the loop --
    def fit(self) -> dict:
        """Train and report. Ctrl-C or SIGTERM anywhere, or a file that breaks mid-run, saves resumable
        state first; a diverged loss stops without saving, so the last good checkpoint stays the latest."""
        try:
            with _sigterm_interrupts():
                return self._fit()
        except KeyboardInterrupt as stop:
            if self._unsaved_progress():
                self.save_resume()
                self.say(f"interrupted: saved {self.resume_path}; continue with --resume={self.resume_path}")
            else:
                self.say("interrupted: nothing new to save")
            self.log.close()
            raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
        except NonFiniteLoss:
            self.log.write({"event": "diverged", "step": self.state.step})
            self.log.close()
            raise
        except UserInputError as err:
            # Under torchrun the other processes are inside a collective: saving would hang them.
            # A full disk would fail the save too, and the last resume file is still there.
            if isinstance(err, DiskFull) or not self._unsaved_progress() or self.process.distributed:
                raise
            self.save_resume()
            self.log.close()
            raise UserInputError(f"{err}; progress saved: continue with --resume={self.resume_path}") from None

    def _fit(self) -> dict:
        cfg = self.config
        if cfg.resume:
            self.load_resume(cfg.resume)
        else:
            seed_everything(cfg.seed + self.process.rank)
            if cfg.baseline_eval:
                self.validate_and_checkpoint()
                self.evaluate_base_on_test()
        with tqdm(total=self.total_steps, initial=self.state.step, desc=self.name, dynamic_ncols=True,
                  disable=not self.process.is_main) as bar:
            self._loop(bar)
        return self.finish()

    def _unsaved_progress(self) -> bool:
        """Whether a resume file would keep something: a step was taken and the model still holds the
        run's own weights (the final report swaps in the best checkpoint's, after saving the state)."""
        return self.state.step > 0 and not self.reporting

    def _loop(self, bar) -> None:
        """Windows of `grad_accum_steps` global batches; this rank trains on its slice of each."""
        cfg = self.config
        span = self.global_batch * cfg.grad_accum_steps
        self.model.train()
        while self.state.epoch < cfg.epochs and self.state.step < self.total_steps:
            items = self.make_items(self.state.epoch)
            while self.state.items_in_epoch < len(items) and self.state.step < self.total_steps:
                start = self.state.items_in_epoch
                window = items[start : start + span]
                batches = [distributed.shard(window[i : i + self.global_batch], cfg.batch_size)
                           for i in range(0, len(window), self.global_batch)]
                self.rng_before_step = rng_state()
                logs = self._optimizer_step(batches)
                self.state.items_in_epoch = start + len(window)
                self.rng_before_step = None
                bar.update(1)
                bar.set_postfix({k: f"{logs[k]:.2e}" if k == "lr" else f"{logs[k]:.4f}"
                                 for k in self.progress_keys if k in logs})
                self.log.write({"event": "train", "step": self.state.step, "epoch": self.state.epoch, **logs})
                if self.state.step % cfg.eval_interval == 0 and self.state.step < self.total_steps:
                    metrics = self.validate_and_checkpoint()
                    self.save_resume()
                    self.model.train()
                    if self._patience_ran_out():
                        self.stopped_early_with = metrics  # the final validation, already done at this step
                        return
            if self.state.items_in_epoch >= len(items):
                self.state.epoch += 1
                self.state.items_in_epoch = 0

    def _patience_ran_out(self) -> bool:
        """--early_stopping_patience evaluations in a row did not beat the best score: stop training."""
        patience, waited = self.config.early_stopping_patience, self.state.evals_without_improvement
        if patience is None or waited < patience:
            return False
        self.say(f"early stopping at step {self.state.step}: {waited} evaluations without a better validation score "
                 f"(--early_stopping_patience={patience})")
        self.log.write({"event": "early_stop", "step": self.state.step, "patience": patience})
        return True

    def _optimizer_step(self, window: list) -> dict:
        """One optimizer step over this rank's batches of a window (the last window may be shorter).

        Subclasses with another notion of a step (GRPO: sample, then several updates) override this
        and reuse `_accumulate` and `_apply_gradients`.
        """
        totals = self._accumulate([batch or None for batch in window])  # as many passes on every rank
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = self._apply_gradients()
        self.scheduler.step()
        self.state.step += 1
        return {**totals, "lr": lr, "grad_norm": grad_norm}

    def _accumulate(self, batches: list) -> dict[str, float]:
        """Backward of every batch, then gradients = mean over all units of the window on all ranks.

        Each batch's mean loss is backpropagated times its weight (a sum over its units); gradients
        are averaged over ranks (DDP: once, at the last backward, `no_sync` before it) and the sum is
        divided by the total weight. A `None` batch (this rank's share of a short last batch) is a
        zero loss that still joins the collectives.
        Returns the window's mean loss (all ranks) and this rank's weighted mean logs.
        """
        local_weight, local_loss, logs = 0.0, 0.0, {}
        for i, batch in enumerate(batches or [None]):
            last = i == max(len(batches), 1) - 1
            with (contextlib.nullcontext() if last else distributed.no_sync(self.engine)), self.autocast:
                loss, weight, parts = self.engine(batch)
            (loss * weight).backward()  # the dummy batch has weight 0 and zero gradients
            local_weight += weight
            local_loss += float(loss.detach()) * weight
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v * weight
        total_weight, total_loss = distributed.all_reduce_sum([local_weight, local_loss], self.model.device)
        scale = self.process.world_size / total_weight if total_weight > 0 else 0.0  # DDP averaged over ranks
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        mean_logs = {k: v / local_weight for k, v in logs.items()} if local_weight > 0 else {}
        mean_loss = total_loss / total_weight if total_weight > 0 else 0.0
        self._check_finite("loss", mean_loss)
        return {"loss": mean_loss, **mean_logs}

    def _apply_gradients(self) -> float:
        """Clip, step the optimizer, clear the gradients; returns the norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self._check_finite("gradient norm", float(grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def evaluate_base_on_test(self) -> None:
        """Test metrics and pictures of the starting model, so the final report shows base against
        fine-tuned on the same held-out images (pictures side by side; not kept across a resume)."""
        n_pictures = self.config.num_pictures if self.process.is_main else 0
        base = self.evaluate(self.data.test, desc="test (base)", n_pictures=n_pictures)
        if base is not None:
            self.state.extra["base_test"] = base.metrics
            self.base_pictures = base.pictures

    def _check_finite(self, what: str, value: float) -> None:
        """Stop before a non-finite value reaches the weights: one such step turns every weight into NaN."""
        if math.isfinite(value):
            return
        kept = [str(p) for p in (self.state.best_path, self.resume_path) if p and Path(p).is_file()]
        raise NonFiniteLoss(
            f"training diverged: the {what} became {value} at step {self.state.step + 1}; these weights were not "
            f"saved (last good: {', '.join(kept) or 'none'}); lower --lr={self.config.lr} or --max_grad_norm")

    def finish(self) -> dict:
        """Final checkpoint, final validation, test metrics with the best weights, pictures, summary."""
        final_path = self.output_dir / self.final_name
        if self.stopped_early_with is not None:
            final_val = self.stopped_early_with
        else:
            final_val = self.validate_and_checkpoint() if self.state.step > 0 else self.state.baseline
        self.save_checkpoint(final_path, final_val)
        self.save_resume()  # its barrier also means the best checkpoint is on disk for every rank
        self.reporting = True
        if self.state.best_path:
            load_trained_weights(self.model, self.state.best_path)
        n_pictures = self.config.num_pictures if self.process.is_main else 0
        test = self.evaluate(self.data.test, desc="test", n_pictures=n_pictures)
        columns = {}
        if self.state.baseline:
            columns["baseline"] = self.state.baseline
        if self.state.best_metrics:
            columns[f"best@{self.state.best_step}"] = self.state.best_metrics
        if final_val is not None:
            columns["final"] = final_val
        if "base_test" in self.state.extra:
            columns["test(base)"] = self.state.extra["base_test"]
        if test is not None:
            used = f"best@{self.state.best_step}" if self.state.best_path else "final"  # the weights it ran on
            columns[f"test({used})"] = test.metrics
            self.log.write({"event": "eval", "split": "test", "step": self.state.step, **_flat(test.metrics)})
            if self.process.is_main:
                names = [r["image"] for r in test.predictions[: len(test.pictures)]]
                if self.base_pictures and len(self.base_pictures) == len(test.pictures):
                    save_comparisons(self.base_pictures, test.pictures, names, self.output_dir / f"pictures_{self.name}")
                else:
                    save_pictures(test.pictures, names, self.output_dir / f"pictures_{self.name}")
        if self.state.best_path is None:
            self.say("validation never improved on the baseline: no best checkpoint; the final one is saved")
        self.say(format_metrics_table(columns))
        self.say(f"final weights: {final_path}" + (f"\nbest weights: {self.state.best_path}" if self.state.best_path else ""))
        summary = {"final_path": str(final_path), "best_path": self.state.best_path, "metrics": columns}
        self.log.write({"event": "summary", **_flat({"best_step": self.state.best_step, **summary})})
        if self.process.is_main:
            curves = plot_log(self.log.path, self.output_dir / f"curves_{self.name}.png")
            self.log.images("curves", [curves], self.state.step)
            self.say(f"curves: {curves}")
        self.log.close()
        return summary


def _score(metrics: dict) -> float:
    """Model selection: F1 first (the mean of box and point F1 when both are evaluated), mAP to break ties."""
    f1s = [metrics[k] for k in ("f1", "point_f1") if k in metrics]
    m = metrics.get("map")
    return sum(f1s) / len(f1s) + 1e-3 * (m if m is not None and math.isfinite(m) else 0.0)


def _fmt(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()}


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
