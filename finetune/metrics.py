"""Detection and pointing metrics over a split: matched F1, count error and COCO mAP.

Boxes are normalized (x_min, y_min, x_max, y_max); IoU >= threshold counts as a match everywhere.
Empty cases follow one rule: a ratio whose denominator is zero is 1.0 when there was nothing to
find and nothing was predicted, else 0.0. So no predictions and no ground truth scores a perfect
1.0, and predictions on an empty image (or nothing predicted on a full one) score 0.0.
mAP is NaN when the split has no ground-truth box at all (AP is undefined without positives).
"""

import contextlib
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

BoxesLike = Sequence[Sequence[float]] | np.ndarray


def as_boxes(boxes: BoxesLike) -> np.ndarray:
    """Any box collection (list of 4-sequences, (N,4) array, empty) as a float (N,4) array."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_iou(a: BoxesLike, b: BoxesLike) -> np.ndarray:
    """Pairwise IoU, shape (len(a), len(b)); degenerate boxes have IoU 0 with everything."""
    a, b = as_boxes(a), as_boxes(b)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(pred: BoxesLike, gt: BoxesLike, iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one (pred index, gt index, IoU) pairs with IoU >= threshold.

    Optimal, not greedy: first the most matches possible, then the highest total IoU among those.
    """
    iou = box_iou(pred, gt)
    if iou.size == 0:
        return []
    valid = iou >= iou_threshold
    # Each valid pair is worth more than any possible sum of IoUs, so the count dominates.
    weight = np.where(valid, min(iou.shape) + 1 + iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if valid[r, c]]


def match_points(points: Sequence[Sequence[float]] | np.ndarray, gt_boxes: BoxesLike) -> list[tuple[int, int]]:
    """One-to-one (point index, gt index) hits, a hit being a point inside (edges included) its box.

    Optimal: the most hits possible, so a point in two overlapping boxes never steals the only
    box another point could hit.
    """
    pts, boxes = np.asarray(points, dtype=np.float64).reshape(-1, 2), as_boxes(gt_boxes)
    if len(pts) == 0 or len(boxes) == 0:
        return []
    x, y = pts[:, 0:1], pts[:, 1:2]
    inside = (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])
    rows, cols = linear_sum_assignment(inside.astype(np.float64), maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if inside[r, c]]


def precision_recall_f1(tp: int, n_pred: int, n_gt: int) -> tuple[float, float, float]:
    """P, R, F1 with the module's empty-case rule (see the module docstring)."""
    nothing = n_pred == 0 and n_gt == 0
    precision = tp / n_pred if n_pred else float(nothing)
    recall = tp / n_gt if n_gt else float(nothing)
    f1 = 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0
    return precision, recall, f1


@dataclass
class _Tally:
    """Running counts for one class or the whole split."""

    tp: int = 0
    n_pred: int = 0
    n_gt: int = 0
    n_samples: int = 0
    abs_count_error: int = 0

    def add(self, tp: int, n_pred: int, n_gt: int) -> None:
        self.tp += tp
        self.n_pred += n_pred
        self.n_gt += n_gt
        self.n_samples += 1
        self.abs_count_error += abs(n_pred - n_gt)

    def summary(self) -> dict[str, float | int]:
        precision, recall, f1 = precision_recall_f1(self.tp, self.n_pred, self.n_gt)
        return {
            "f1": f1, "precision": precision, "recall": recall,
            "count_error": self.abs_count_error / self.n_samples if self.n_samples else 0.0,
            "n_samples": self.n_samples, "n_gt": self.n_gt, "n_pred": self.n_pred,
        }


@dataclass
class _Counts:
    """Split-wide and per-class tallies, the part box and point metrics share."""

    total: _Tally = field(default_factory=_Tally)
    per_class: dict[str, _Tally] = field(default_factory=lambda: defaultdict(_Tally))

    def add(self, class_name: str, tp: int, n_pred: int, n_gt: int) -> None:
        self.total.add(tp, n_pred, n_gt)
        self.per_class[class_name].add(tp, n_pred, n_gt)

    def summary(self) -> dict[str, Any]:
        return {**self.total.summary(), "per_class": {k: v.summary() for k, v in sorted(self.per_class.items())}}


@dataclass
class _Sample:
    class_name: str
    image_id: Any
    pred: np.ndarray
    scores: np.ndarray
    gt: np.ndarray


class DetectionMetrics:
    """Accumulates (image, class) samples; `summary()` gives F1/P/R, count error and COCO mAP."""

    def __init__(self, iou_threshold: float = 0.5):
        self.iou_threshold = iou_threshold
        self._samples: list[_Sample] = []
        self._counts = _Counts()
        self._matched_ious: list[float] = []

    def add(
        self,
        class_name: str,
        pred_boxes: BoxesLike,
        pred_scores: Sequence[float] | np.ndarray | None,
        gt_boxes: BoxesLike,
        image_id: Any,
    ) -> None:
        """Record one (image, class) sample; call once per pair. Scores None = all equally sure (1.0)."""
        pred, gt = as_boxes(pred_boxes), as_boxes(gt_boxes)
        scores = np.ones(len(pred)) if pred_scores is None else np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(pred):
            raise ValueError(f"{len(pred)} predicted boxes but {len(scores)} scores")
        self._samples.append(_Sample(class_name, image_id, pred, scores, gt))
        matches = match_boxes(pred, gt, self.iou_threshold)
        self._matched_ious.extend(iou for _, _, iou in matches)
        self._counts.add(class_name, len(matches), len(pred), len(gt))

    def coco_map(self) -> tuple[float, float]:
        """(mAP@[.5:.95], AP50) from pycocotools over everything added; NaN without ground truth."""
        if not any(len(s.gt) for s in self._samples):
            return float("nan"), float("nan")
        if not any(len(s.pred) for s in self._samples):
            return 0.0, 0.0
        gt, detections = _to_coco(self._samples)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return float(evaluator.stats[0]), float(evaluator.stats[1])

    def summary(self) -> dict[str, Any]:
        """f1, precision, recall, map, map50, mean_iou (of the matched pairs: how tight the boxes
        that count are; NaN when none matched), count_error, n_samples, n_gt, n_pred, per_class."""
        map_, map50 = self.coco_map()
        mean_iou = float(np.mean(self._matched_ious)) if self._matched_ious else float("nan")
        return {**self._counts.summary(), "map": map_, "map50": map50, "mean_iou": mean_iou}


def _to_coco(samples: list[_Sample]) -> tuple[dict, list[dict]]:
    """In-memory COCO ground truth and detections; boxes stay normalized (IoU is scale-free)."""
    image_ids: dict[Any, int] = {}
    category_ids: dict[str, int] = {}
    annotations, detections = [], []
    for s in samples:
        image = image_ids.setdefault(s.image_id, len(image_ids) + 1)
        category = category_ids.setdefault(s.class_name, len(category_ids) + 1)
        for box in s.gt:
            x, y, w, h = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        for box, score in zip(s.pred, s.scores):
            detections.append(
                {"image_id": image, "category_id": category, "bbox": list(_xywh(box)), "score": float(score)}
            )
    gt = {
        "images": [{"id": i} for i in image_ids.values()],
        "categories": [{"id": i, "name": name} for name, i in category_ids.items()],
        "annotations": annotations,
    }
    return gt, detections


def _xywh(box: np.ndarray) -> tuple[float, float, float, float]:
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    return x_min, y_min, x_max - x_min, y_max - y_min


class PointMetrics:
    """Accumulates pointing samples; a point is right when it hits an unclaimed ground-truth box."""

    def __init__(self) -> None:
        self._counts = _Counts()

    def add(self, class_name: str, points: Sequence[Sequence[float]] | np.ndarray, gt_boxes: BoxesLike) -> None:
        """Record one (image, class) sample of predicted (x, y) points against its boxes."""
        n_points = len(np.asarray(points, dtype=np.float64).reshape(-1, 2))
        self._counts.add(class_name, len(match_points(points, gt_boxes)), n_points, len(as_boxes(gt_boxes)))

    def summary(self) -> dict[str, Any]:
        """f1, precision, recall, count_error, n_samples, n_gt, n_pred, per_class."""
        return self._counts.summary()
