"""GRPO loss variants against the default, from one supervised start, at equal compute, scored held out.

The world of the earlier, from-scratch GRPO learning test: 16 training images of three
colour-named circle classes (their copy is the validation split that picks the best checkpoint) and
16 other test images. 60 detect-grad steps give the start; every variant then runs the same GRPO
steps, batches, rollouts and seed from it, and is scored on the test images (mean IoU reward and F1
of `detect()`, with the checkpoint validation picked).

    python benchmarks/grpo_variants.py                # tiny preset, CPU: about 10 minutes on 2 cores
    python benchmarks/grpo_variants.py --seeds='[0,1]'
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import write_synthetic_coco  # noqa: E402
from datasets.synthetic import COLOUR_CIRCLES_WORLD  # noqa: E402
from grpo_trainer import GRPOConfig  # noqa: E402
from grpo_trainer import main as grpo  # noqa: E402
from sft_trainer_detect_grad import DetectGradConfig  # noqa: E402
from sft_trainer_detect_grad import main as detect_grad  # noqa: E402

COMMON = dict(model="tiny", batch_size=8, grad_accum_steps=1, epochs=100, eval_interval=1000, max_objects=6,
              num_pictures=0, use_lora=False, seed=0)
RECIPE = dict(lr=5e-5, train_text=True, num_rollouts=8, temperature=1.0, kl_beta=0.0)  # the learning test's
VARIANTS = {
    "default (grpo, group std, clip 0.2)": {},
    "dr_grpo, no std scaling": {"loss_type": "dr_grpo", "scale_rewards": "none"},
    "bnpo, clip_eps_high 0.28 (DAPO-like)": {"loss_type": "bnpo", "clip_eps_high": 0.28},
    "batch std scaling": {"scale_rewards": "batch"},
    "mask_truncated": {"mask_truncated": True},
    "sft_weight 0.1": {"sft_weight": 0.1},
}


def world(root: Path) -> Path:
    write_synthetic_coco(root, n_train=16, n_valid=1, n_test=16, seed=0, world=COLOUR_CIRCLES_WORLD)
    shutil.rmtree(root / "valid")
    shutil.copytree(root / "train", root / "valid")
    return root


def held_out(summary: dict) -> dict:
    """The trained weights' test column (best@STEP, or final when validation never improved), not the
    starting model's test(base)."""
    return next(v for k, v in summary["metrics"].items() if k.startswith("test(") and k != "test(base)")


def main(sft_steps: int = 60, grpo_steps: int = 30, seeds: tuple = (0,), out: str = "benchmarks/results/grpo_variants.json"):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = world(Path(tmp) / "shapes")
        start = detect_grad(DetectGradConfig(**{**COMMON, "lr": 1e-3}, dataset=str(data),
                                             output_dir=f"{tmp}/sft", max_steps=sft_steps))
        rows.append({"variant": "start (detect_grad)", "seed": None, **_scores(held_out(start))})
        print(rows[-1], flush=True)
        for seed in seeds:
            for label, flags in VARIANTS.items():
                config = GRPOConfig(**{**COMMON, **RECIPE, **flags, "seed": seed}, dataset=str(data),
                                    output_dir=f"{tmp}/{len(rows)}", max_steps=grpo_steps,
                                    init_lora=start["final_path"])
                rows.append({"variant": label, "seed": seed, **_scores(held_out(grpo(config)))})
                print(rows[-1], flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2))
    print("| variant | seed | test reward | test F1 | boxes predicted / true |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['reward']:.3f} | {r['f1']:.3f} | {r['n_pred']} / {r['n_gt']} |")


def _scores(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("reward", "f1", "n_pred", "n_gt")}


if __name__ == "__main__":
    fire.Fire(main)
