"""The original scripts' command lines work here, with their meanings, and say our flag's name."""

from __future__ import annotations

import json

import pytest

import grpo_trainer
import sft_trainer
import sft_trainer_detect_grad
from datasets import write_synthetic_coco
from finetune.cli import run_cli
from finetune.preparation import load_data, prepare_model
from moondream2.errors import UserInputError

FAST = ["--model=tiny", "--max_steps=1"]
SCRIPTS = {"sft_trainer.py": sft_trainer.SFTConfig, "sft_trainer_detect_grad.py": sft_trainer_detect_grad.DetectGradConfig,
           "grpo_trainer.py": grpo_trainer.GRPOConfig}

# (script, the original command line's flags, what our config must hold)
COMMAND_LINES = [
    ("sft_trainer.py", "--lr=1e-3 --epochs=20 --use_lora=True --lora_rank=32",
     dict(lr=1e-3, epochs=20, use_lora=True, lora_rank=32)),
    ("sft_trainer_detect_grad.py", "--lr=1e-5 --epochs=5 --use_lora=True --grad_accum_steps=16",
     dict(lr=1e-5, epochs=5, use_lora=True, grad_accum_steps=16)),
    ("grpo_trainer.py", "--learning_rate=5e-5 --batch_size=5 --num_rollouts=5 --num_epochs=3",
     dict(lr=5e-5, batch_size=5, num_rollouts=5, epochs=3)),
    ("sft_trainer_detect_grad.py", "--overfit_batch_size=8", dict(overfit_batch_size=8)),
    ("sft_trainer.py", "--md_version=3", dict(model="tiny-md3")),
    ("grpo_trainer.py", "--overfit_train=True --validation_samples=500",
     dict(overfit_train=True, overfit_batch_size=5, eval_limit=500)),
]


def parse(script: str, argv: list[str]):
    """The config the script's command line builds (nothing is trained)."""
    seen = []
    run_cli(SCRIPTS[script], seen.append, "test", argv)
    return seen[0]


@pytest.mark.parametrize("script, flags, expected", COMMAND_LINES, ids=[f"{s} {f}" for s, f, _ in COMMAND_LINES])
def test_each_original_command_line_parses_to_its_meaning(script, flags, expected):
    config = parse(script, FAST + flags.split())
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("script, old, ours, value", [
    ("sft_trainer_detect_grad.py", "--validation_samples=7", "eval_limit", 7),
    ("sft_trainer_detect_grad.py", "--lora_target_modules=[qkv]", "lora_targets", ("qkv",)),
    ("sft_trainer_detect_grad.py", "--model_path=base.safetensors", "weights", "base.safetensors"),
    ("sft_trainer.py", "--max_plot_samples=3", "num_pictures", 3),
    ("sft_trainer.py", "--dataset_name=chess-pieces", "dataset", "datasets/chess-pieces"),
    ("grpo_trainer.py", "--train_steps=2", "num_iterations", 2),
    ("grpo_trainer.py", "--learning_rate", "lr", 3e-4),  # the separated `--flag value` form
])
def test_renamed_flags_print_one_note_naming_ours(script, old, ours, value, capsys):
    argv = FAST + ([old, "3e-4"] if "=" not in old else [old])
    assert getattr(parse(script, argv), ours) == value
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: {old.split('=')[0]}") and f"--{ours}" in notes[0]


def test_the_other_original_flags_keep_their_names():
    config = parse("grpo_trainer.py", FAST + ["--weight_decay=1e-8", "--eval_interval=1", "--constant_lr=True",
                                              "--wandb_project=p", "--md_version=2"])
    assert (config.weight_decay, config.eval_interval, config.constant_lr, config.wandb_project, config.model) == (
        1e-8, 1, True, "p", "tiny")


@pytest.mark.parametrize("model, version, expected", [("md2", "3", "md3"), ("tiny", "3", "tiny-md3"),
                                                      ("md3", "2", "md2"), ("tiny-md3", "2", "tiny"), ("md3", "3", "md3")])
def test_md_version_switches_the_family_of_the_model(model, version, expected):
    assert sft_trainer.SFTConfig(model=model, md_version=version).model == expected


@pytest.mark.parametrize("flags", [dict(md_version="4"), dict(model="small", md_version="3")])
def test_md_version_without_a_counterpart_is_a_one_line_error(flags):
    with pytest.raises(UserInputError, match="--md_version="):
        sft_trainer.SFTConfig(**flags)


def test_overfit_batch_size_trains_and_validates_on_the_first_images(tmp_path):
    root = write_synthetic_coco(tmp_path / "shapes", n_train=12, n_valid=2, n_test=2, seed=0, image_size=64)
    data = load_data(sft_trainer_detect_grad.DetectGradConfig(model="tiny", dataset=str(root), overfit_batch_size=8))
    assert len(data.train.images) == 8 and data.val is data.train
    assert len(data.test.images) == 2


def test_sft_use_lora_false_trains_text_and_region_and_region_only_the_head(tmp_path):
    def trained(**flags) -> set[str]:
        model = prepare_model(sft_trainer.SFTConfig(model="tiny", output_dir=str(tmp_path), **flags))
        return {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("text.") else "")
                for name, p in model.named_parameters() if p.requires_grad}

    assert {"text.blocks", "text.lm_head", "region"} <= trained(use_lora=False)
    assert trained(region_only=True) == {"region"}


def test_constant_lr_keeps_the_learning_rate(tmp_path):
    root = write_synthetic_coco(tmp_path / "shapes", n_train=4, n_valid=2, n_test=2, seed=0, image_size=96,
                                max_objects=2)
    summary = sft_trainer_detect_grad.main(sft_trainer_detect_grad.DetectGradConfig(
        model="tiny", dataset=str(root), output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, eval_limit=1,
        num_pictures=0, lora_rank=2, lora_alpha=4, max_objects=2, constant_lr=True, lr=3e-4, baseline_eval=False))
    log = [json.loads(line) for line in (tmp_path / "out" / "log_detect_grad.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if r["event"] == "train"] == [3e-4, 3e-4] and summary["final_path"]


def test_schedule_steps_stops_a_run_part_way_along_a_longer_schedule(tmp_path):
    """By hand: an 8-step schedule with warmup_ratio 0.25 warms up over 2 steps, so the 2 steps run
    at 1/2 and 2/2 of --lr (a 2-step schedule would warm up over 1 step and start at the full rate)."""
    root = write_synthetic_coco(tmp_path / "shapes", n_train=4, n_valid=2, n_test=2, seed=0, image_size=96,
                                max_objects=2)
    sft_trainer_detect_grad.main(sft_trainer_detect_grad.DetectGradConfig(
        model="tiny", dataset=str(root), output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, eval_limit=1,
        num_pictures=0, lora_rank=2, lora_alpha=4, max_objects=2, schedule_steps=8, warmup_ratio=0.25, lr=1e-3,
        baseline_eval=False))
    log = [json.loads(line) for line in (tmp_path / "out" / "log_detect_grad.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if r["event"] == "train"] == pytest.approx([5e-4, 1e-3])
