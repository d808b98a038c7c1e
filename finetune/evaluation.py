"""Running detection over a dataset split: metrics for every (image, class) and prediction pictures.

Used by every trainer (baseline, periodic and final evaluation) and by `evaluate.py`, so a number in
a training log and a number from `evaluate.py` always mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm import tqdm

from datasets import DetectionSplit, load_image
from finetune.metrics import DetectionMetrics
from finetune.visualize import contact_sheet, draw_detections


@dataclass
class EvalResult:
    metrics: dict
    pictures: list[Image.Image] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate_split(
    model,
    split: DetectionSplit,
    batch_size: int = 16,
    max_objects: int = 50,
    limit: int | None = None,
    n_pictures: int = 0,
    encode: Callable | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Detect every class of the split in each image (all classes of an image decode as one batch).

    `encode(record) -> EncodedImage` can supply cached image encodings; by default each image is
    loaded and encoded once. `limit` caps the number of images.
    """
    was_training = model.training
    model.eval()
    metrics = DetectionMetrics()
    result = EvalResult(metrics={})
    images = split.images[:limit] if limit else split.images
    for index, record in enumerate(tqdm(images, desc=desc, disable=not progress, leave=False)):
        pil = load_image(record.path) if (encode is None or index < n_pictures) else None
        encoded = encode(record) if encode is not None else model.encode_image(pil)
        predicted: dict[str, list[tuple[tuple, float]]] = {}
        classes = split.class_names
        for start in range(0, len(classes), batch_size):
            chunk = classes[start : start + batch_size]
            outputs = model.detect_batch([(encoded, name) for name in chunk], {"max_objects": max_objects})
            for name, objects in zip(chunk, outputs):
                predicted[name] = [((o["x_min"], o["y_min"], o["x_max"], o["y_max"]), o["score"]) for o in objects]
        for name in classes:
            boxes = [box for box, _ in predicted[name]]
            scores = [score for _, score in predicted[name]]
            metrics.add(name, boxes, scores, record.boxes_by_class.get(name, []), record.image_id)
        result.predictions.append({"image": str(record.path), "predictions": predicted})
        if index < n_pictures:
            gt = {k: v for k, v in record.boxes_by_class.items() if k in predicted}
            result.pictures.append(draw_detections(pil, gt, {k: v for k, v in predicted.items() if v}))
    result.metrics = metrics.summary()
    result.metrics["n_images"] = len(images)
    model.train(was_training)
    return result


def save_pictures(pictures: list[Image.Image], names: list[str], out_dir: str | Path) -> list[Path]:
    """One PNG per picture plus `contact_sheet.png` tiling them all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for picture, name in zip(pictures, names):
        paths.append(out_dir / f"{Path(name).stem}.png")
        picture.save(paths[-1])
    if pictures:
        paths.append(out_dir / "contact_sheet.png")
        contact_sheet(pictures, captions=[Path(n).stem for n in names]).save(paths[-1])
    return paths


METRIC_ROWS = ("f1", "precision", "recall", "map", "map50", "count_error", "n_gt", "n_pred")


def format_metrics_table(columns: dict[str, dict]) -> str:
    """A small text table: one row per metric, one column per run (e.g. baseline / best / test)."""
    names = list(columns)
    lines = ["metric".ljust(12) + "".join(n.rjust(12) for n in names)]
    for row in METRIC_ROWS:
        cells = []
        for n in names:
            value = columns[n].get(row)
            cells.append(("-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)).rjust(12))
        lines.append(row.ljust(12) + "".join(cells))
    return "\n".join(lines)
