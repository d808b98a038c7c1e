"""Running detection or pointing over a dataset split: metrics for every (image, class) and pictures.

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
from finetune import distributed
from finetune.files import atomic_write
from finetune.metrics import DetectionMetrics, PointMetrics
from finetune.rewards import iou_match_reward
from finetune.sequences import TASKS
from finetune.visualize import contact_sheet, draw_detections, side_by_side
from moondream2.errors import UserInputError

POINT_MARK = 0.015  # half-side of the square drawn around a predicted point, as a fraction of the image


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
    task: str = "detect",
) -> EvalResult:
    """Detect and/or point every class of the split in each image (an image's classes decode as one batch).

    `task`: "detect" reports box metrics (f1, precision, recall, map, ...); "point" reports pointing
    metrics as point_f1, point_precision, point_recall, ... (a point is a hit when it falls inside a
    ground-truth box no other point claimed); "both" reports both. `encode(record) -> EncodedImage`
    can supply cached image encodings; by default each image is loaded and encoded once. `limit`
    caps the number of images. Under torchrun each process predicts every world-size-th image and
    all of them score the gathered predictions, so every rank returns the same metrics.
    """
    if task not in TASKS:
        raise UserInputError(f"task={task!r}: use one of {', '.join(TASKS)}")
    images = split.images[:limit] if limit else split.images
    rank, world = distributed.process().rank, distributed.process().world_size
    was_training = model.training
    model.eval()
    mine = {}
    for index in tqdm(range(rank, len(images), world), desc=desc, disable=not progress, leave=False):
        record = images[index]
        encoded = encode(record) if encode is not None else model.encode_image(load_image(record.path))
        mine[index] = {t: _predict(model, encoded, split.class_names, t, batch_size, max_objects) for t in TASKS[task]}
    model.train(was_training)
    predicted_by_image = {i: p for shard in distributed.all_gather_objects(mine) for i, p in shard.items()}
    return _score(split, images, [predicted_by_image[i] for i in range(len(images))], task, n_pictures)


def _score(split: DetectionSplit, images: list, predictions: list[dict], task: str, n_pictures: int) -> EvalResult:
    """Metrics, the predictions as JSON-ready records, and the first `n_pictures` images drawn."""
    boxes, points, rewards = DetectionMetrics(), PointMetrics(), []
    result = EvalResult(metrics={})
    for index, (record, predicted) in enumerate(zip(images, predictions)):
        for name in split.class_names:
            gt = record.boxes_by_class.get(name, [])
            if "detect" in predicted:
                found = predicted["detect"][name]
                boxes.add(name, [b for b, _ in found], [score for _, score in found], gt, record.image_id)
                rewards.append(iou_match_reward([b for b, _ in found], gt))
            if "point" in predicted:
                points.add(name, [p for p, _ in predicted["point"][name]], gt)
        result.predictions.append({"image": str(record.path), "predictions": predicted.get("detect", {}),
                                   **({"points": predicted["point"]} if "point" in predicted else {})})
        if index < n_pictures:
            drawn = {k: list(v) for k, v in predicted.get("detect", {}).items() if v}
            for name, found in predicted.get("point", {}).items():
                if found:
                    drawn[f"{name} (point)"] = [(_mark(p), score) for p, score in found]
            gt = {k: v for k, v in record.boxes_by_class.items() if k in split.class_names}
            result.pictures.append(draw_detections(load_image(record.path), gt, drawn))
    result.metrics = boxes.summary() if "detect" in TASKS[task] else {}
    if rewards:  # the default GRPO reward of the greedy detections, per (image, class)
        result.metrics["reward"] = sum(rewards) / len(rewards)
    if "point" in TASKS[task]:
        result.metrics.update({f"point_{k}": v for k, v in points.summary().items()})
    result.metrics["n_images"] = len(images)
    return result


def _predict(model, encoded, classes: list[str], task: str, batch_size: int, max_objects: int) -> dict:
    """class name -> [(box (x_min, y_min, x_max, y_max) or point (x, y), score)] for one image."""
    predicted = {}
    for start in range(0, len(classes), batch_size):
        chunk = classes[start : start + batch_size]
        outputs = model.detect_batch([(encoded, name) for name in chunk], {"max_objects": max_objects}, task=task)
        for name, objects in zip(chunk, outputs):
            keys = ("x_min", "y_min", "x_max", "y_max") if task == "detect" else ("x", "y")
            predicted[name] = [(tuple(o[k] for k in keys), o["score"]) for o in objects]
    return predicted


def _mark(point: tuple[float, float]) -> tuple[float, float, float, float]:
    """A small square around a predicted point, so points draw like boxes."""
    x, y = point
    return (x - POINT_MARK, y - POINT_MARK, x + POINT_MARK, y + POINT_MARK)


def save_pictures(
    pictures: list[Image.Image],
    names: list[str],
    out_dir: str | Path,
    columns: int = 4,
    thumb: int = 384,
    cell_height: int | None = None,
) -> list[Path]:
    """One PNG per picture plus `contact_sheet.png` tiling them all (see `contact_sheet` for the cells)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for picture, name in zip(pictures, names):
        paths.append(_save_png(picture, out_dir / f"{Path(name).stem}.png"))
    if pictures:
        captions = [Path(n).stem for n in names]
        paths.append(_save_png(contact_sheet(pictures, columns, thumb, captions, cell_height),
                               out_dir / "contact_sheet.png"))
    return paths


def _save_png(picture: Image.Image, path: Path) -> Path:
    """Atomically, so an interrupted run leaves no half-written picture."""
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_comparisons(
    base: list[Image.Image], tuned: list[Image.Image], names: list[str], out_dir: str | Path
) -> list[Path]:
    """Base | fine-tuned pictures of the same images, one PNG each, plus their contact sheet.

    The sheet holds one pair per row (two to a row would read as four runs) in cells twice the usual
    width and only as tall as the pairs need, so each half reads like a single picture.
    """
    pairs = [side_by_side(b, t) for b, t in zip(base, tuned)]
    width = 2 * 384
    cell_height = max((round(width * p.height / p.width) for p in pairs), default=width)
    return save_pictures(pairs, names, out_dir, columns=1, thumb=width, cell_height=cell_height)


METRIC_ROWS = ("f1", "precision", "recall", "map", "map50", "mean_iou", "count_error", "reward", "n_gt", "n_pred",
               "point_f1", "point_precision", "point_recall", "point_count_error", "point_n_pred")


def format_metrics_table(columns: dict[str, dict]) -> str:
    """A small text table: one row per metric, one column per run (e.g. baseline / best / test)."""
    names = list(columns)
    width = max([12, *(len(n) + 2 for n in names)])  # labels such as test(best@1200) stay apart
    lines = ["metric".ljust(18) + "".join(n.rjust(width) for n in names)]
    for row in (r for r in METRIC_ROWS if any(columns[n].get(r) is not None for n in names)):
        cells = []
        for n in names:
            value = columns[n].get(row)
            cells.append(("-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)).rjust(width))
        lines.append(row.ljust(18) + "".join(cells))
    return "\n".join(lines)
