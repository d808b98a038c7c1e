"""What a new user meets first: the default model, `--help`, and the messages of the four scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluate import EvaluateConfig
from grpo_trainer import GRPOConfig
from sft_trainer import SFTConfig
from sft_trainer_detect_grad import DetectGradConfig

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
                 "--model=tiny ", "--model=tiny-shapes"):
        assert part in lines[0]
    assert not any(tmp_path.iterdir())
