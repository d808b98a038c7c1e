"""Bad flags, data and events stop with one line (or recover) instead of a traceback or a silent bad run."""

import sys
from pathlib import Path

import pytest

import evaluate
from finetune.cli import run_cli
from sft_trainer_detect_grad import DetectGradConfig, main

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(model="tiny", dataset="synthetic", eval_limit=2, max_objects=3, num_pictures=1, lr=1e-3,
            batch_size=4, lora_rank=4, lora_alpha=8)


def cli_error(capsys, config_cls, entry, argv: list[str]) -> str:
    """The one `error:` line `run_cli` prints for `argv` (exit code 2)."""
    with pytest.raises(SystemExit) as stop:
        run_cli(config_cls, entry, "test", argv=argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def never(config):
    raise AssertionError("the run must not start")


@pytest.mark.parametrize("flag, expected", [
    ("--lr=abc", "--lr=abc: must be a finite number"),
    ("--lr=nan", "--lr=nan"),
    ("--lr=inf", "--lr=inf"),
    ("--lr", "--lr needs a value"),
    ("--lora_rank=0", "--lora_rank=0: use 1 or more"),
    ("--lora_rank=-1", "--lora_rank=-1"),
    ("--lora_rank=abc", "--lora_rank=abc: must be a whole number"),
    ("--lora_alpha=abc", "--lora_alpha=abc"),
    ("--lora_dropout=1.5", "--lora_dropout=1.5"),
    ("--batch_size=1.5", "--batch_size=1.5: must be a whole number"),
    ("--grad_accum_steps=abc", "--grad_accum_steps=abc"),
    ("--seed=abc", "--seed=abc"),
    ("--max_objects=-1", "--max_objects=-1"),
    ("--max_objects=0", "--max_objects=0"),
    ("--eval_interval=0", "--eval_interval=0"),
    ("--eval_interval=-1", "--eval_interval=-1"),
    ("--max_steps=0", "--max_steps=0"),
    ("--max_steps=-3", "--max_steps=-3"),
    ("--max_grad_norm=-1", "--max_grad_norm=-1"),
    ("--use_lora=maybe", "--use_lora=maybe: use True or False"),
    ("--epochs=2.5", "--epochs=2.5"),
    ("stray", "unexpected argument 'stray'"),
    ("--output_dir=README.md", "README.md is a file"),
    ("--output_dir=README.md/sub", "README.md is a file"),
])
def test_bad_training_flags_stop_before_the_run(capsys, monkeypatch, flag, expected):
    monkeypatch.chdir(ROOT)
    assert expected in cli_error(capsys, DetectGradConfig, never, ["--model=tiny", flag])


@pytest.mark.parametrize("flag, expected", [
    ("--limit=-1", "--limit=-1"),
    ("--batch_size=0", "--batch_size=0"),
    ("--out=README.md", "README.md is a file"),
])
def test_bad_evaluation_flags_stop_before_the_run(capsys, monkeypatch, flag, expected):
    monkeypatch.chdir(ROOT)
    assert expected in cli_error(capsys, evaluate.EvaluateConfig, never, ["--model=tiny", flag])


def test_good_flags_are_normalised_to_their_annotations(tmp_path):
    config = DetectGradConfig(output_dir=str(tmp_path), lr=1, lora_targets=["qkv"], classes="cat")
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.lora_targets == ("qkv",) and config.classes == ("cat",)


def test_a_lora_target_matching_no_layer_stops_before_training(capsys, tmp_path):
    message = cli_error(capsys, DetectGradConfig, main,
                        [*(f"--{k}={v}" for k, v in FAST.items()), f"--output_dir={tmp_path}", "--lora_targets=[qkv,nope]"])
    assert "'nope' matches no layer" in message and "qkv" in message
    assert not list(tmp_path.glob("log_*"))  # nothing ran
