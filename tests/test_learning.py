"""Learning tests: every trainer fine-tunes the shipped base (`models/tiny-shapes.safetensors`) on rings,
a shape it never saw, for real, on CPU, and must beat it on 48 held-out test images it never trained on.

The data: 200 training images of 0-4 rings in any of nine colours (83 rings in the test split), the
world of `--dataset=synthetic`, another seed. The base answers "ring" with some of the objects (test
F1 0.41: it localises shapes but was never taught this word). Thresholds sit below what was measured
(numbers beside each assertion: 150 steps, batch 8, seed 0, 2 CPU threads, torch 2.13).
"""

import pytest

from datasets import write_synthetic_coco
from datasets.synthetic import RINGS_WORLD
from finetune.base_model import SHIPPED_WEIGHTS
from grpo_trainer import GRPOConfig
from grpo_trainer import main as grpo_main
from sft_trainer import SFTConfig
from sft_trainer import main as sft_main
from sft_trainer_detect_grad import DetectGradConfig
from sft_trainer_detect_grad import main as detect_grad_main

pytestmark = pytest.mark.slow  # minutes on a CPU: `pytest -m "not slow"` skips them

# Only the final validation runs (eval_interval beyond the run), so "best" is the final weights
# whenever they beat the base on validation.
COMMON = dict(model="tiny-shapes", batch_size=8, grad_accum_steps=1, epochs=1000, eval_interval=10**6,
              max_objects=8, num_pictures=0, seed=0, bin_sigma=3.0, max_steps=150)
LORA = dict(use_lora=True, lora_rank=16, lora_alpha=32, lora_dropout=0.0, lr=1e-3)


@pytest.fixture(scope="module")
def rings(tmp_path_factory):
    assert SHIPPED_WEIGHTS["tiny-shapes"].is_file(), "the shipped base is part of the repository"
    return write_synthetic_coco(tmp_path_factory.mktemp("rings"), n_train=200, n_valid=8, n_test=48, seed=1,
                                world=RINGS_WORLD)


def held_out(summary: dict) -> tuple[dict, dict]:
    """(the base's, the trained weights') metrics on the test split: test(base), then test(best@STEP)
    or test(final)."""
    metrics = summary["metrics"]
    return metrics["test(base)"], next(v for k, v in metrics.items() if k.startswith("test(") and k != "test(base)")


@pytest.fixture(scope="module")
def lora_run(rings, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return detect_grad_main(DetectGradConfig(**COMMON, **LORA, dataset=str(rings), output_dir=str(out)))


def test_detect_grad_with_lora_beats_the_base_on_held_out_images(lora_run):
    base, tuned = held_out(lora_run)
    assert base["f1"] <= 0.45 and base["map50"] <= 0.32  # measured 0.413 and 0.275
    assert tuned["f1"] >= 0.52  # measured 0.590
    assert tuned["map50"] >= 0.37  # measured 0.444
    assert tuned["recall"] >= base["recall"] + 0.1  # measured 0.373 -> 0.554


def test_detect_grad_full_fine_tuning_beats_the_base_on_held_out_images(rings, tmp_path):
    summary = detect_grad_main(DetectGradConfig(**COMMON, use_lora=False, lr=3e-4, dataset=str(rings),
                                                output_dir=str(tmp_path)))
    base, tuned = held_out(summary)
    assert tuned["f1"] >= base["f1"] + 0.12  # measured 0.413 -> 0.621
    assert tuned["map50"] >= base["map50"] + 0.12  # measured 0.275 -> 0.474


def test_sft_learns_to_detect_and_point_on_held_out_images(rings, tmp_path):
    summary = sft_main(SFTConfig(**COMMON, **LORA, task="both", dataset=str(rings), output_dir=str(tmp_path)))
    base, tuned = held_out(summary)
    assert tuned["f1"] >= base["f1"] + 0.08  # measured 0.413 -> 0.564
    assert tuned["point_f1"] >= base["point_f1"] + 0.06  # measured 0.479 -> 0.588


def test_grpo_after_sft_raises_held_out_map_more_than_more_sft(rings, lora_run, tmp_path):
    """30 GRPO steps (8 rollouts per sample) from the LoRA run's adapters, against 30 more supervised
    steps from the same adapters: the gain must be in box quality (mAP), not only in the box count."""
    start = dict(COMMON, max_steps=30, init_lora=lora_run["final_path"], bin_sigma=0.0, use_lora=True, lora_rank=16,
                 lora_alpha=32, lora_dropout=0.0)
    rl = grpo_main(GRPOConfig(**{**start, "lr": 5e-5}, dataset=str(rings), num_rollouts=8,
                              kl_beta=0.0, output_dir=str(tmp_path / "grpo")))
    more = detect_grad_main(DetectGradConfig(**{**start, "lr": 1e-4, "bin_sigma": 3.0}, dataset=str(rings),
                                             output_dir=str(tmp_path / "sft")))
    sft_start, after_rl = held_out(rl)
    _, after_sft = held_out(more)
    assert sft_start["map50"] == pytest.approx(held_out(lora_run)[1]["map50"])  # RL starts where SFT ended
    assert after_rl["map50"] >= sft_start["map50"] + 0.02  # measured 0.444 -> 0.484
    assert after_rl["map50"] >= after_sft["map50"] + 0.015  # measured 0.484 against 0.451
    assert after_rl["map"] >= after_sft["map"] + 0.005  # measured 0.140 against 0.123
