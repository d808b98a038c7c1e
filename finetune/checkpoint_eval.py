"""`evaluate.py`'s job: the metrics of a base model, a fine-tuned one, or both side by side, on one
split, written to --out as metrics.json, predictions.json (every box with its score) and pictures."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_split
from finetune import distributed
from finetune.base_model import build_model
from finetune.evaluation import METRIC_ROWS, evaluate_split, format_metrics_table
from finetune.files import atomic_write
from finetune.inference import load_finetuned
from finetune.preparation import check_prompts_fit, dataset_path
from finetune.report import save_result_pictures
from moondream2.errors import UserInputError


def evaluate_checkpoint(config) -> dict:
    """Evaluate `config` (an `evaluate.EvaluateConfig`); returns what metrics.json holds."""
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
    # Both runs drew the first images of the same split, so the pictures pair up.
    save_result_pictures(result, base.pictures if base else [], out / "pictures")
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
