"""Watching a run: early stopping, validation pictures at every evaluation, curves, and what wandb gets."""

import json
import subprocess
import sys
import types
from pathlib import Path

from PIL import Image

from finetune.plot import plot_run, read_log, series
from finetune.trainer import Trainer
from sft_trainer_detect_grad import DetectGradConfig, main

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(model="tiny", dataset="synthetic", eval_limit=2, max_objects=2, num_pictures=2, lr=1e-3, batch_size=2,
            grad_accum_steps=1, lora_rank=2, lora_alpha=4, eval_interval=1)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log_detect_grad.jsonl").read_text().splitlines()]


def test_early_stopping_stops_after_patience_evaluations_and_keeps_the_best(tmp_path, monkeypatch, capsys):
    # Validation is best at step 1 and no better after it: with patience 2 the run stops at step 3.
    monkeypatch.setattr(Trainer, "score", lambda self, metrics: 1.0 if self.state.step == 1 else 0.0)
    summary = main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=20, early_stopping_patience=2))
    log = events(tmp_path)
    assert max(e["step"] for e in log if e["event"] == "train") == 3
    assert [(e["step"], e["patience"]) for e in log if e["event"] == "early_stop"] == [(3, 2)]
    assert [e["step"] for e in log if e["event"] == "eval" and e["split"] == "val"] == [0, 1, 2, 3]  # not twice at 3
    assert summary["best_path"] == str(tmp_path / "moondream_lora_best_step_1_detect_grad.safetensors")
    assert Path(summary["best_path"]).is_file() and Path(summary["final_path"]).is_file()
    assert "test(best@1)" in summary["metrics"] and "final" in summary["metrics"]
    assert "early stopping at step 3: 2 evaluations without a better validation score" in capsys.readouterr().out


def test_every_evaluation_draws_the_same_validation_images_and_the_run_ends_with_curves(tmp_path):
    main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=2))
    pictures = tmp_path / "pictures_detect_grad"
    steps = sorted(p.name for p in pictures.glob("step_*"))
    assert steps == ["step_0", "step_1", "step_2"]
    names = [sorted(p.name for p in (pictures / s).glob("*.png")) for s in steps]
    assert names[0] == names[1] == names[2] and len(names[0]) == 3  # 2 pictures + contact sheet, same images
    curves = Image.open(tmp_path / "curves_detect_grad.png")
    assert curves.size == (1000, 700)


def test_wandb_gets_the_flags_the_run_name_pictures_and_curves(tmp_path, monkeypatch):
    calls = {"init": [], "log": []}
    fake = types.ModuleType("wandb")
    fake.Image = lambda path, caption=None: ("image", Path(path).name, caption)
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or types.SimpleNamespace(
        log=lambda data, step=None: calls["log"].append((step, data)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=1, wandb_project="shapes", run_name="try-1"))
    (init,) = calls["init"]
    assert (init["project"], init["name"]) == ("shapes", "try-1")
    assert init["config"]["lr"] == 1e-3 and init["config"]["early_stopping_patience"] is None
    pictures = [(step, data["val_pictures"]) for step, data in calls["log"] if "val_pictures" in data]
    assert [step for step, _ in pictures] == [0, 1]
    assert all(len(images) == 2 and all(kind == "image" for kind, _, _ in images) for _, images in pictures)
    assert [data["curves"] for _, data in calls["log"] if "curves" in data] == [
        [("image", "curves_detect_grad.png", "curves_detect_grad")]]


def write_log(path: Path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_curves_read_the_latest_run_and_tolerate_a_half_written_line(tmp_path):
    write_log(tmp_path / "log_sft.jsonl", [
        {"event": "config", "resume": None},
        {"event": "train", "step": 1, "loss": 9.0, "lr": 1.0},  # an earlier run in the same directory
        {"event": "config", "resume": None},
        {"event": "eval", "split": "val", "step": 0, "f1": 0.1, "map": 0.0},
        {"event": "train", "step": 1, "loss": 3.0, "lr": 1e-4},
        {"event": "train", "step": 2, "loss": 2.0, "lr": 2e-4},
        {"event": "config", "resume": "resume_sft.pt"},  # resumed: the same run goes on
        {"event": "train", "step": 2, "loss": 1.5, "lr": 2e-4},
        {"event": "eval", "split": "val", "step": 2, "f1": 0.5, "map": 0.25},
        {"event": "eval", "split": "test", "step": 2, "f1": 0.9, "map": 0.9},
        '{"event": "train", "step": 3, "lo',
    ])
    curves = series(read_log(tmp_path / "log_sft.jsonl"))
    assert curves == {"training loss": ([1, 2], [3.0, 1.5]), "learning rate": ([1, 2], [1e-4, 2e-4]),
                      "validation F1": ([0, 2], [0.1, 0.5]), "validation mAP": ([0, 2], [0.0, 0.25])}
    assert plot_run(tmp_path) == [tmp_path / "curves_sft.png"]
    assert Image.open(tmp_path / "curves_sft.png").size == (1000, 700)


def test_plot_from_the_command_line(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "finetune.plot", *args], capture_output=True, text=True,
                                       cwd=ROOT, timeout=120)
    bad = run(str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path}: no log_*.jsonl here; pass a trainer's --output_dir"
    write_log(tmp_path / "log_grpo.jsonl", [{"event": "config"}, {"event": "train", "step": 1, "loss": 1.0, "lr": 1e-5}])
    ok = run(str(tmp_path))
    assert ok.returncode == 0 and ok.stdout.strip() == str(tmp_path / "curves_grpo.png")
