"""What a new user meets first: the default model, `--help`, and the messages of the four scripts."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import fire.parser
import pytest

from evaluate import EvaluateConfig
from finetune.cli import flag_help, run_cli
from finetune.trainer import Trainer
from grpo_trainer import GRPOConfig
from sft_trainer import SFTConfig
from sft_trainer_detect_grad import DetectGradConfig
from sft_trainer_detect_grad import main as detect_grad_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "sft_trainer_detect_grad.py": DetectGradConfig,
    "sft_trainer.py": SFTConfig,
    "grpo_trainer.py": GRPOConfig,
    "evaluate.py": EvaluateConfig,
}


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The script as a user runs it, offline (conftest sets HF_HUB_OFFLINE), from another directory."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.parametrize("config", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_every_script_defaults_to_the_real_moondream2(config):
    assert config().model == "md2"


def test_missing_weights_fail_fast_with_the_download_command_and_offline_presets(tmp_path):
    start = time.monotonic()
    result = run_script("sft_trainer_detect_grad.py", "--dataset=synthetic", cwd=tmp_path)
    assert time.monotonic() - start < 60  # no 2-billion-parameter model built, no retried download
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for part in ("moondream2/model.safetensors", "hf download vikhyatk/moondream2 model.safetensors",
                 "--model=tiny "):
        assert part in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_anywhere_prints_every_flag_and_exits_without_touching_the_disk(script, tmp_path):
    result = run_script(script, "--seed=3", "--help", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Optional" not in result.stdout and "Traceback" not in result.stderr
    listed = [line.split()[0].split("=")[0] for line in result.stdout.splitlines() if line.startswith("  --")]
    assert listed == [f"--{f.name}" for f in dataclasses.fields(SCRIPTS[script])]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("config", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_short_help_wins_over_other_flags_even_unknown_ones(config, capsys):
    def main(_):
        raise AssertionError("--help must not run the script")

    with pytest.raises(SystemExit) as stop:
        run_cli(config, main, "the description", ["--bogus=1", "-h", "--lr=oops"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("the description\n") and "--model=md2" in out


@pytest.mark.parametrize("config", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_every_flag_has_a_one_line_description(config):
    helps = flag_help(config)
    assert [name for name, text in helps.items() if not text.strip()] == []
    assert not any("\n" in text for text in helps.values())


@pytest.mark.parametrize("flag", ["--wandb=True", "--resume=r.pt", "--max_steps=3", "--eval_interval=5"])
def test_evaluate_refuses_training_flags_it_would_ignore(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(EvaluateConfig, lambda _: None, "evaluate", ["--model=tiny", flag])
    assert stop.value.code == 2
    assert "unknown flag " + flag.split("=")[0] in capsys.readouterr().err


@pytest.mark.parametrize("improves, best_at, test_column", [
    (False, "at the baseline)", "test(final)"),
    (True, "at step 2)", "test(best@2)"),
])
def test_messages_name_the_weights_they_are_about(improves, best_at, test_column, tmp_path, monkeypatch, capsys):
    """Validation scores rise (or fall) with every evaluation, so the best weights are known in advance."""
    monkeypatch.setattr(Trainer, "score", lambda self, metrics: self.state.step * (1.0 if improves else -1.0))
    summary = detect_grad_main(DetectGradConfig(
        model="tiny", dataset="synthetic", output_dir=str(tmp_path), max_steps=2, eval_interval=1, eval_limit=1,
        max_objects=2, num_pictures=0, batch_size=2, grad_accum_steps=1, lora_rank=2, lora_alpha=4))
    out = capsys.readouterr().out
    last_validation = [line for line in out.splitlines() if "best score" in line][-1]
    assert "at step None" not in out and last_validation.endswith(best_at)
    assert test_column in summary["metrics"] and f" {test_column}" in out  # apart from the column before


def script_flags() -> set[str]:
    """Every flag a script accepts: its fields and the original scripts' names (FLAG_ALIASES)."""
    from datasets.inspect import InspectConfig
    from export import ExportConfig

    return {name for config in [*SCRIPTS.values(), ExportConfig, InspectConfig]
            for name in [f.name for f in dataclasses.fields(config)] + list(getattr(config, "FLAG_ALIASES", {}))}


def benchmark_flags() -> set[str]:
    from benchmarks import detect_latency, grpo_variants, run_all, shared_prefix, train_step, trainers

    return {name for module in (detect_latency, grpo_variants, run_all, shared_prefix, train_step, trainers)
            for name in inspect.signature(module.main).parameters}


def test_every_flag_the_readme_mentions_exists():
    mentioned = set(re.findall(r"--([a-z][a-z0-9_]*)", (ROOT / "README.md").read_text()))
    others = {"help", "nproc_per_node"}  # --help itself, and torchrun's own flag
    assert mentioned - script_flags() - benchmark_flags() - others == set()


def test_the_readme_defaults_row_matches_the_scripts():
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| defaults |"))
    cells = row.strip("|").split("|")[1:]
    for config, cell in zip((DetectGradConfig, SFTConfig, GRPOConfig), cells, strict=True):
        for name, value in re.findall(r"--([a-z_]+)=([^\s`]+)", cell):
            name = getattr(config, "FLAG_ALIASES", {}).get(name, name)
            assert str(getattr(config(), name)) == str(fire.parser.DefaultParseValue(value)), name


@dataclasses.dataclass
class ListFlags:
    """A config with a repeatable list of names and a list of numbers, as GRPO's --reward/--reward_weights."""

    names: tuple | None = None
    weights: tuple[float, ...] | None = None
    seed: int = 0
    REPEATABLE_FLAGS = ("names", "weights")

    def __post_init__(self):
        from finetune.validation import check_field_types

        check_field_types(self)


@pytest.mark.parametrize("argv", [
    ["--names=a", "--weights=1", "--names=b.py:f", "--seed=3", "--weights=0.5"],
    ["--names", "a", "--names", "b.py:f", "--weights=[1,0.5]", "--seed", "3"],
    ["--names=a,b.py:f", "--weights=1,0.5", "--seed=3"],
])
def test_a_repeatable_flag_may_be_given_several_times_or_as_a_list(argv):
    seen = []
    run_cli(ListFlags, seen.append, "lists", argv)
    (config,) = seen
    assert config.seed == 3 and config.weights == (1.0, 0.5)
    assert ",".join(config.names) == "a,b.py:f"  # one text or two names: the reward loader splits commas


@pytest.mark.parametrize("flag", ["--weights=[1,abc]", "--weights=nan", "--weights"])
def test_a_list_of_numbers_refuses_other_values_in_one_line(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(ListFlags, lambda _: None, "lists", [flag])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --weights"), err
