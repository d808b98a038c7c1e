"""Pretrain the shipped base model (`--model=tiny-shapes`) from scratch on the synthetic shapes world.

Everything trains (vision encoder, text decoder, region head) from a random init, with soft
coordinate/size targets, on generated images of five shapes in six colours (`PRETRAIN_WORLD`; the
shapes and colours held out of it are what the quick start fine-tunes on). The result is written in
float16 with a model card holding the command, time, seed and held-out test metrics.

    python pretrain_base.py      # about 50 minutes on a 2-core CPU
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.synthetic import PRETRAIN_WORLD, write_synthetic_coco
from finetune.checkpoint import atomic_write, load_trained_weights
from finetune.cli import run_cli
from finetune.evaluation import evaluate_split, format_metrics_table
from finetune.setup import RANDOM_INIT, SHIPPED_WEIGHTS, build_model
from finetune.supervised import train_supervised
from finetune.training import TrainConfig, load_data
from moondream2.errors import UserInputError
from safetensors.torch import save_file


@dataclass
class PretrainConfig(TrainConfig):
    model: str = "tiny-shapes"
    weights: str | None = RANDOM_INIT
    dataset: str = ""  # default: generated under output_dir
    output_dir: str = "runs/pretrain"
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 16
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    use_lora: bool = False
    train_text: bool | None = True
    train_vision: bool = True
    negatives_per_positive: float = 0.25
    max_objects: int = 20
    eval_interval: int = 250
    eval_limit: int | None = 48
    num_pictures: int = 8
    bin_sigma: float = 6.0
    baseline_eval: bool = False  # a random init finds nothing, slowly
    n_train: int = 8000
    n_valid: int = 48
    n_test: int = 200
    out: str = str(SHIPPED_WEIGHTS["tiny-shapes"])

    FLAG_HELP = {
        **TrainConfig.FLAG_HELP,
        "n_train": "generated training images (pretraining shapes and colours only)",
        "n_valid": "generated validation images (model selection)",
        "n_test": "generated held-out test images (the model card's numbers)",
        "out": "where the float16 base model goes; its card is written beside it (.json and .md)",
    }

    def __post_init__(self):
        super().__post_init__()
        if min(self.n_train, self.n_valid, self.n_test) < 1:
            raise UserInputError("--n_train, --n_valid and --n_test must be at least 1")


def generate_data(config: PretrainConfig) -> Path:
    """The pretraining dataset under output_dir, written once (the JSON of each split comes last)."""
    root = Path(config.output_dir) / "shapes-pretrain"
    if not (root / "test" / "_annotations.coco.json").is_file():
        write_synthetic_coco(root, config.n_train, config.n_valid, config.n_test, seed=config.seed, world=PRETRAIN_WORLD)
    return root


def export_base(config: PretrainConfig, trained_path: str) -> dict[str, torch.Tensor]:
    """The whole model (random init + trained tensors) in float16, as one strict-loadable state dict."""
    model = build_model(config.model, RANDOM_INIT, config.tokenizer, "cpu", config.seed)
    for p in model.parameters():
        p.requires_grad_(True)  # every tensor has a place for the trained ones
    load_trained_weights(model, trained_path)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(config.out, lambda tmp: save_file(state, tmp, metadata={"format": "moondream-base/1",
                                                                           "preset": config.model}))
    return state


def main(config: PretrainConfig) -> dict:
    start = time.time()
    if not config.dataset:
        config.dataset = str(generate_data(config))
    summary = train_supervised(config, "pretrain", task="detect")
    export_base(config, summary["best_path"] or summary["final_path"])
    minutes = (time.time() - start) / 60

    # The card's numbers come from the exported float16 file, as users load it.
    model = build_model(config.model, config.out, config.tokenizer, config.device, config.seed)
    test = evaluate_split(model, load_data(config).test, max_objects=config.max_objects, desc="test (shipped)")
    card = {
        "command": "python pretrain_base.py " + " ".join(_flags(config)),
        "minutes": round(minutes, 1),
        "threads": torch.get_num_threads(),
        "seed": config.seed,
        "world": "PRETRAIN_WORLD (datasets/synthetic.py)",
        "train_images": config.n_train,
        "test_images": config.n_test,
        "trained_weights": summary["best_path"] or summary["final_path"],
        "test": {k: test.metrics[k] for k in ("f1", "precision", "recall", "map", "map50", "count_error")},
    }
    out = Path(config.out)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2)))
    print(format_metrics_table({"test (shipped fp16)": test.metrics}))
    print(f"base model: {out} ({minutes:.1f} min)")
    return card


def _flags(config: PretrainConfig) -> list[str]:
    """The flags that differ from the defaults, so the card's command reproduces this run."""
    default = PretrainConfig()
    return [f"--{k}={v}" for k, v in vars(config).items() if k != "dataset" and getattr(default, k) != v]


if __name__ == "__main__":
    run_cli(PretrainConfig, main, __doc__.split("\n\n")[0])
