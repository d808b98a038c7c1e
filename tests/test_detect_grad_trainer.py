"""The main trainer end to end on the tiny preset: outputs, resume, Ctrl-C, accumulation, flag errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datasets import write_synthetic_coco
from finetune.checkpoint import read_metadata
from finetune.preparation import load_data
from finetune.trainer import Trainer, lr_multiplier
from sft_trainer_detect_grad import DetectGradConfig, main

FAST = dict(model="tiny", dataset="synthetic", eval_limit=2, max_objects=3, num_pictures=2, lr=1e-3,
            batch_size=4, grad_accum_steps=2, lora_rank=4, lora_alpha=8, negatives_per_positive=0.5)


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log_detect_grad.jsonl").read_text().splitlines()]


def test_short_run_writes_checkpoint_log_and_pictures(tmp_path):
    summary = main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=2, eval_interval=100))
    final = tmp_path / "moondream_lora_finetune_detect_grad.safetensors"
    assert Path(summary["final_path"]) == final and final.is_file()
    tensors = load_file(str(final))
    assert tensors and all("lora_" in k or k.startswith("region.") for k in tensors)
    meta = read_metadata(final)
    assert meta["lora"]["rank"] == 4 and meta["trainer"] == "detect_grad" and meta["step"] == 2
    log = records(tmp_path)
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2]
    evals = [r for r in log if r["event"] == "eval"]
    assert evals[0]["step"] == 0 and {"f1", "map", "map50", "precision", "recall"} <= evals[0].keys()
    assert any(r["split"] == "test" for r in evals)
    pictures = list((tmp_path / "pictures_detect_grad").glob("*.png"))
    assert len(pictures) == 3  # 2 test images + contact sheet
    assert (tmp_path / "resume_detect_grad.pt").is_file()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    main(DetectGradConfig(**FAST, output_dir=str(straight), max_steps=4, eval_interval=100))

    interrupted = tmp_path / "interrupted"
    original_step = Trainer.optimizer_step

    def ctrl_c_at_step_2(self, window):
        if self.state.step == 2:
            raise KeyboardInterrupt
        return original_step(self, window)

    monkeypatch.setattr(Trainer, "optimizer_step", ctrl_c_at_step_2)
    with pytest.raises(SystemExit) as stop:
        main(DetectGradConfig(**FAST, output_dir=str(interrupted), max_steps=4, eval_interval=100))
    assert stop.value.code == 130
    monkeypatch.setattr(Trainer, "optimizer_step", original_step)
    resume = interrupted / "resume_detect_grad.pt"
    assert torch.load(resume, weights_only=True)["state"]["step"] == 2
    main(DetectGradConfig(**FAST, output_dir=str(interrupted), max_steps=4, eval_interval=100, resume=str(resume)))

    a = load_file(str(straight / "moondream_lora_finetune_detect_grad.safetensors"))
    b = load_file(str(interrupted / "moondream_lora_finetune_detect_grad.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_a_resume_file_of_another_format_is_refused(tmp_path):
    from moondream2.errors import UserInputError

    main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=1, eval_interval=100))
    saved = torch.load(tmp_path / "resume_detect_grad.pt", weights_only=True)
    del saved["format"]  # as written before optimizer state was keyed by parameter name
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(UserInputError, match="older version"):
        main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=2, resume=str(tmp_path / "old.pt")))


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it calls Path.touch on the marker, i.e. runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_crafted_resume_file_is_refused_without_running_its_code(tmp_path):
    from moondream2.errors import UserInputError

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "resume_detect_grad.pt"
    torch.save({"format": "moondream-finetune-resume/3", "payload": _RunsCodeWhenUnpickled(marker)}, crafted)
    with pytest.raises(UserInputError, match="refused for safety"):
        main(DetectGradConfig(**FAST, output_dir=str(tmp_path / "run"), max_steps=2, resume=str(crafted)))
    assert not marker.exists()


def test_accumulation_ends_with_a_partial_step(tmp_path):
    data = write_synthetic_coco(tmp_path / "data", n_train=10, n_valid=2, n_test=2, seed=0)  # one epoch, quickly
    config = DetectGradConfig(**{**FAST, "grad_accum_steps": 3, "dataset": str(data)}, output_dir=str(tmp_path / "run"),
                              epochs=1, eval_interval=1000)
    summary = main(config)
    steps = [r for r in records(tmp_path / "run") if r["event"] == "train"]
    samples = load_data(config).train.samples(config.negatives_per_positive, seed=config.seed)
    n_batches = -(-len(samples) // config.batch_size)
    assert n_batches % 3 != 0  # the last window is shorter
    assert len(steps) == -(-n_batches // 3)  # ceil: the last, shorter window still steps
    assert summary["final_path"]


def test_warmup_sets_the_rate_before_the_first_step():
    assert lr_multiplier(0, total=100, warmup=10) == pytest.approx(0.1)
    assert lr_multiplier(9, total=100, warmup=10) == pytest.approx(1.0)
    assert lr_multiplier(100, total=100, warmup=10) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model=tiny", "--bogus=1"], "unknown flag --bogus"),
        (["--model=tiny", "--dataset=/nonexistent/data"], "/nonexistent/data"),
        (["--model=huge"], "--model=huge"),
        (["--model=tiny", "--lr=-1"], "--lr"),
    ],
)
def test_bad_flags_give_one_line_errors(args, message, tmp_path):
    result = subprocess.run([sys.executable, "sft_trainer_detect_grad.py", f"--output_dir={tmp_path}", *args],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
