"""Learning tests: the tiny preset trained from scratch on the synthetic shapes, on CPU, for real.

The validation split is a copy of the training images, so these tests measure whether what the
trainers teach is what `detect()` / `point()` then return (the same bins, the same stop decision,
the same sequence), not generalisation; a tiny random model needs far more data and steps for that.
Thresholds sit well below what was measured (numbers beside each assertion: 150 steps, seed 0, CPU).
"""

import shutil

import pytest

from datasets import write_synthetic_coco
from sft_trainer import SFTConfig
from sft_trainer import main as sft_main
from sft_trainer_detect_grad import DetectGradConfig
from sft_trainer_detect_grad import main as detect_grad_main

COMMON = dict(model="tiny", batch_size=8, grad_accum_steps=1, epochs=100, eval_interval=1000, max_objects=6,
              num_pictures=0, use_lora=False, lr=1e-3, seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """16 training images (0-3 shapes of 3 classes, 27 boxes) whose copy is the validation split."""
    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_coco(root, n_train=16, n_valid=1, n_test=4, seed=0, image_size=160, max_objects=3)
    shutil.rmtree(root / "valid")
    shutil.copytree(root / "train", root / "valid")
    return root


@pytest.fixture(scope="module")
def detect_grad_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect_grad")
    return detect_grad_main(DetectGradConfig(**COMMON, dataset=str(shapes), output_dir=str(out), max_steps=150))


def test_detect_grad_learns_boxes_and_the_object_count(detect_grad_run):
    baseline, final = detect_grad_run["metrics"]["baseline"], detect_grad_run["metrics"]["final"]
    assert baseline["f1"] < 0.05 and baseline["count_error"] > 3.0  # measured 0.0 and 5.44
    assert final["f1"] >= 0.5  # measured 0.74
    assert final["map50"] >= 0.35  # measured 0.62
    assert final["count_error"] <= 0.7  # measured 0.31 (27 boxes over 48 image/class pairs)


def test_sft_learns_boxes_and_points(shapes, tmp_path):
    summary = sft_main(SFTConfig(**COMMON, dataset=str(shapes), output_dir=str(tmp_path), max_steps=150,
                                 train_text=True, task="both"))
    baseline, final = summary["metrics"]["baseline"], summary["metrics"]["final"]
    assert baseline["f1"] < 0.05 and baseline["point_f1"] < 0.1  # measured 0.0 and 0.04
    assert final["f1"] >= 0.45  # measured 0.68
    assert final["point_f1"] >= 0.45  # measured 0.74
    assert final["count_error"] <= 0.8  # measured 0.38, from 5.44
