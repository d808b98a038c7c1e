"""Evaluate detection on a dataset split: metrics.json, a table, and pictures of what the model finds.

    python evaluate.py --model=md2 --dataset=DIR --split=test [--weights=...] [--lora=FILE] [--out=DIR]
    python evaluate.py --lora=moondream_lora_finetune_detect_grad.safetensors --compare=True

With --compare=True the base model and the fine-tuned one are evaluated on the same images and printed side by side with the difference,
and each picture shows the base predictions left and the fine-tuned ones right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datasets import load_split
from finetune import distributed
from finetune.base_model import build_model
from finetune.checkpoint import atomic_write
from finetune.cli import flag, run_cli
from finetune.config import CommonConfig
from finetune.evaluation import METRIC_ROWS, evaluate_split, format_metrics_table, save_comparisons, save_pictures
from finetune.inference import load_finetuned
from finetune.preparation import check_prompts_fit, dataset_path
from finetune.validation import check_output_dir, require
from moondream2.errors import UserInputError


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
    if config.compare and not config.lora:
        raise UserInputError("--compare=True needs --lora=FILE (the fine-tuned checkpoint to compare with the base)")
    split = load_split(dataset_path(config), config.split, list(config.classes) if config.classes else None,
                       config.rename, config.skip_bad_images)
    model = build_model(config.model, config.weights, config.tokenizer, config.device, config.seed)
    check_prompts_fit(model, [split], config.max_objects)

    main_process = distributed.process().is_main  # under torchrun the images are shared out; rank 0 writes

    def run(desc: str, n_pictures: int):
        return evaluate_split(model, split, config.batch_size, config.max_objects, config.limit,
                              n_pictures=n_pictures if main_process else 0, desc=desc, progress=main_process)

    base = run("base", config.num_pictures) if config.compare else None  # before the checkpoint changes any weight
    if config.lora:
        load_finetuned(config.lora, model=model)
    result = run("finetuned" if config.lora else "eval", config.num_pictures)
    report = dict(result.metrics)
    columns = {"finetuned" if config.lora else config.split: result.metrics}
    if base is not None:
        delta = {k: _diff(result.metrics.get(k), base.metrics.get(k)) for k in METRIC_ROWS}
        report.update({"base": base.metrics, "delta": delta})
        columns = {"base": base.metrics, **columns, "delta": delta}
    if not main_process:
        return report
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "metrics.json", json.dumps(report, indent=2, default=str))
    write_text(out / "predictions.json", json.dumps(result.predictions, default=str))
    names = [r["image"] for r in result.predictions[: len(result.pictures)]]
    if base is None:
        save_pictures(result.pictures, names, out / "pictures")
    else:  # both runs drew the first images of the same split, so the pictures pair up
        save_comparisons(base.pictures, result.pictures, names, out / "pictures")
    print(format_metrics_table(columns))
    print(f"wrote {out / 'metrics.json'}, {out / 'predictions.json'} and {len(result.pictures)} pictures "
          f"in {out / 'pictures'}")
    return report


def write_text(path: Path, text: str) -> None:
    """Atomically: an interrupted evaluation must not leave a truncated metrics file that looks complete."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _diff(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a - b
    return None


if __name__ == "__main__":
    run_cli(EvaluateConfig, main, __doc__.split("\n\n")[0])
