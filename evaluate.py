"""Evaluate detection on a dataset split: metrics.json, a table, and pictures of what the model finds.

    python evaluate.py --model=md2 --dataset=DIR --split=test [--weights=...] [--lora=FILE] [--out=DIR]
    python evaluate.py --lora=moondream_lora_finetune_detect_grad.safetensors --compare=True

With --compare=True the base model and the fine-tuned one are evaluated on the same images and printed side by side with the difference,
and each picture shows the base predictions left and the fine-tuned ones right.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.checkpoint_eval import evaluate_checkpoint
from finetune.cli import flag, run_cli
from finetune.config import CommonConfig
from finetune.validation import check_output_dir, require


@dataclass
class EvaluateConfig(CommonConfig):
    output_dir: str = flag(".", "where --dataset=synthetic is generated (results go to --out)")
    split: str = flag("test", "which split to evaluate (train, valid/val, test)")
    lora: str | None = flag(None, "fine-tuned checkpoint (adapters and/or region head) saved by a trainer")
    compare: bool = flag(False, "also evaluate the base model and print both with the difference (needs --lora)")
    out: str = flag("eval-out", "directory for metrics.json, predictions.json (every box with its score) and the "
                                "pictures")
    limit: int | None = flag(None, "evaluate at most this many images")
    batch_size: int = flag(16, "classes decoded together per image")
    max_objects: int = flag(50, "detection cap per (image, class)")
    num_pictures: int = flag(8, "images drawn with ground truth and predictions (base | fine-tuned with --compare)")
    classes: tuple | None = flag(None, "only these class names")
    rename: dict | None = flag(None, "rename classes in prompts, e.g. --rename='{bb: black bishop}'")
    skip_bad_images: bool = flag(False, "skip unreadable images instead of stopping")

    def __post_init__(self):
        super().__post_init__()
        require(self, "limit", self.limit is None or self.limit >= 1, "use 1 or more, or leave it unset for every image")
        for name in ("batch_size", "max_objects"):
            require(self, name, getattr(self, name) >= 1, "use 1 or more")
        require(self, "num_pictures", self.num_pictures >= 0, "use 0 or more")
        check_output_dir("out", self.out)


def main(config: EvaluateConfig) -> dict:
    return evaluate_checkpoint(config)


if __name__ == "__main__":
    run_cli(EvaluateConfig, main, __doc__.split("\n\n")[0])
