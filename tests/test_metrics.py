import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.metrics import DetectionMetrics, PointMetrics, box_iou, match_boxes, match_points


def test_box_iou_of_known_boxes():
    iou = box_iou([[0, 0, 2, 2], [0, 0, 1, 1]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    assert iou.shape == (2, 3)
    assert np.allclose(iou, [[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]])
    assert box_iou([], [[0, 0, 1, 1]]).shape == (0, 1)
    assert box_iou([[0.2, 0.2, 0.2, 0.5]], [[0.2, 0.2, 0.2, 0.5]])[0, 0] == 0.0  # zero-area box


def test_match_boxes_is_optimal_not_greedy_in_emission_order():
    gt = [[0, 0, 10, 1], [4, 0, 14, 1]]
    pred = [[1, 0, 11, 1], [0, 0, 8, 1]]  # pred 0 best fits gt 0, but pred 1 fits only gt 0
    iou = box_iou(pred, gt)
    assert iou[0, 0] > iou[0, 1] >= 0.5 and iou[1, 0] >= 0.5 > iou[1, 1]  # greedy would match once

    assert [(p, g) for p, g, _ in match_boxes(pred, gt)] == [(0, 1), (1, 0)]


def test_match_boxes_prefers_higher_total_iou_among_equal_counts():
    gt = [[0, 0, 1, 1], [2, 0, 3, 1]]
    pred = [[2, 0, 3, 1], [0, 0, 1, 1]]
    assert match_boxes(pred, gt) == [(0, 1, 1.0), (1, 0, 1.0)]


def test_iou_exactly_at_threshold_counts():
    assert box_iou([[0, 0, 2, 1]], [[0, 0, 1, 1]])[0, 0] == 0.5
    assert match_boxes([[0, 0, 2, 1]], [[0, 0, 1, 1]], iou_threshold=0.5) == [(0, 0, 0.5)]
    assert match_boxes([[0, 0, 2, 1]], [[0, 0, 1, 1]], iou_threshold=0.51) == []


def test_match_boxes_empty_inputs():
    assert match_boxes([], []) == []
    assert match_boxes([[0, 0, 1, 1]], []) == []
    assert match_boxes(np.zeros((0, 4)), [[0, 0, 1, 1]]) == []


def test_detection_metrics_hand_worked_split():
    m = DetectionMetrics()
    m.add("cat", [[0, 0, 0.5, 0.5], [0.6, 0.6, 0.7, 0.7]], [0.9, 0.8], [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5]], image_id=1)
    m.add("dog", [[0, 0, 1, 1]], [0.5], [], image_id=1)  # a negative with a false positive
    m.add("cat", [], [], [[0, 0, 1, 1]], image_id=2)  # a miss
    s = m.summary()

    assert (s["n_samples"], s["n_gt"], s["n_pred"]) == (3, 3, 3)
    assert s["precision"] == s["recall"] == s["f1"] == pytest.approx(1 / 3)
    assert s["count_error"] == pytest.approx(2 / 3)
    assert s["per_class"]["cat"] == pytest.approx(
        {"f1": 0.4, "precision": 0.5, "recall": 1 / 3, "count_error": 0.5, "n_samples": 2, "n_gt": 3, "n_pred": 2}
    )
    assert s["per_class"]["dog"]["precision"] == 0.0 and s["per_class"]["dog"]["n_gt"] == 0
    assert set(s) >= {"f1", "precision", "recall", "map", "map50", "count_error", "n_samples", "n_gt", "n_pred", "per_class"}


def test_empty_case_conventions():
    empty = DetectionMetrics().summary()
    assert (empty["precision"], empty["recall"], empty["f1"], empty["count_error"]) == (1.0, 1.0, 1.0, 0.0)
    assert math.isnan(empty["map"]) and math.isnan(empty["map50"])

    negatives_right = DetectionMetrics()
    negatives_right.add("cat", [], None, [], image_id=1)
    assert negatives_right.summary()["f1"] == 1.0

    all_missed = DetectionMetrics()
    all_missed.add("cat", [], None, [[0, 0, 1, 1]], image_id=1)
    s = all_missed.summary()
    assert (s["precision"], s["recall"], s["f1"], s["map"], s["map50"]) == (0.0, 0.0, 0.0, 0.0, 0.0)

    only_false_positives = DetectionMetrics()
    only_false_positives.add("cat", [[0, 0, 1, 1]], None, [], image_id=1)
    s = only_false_positives.summary()
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)
    assert math.isnan(s["map"])


def test_perfect_predictions_give_map_one_and_print_nothing(capsys):
    m = DetectionMetrics()
    m.add("cat", [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]], None, [[0.5, 0.5, 0.9, 0.8], [0.1, 0.1, 0.4, 0.4]], image_id=1)
    m.add("dog", [[0.2, 0.3, 0.6, 0.9]], [0.7], [[0.2, 0.3, 0.6, 0.9]], image_id=2)
    s = m.summary()
    assert (s["map"], s["map50"], s["f1"]) == (1.0, 1.0, 1.0)
    assert capsys.readouterr().out == ""


def test_map_matches_pycocotools_on_a_random_case():
    rng = np.random.default_rng(0)
    width, height = 640, 480
    gt_ann, dt_ann, m = [], [], DetectionMetrics()
    for image_id in range(1, 7):
        for category_id, name in ((1, "cat"), (2, "dog")):
            xy = rng.uniform(0, 0.6, (rng.integers(0, 4), 2))
            gt = np.hstack([xy, xy + rng.uniform(0.05, 0.4, xy.shape)])
            jitter = gt + rng.normal(0, 0.03, gt.shape)
            extra_xy = rng.uniform(0, 0.7, (rng.integers(0, 3), 2))
            pred = np.vstack([jitter[rng.random(len(jitter)) < 0.8], np.hstack([extra_xy, extra_xy + 0.2])])
            scores = rng.random(len(pred))
            m.add(name, pred, scores, gt, image_id=image_id)
            scale = np.array([width, height, width, height])
            for box in gt * scale:
                gt_ann.append({"id": len(gt_ann) + 1, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                               "area": (box[2] - box[0]) * (box[3] - box[1])})
            for box, score in zip(pred * scale, scores):
                dt_ann.append({"image_id": image_id, "category_id": category_id, "score": float(score),
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": [{"id": i, "width": width, "height": height} for i in range(1, 7)],
                           "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], "annotations": gt_ann}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dt_ann), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    s = m.summary()
    assert 0.05 < evaluator.stats[0] < 0.95  # a non-trivial case
    assert s["map"] == pytest.approx(evaluator.stats[0], abs=1e-9)
    assert s["map50"] == pytest.approx(evaluator.stats[1], abs=1e-9)


def test_scores_must_match_boxes():
    with pytest.raises(ValueError):
        DetectionMetrics().add("cat", [[0, 0, 1, 1]], [0.5, 0.6], [], image_id=1)


def test_match_points_is_one_to_one_and_optimal():
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.4, 0.0, 0.9, 0.5]]
    points = [(0.45, 0.2), (0.2, 0.2)]  # the first is in both boxes, the second only in box 0
    assert match_points(points, boxes) == [(0, 1), (1, 0)]
    assert match_points([(0.5, 0.5)], boxes) == [(0, 0)]  # the edge counts
    assert len(match_points([(0.1, 0.1), (0.2, 0.2)], boxes[:1])) == 1  # two points, one box
    assert match_points([], boxes) == [] and match_points([(0.1, 0.1)], []) == []


def test_point_metrics():
    m = PointMetrics()
    m.add("cat", [(0.1, 0.1), (0.15, 0.15), (0.9, 0.9)], [[0, 0, 0.5, 0.5], [0.6, 0, 1, 0.4]])
    m.add("dog", [], [])
    s = m.summary()
    assert (s["n_pred"], s["n_gt"], s["n_samples"]) == (3, 2, 2)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(2 * 1 / 5)
    assert s["per_class"]["dog"]["f1"] == 1.0
    assert PointMetrics().summary()["f1"] == 1.0


def test_mean_iou_averages_the_matched_pairs_only():
    metrics = DetectionMetrics()
    metrics.add("a", [(0, 0, 0.5, 1)], None, [(0, 0, 1, 1)], image_id=1)  # IoU 1/2: a match
    metrics.add("a", [(0, 0, 1, 1)], None, [(0, 0, 1, 1)], image_id=2)  # IoU 1
    metrics.add("a", [(0, 0, 0.5, 0.5)], None, [(0, 0, 1, 1)], image_id=3)  # IoU 1/4: no match, not averaged
    assert metrics.summary()["mean_iou"] == pytest.approx(0.75)
    empty = DetectionMetrics()
    empty.add("a", [], None, [(0, 0, 1, 1)], image_id=1)
    assert math.isnan(empty.summary()["mean_iou"])
