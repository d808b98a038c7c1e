"""Bad flags, data and events stop with one line (or recover) instead of a traceback or a silent bad run."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import evaluate
from datasets import load_image, load_split, write_synthetic_coco
from finetune import checkpoint
from finetune.base_model import build_model
from finetune.checkpoint import read_metadata
from finetune.files import atomic_write
from finetune.cli import run_cli
from finetune.feature_cache import FeatureCache
from finetune.interrupts import NonFiniteLoss
from finetune.preparation import load_data
from finetune.runlog import RunLog
from finetune.trainer import Trainer
from moondream2.errors import DiskFull, UserInputError
from pretrain_base import PretrainConfig
from sft_trainer import SFTConfig
from sft_trainer import main as sft_main
from sft_trainer_detect_grad import DetectGradConfig, main

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(model="tiny", dataset="synthetic", eval_limit=2, max_objects=3, num_pictures=1, lr=1e-3,
            batch_size=4, grad_accum_steps=2, lora_rank=4, lora_alpha=8)


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


@pytest.mark.parametrize("config_cls, flag, name, wanted", [
    (DetectGradConfig, "--output_dir", "run", "a directory"),
    (evaluate.EvaluateConfig, "--out", "eval", "a directory"),
    (PretrainConfig, "--out", "base/model.safetensors", "a file in a directory"),
])
def test_a_directory_that_cannot_be_written_stops_before_the_run(capsys, monkeypatch, tmp_path, config_cls, flag,
                                                                 name, wanted):
    """Simulated (root may write anywhere, so chmod alone cannot show this when tests run as root)."""
    locked, real_access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    argv = ["--model=tiny", f"--output_dir={tmp_path}", f"{flag}={locked / name}"]
    message = cli_error(capsys, config_cls, never, argv)
    assert message == f"error: {flag}={locked / name}: {locked} is not writable; pass {wanted} you can write to"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory anyway")
def test_a_read_only_output_dir_stops_before_the_run(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert "is not writable" in cli_error(capsys, DetectGradConfig, never, ["--model=tiny", f"--output_dir={locked}"])


def test_pretraining_checks_its_out_file_before_training(capsys, tmp_path):
    argv = ["--model=tiny", f"--output_dir={tmp_path}"]
    assert f"--out={tmp_path} is a directory; pass a file name" in cli_error(
        capsys, PretrainConfig, never, [*argv, f"--out={tmp_path}"])
    assert "README.md is a file, not a directory; pass a file in a directory" in cli_error(
        capsys, PretrainConfig, never, [*argv, f"--out={ROOT / 'README.md' / 'base.safetensors'}"])


def test_good_flags_are_normalised_to_their_annotations(tmp_path):
    config = DetectGradConfig(output_dir=str(tmp_path), lr=1, lora_targets=["qkv"], classes="cat")
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.lora_targets == ("qkv",) and config.classes == ("cat",)


def test_a_lora_target_matching_no_layer_stops_before_training(capsys, tmp_path):
    message = cli_error(capsys, DetectGradConfig, main,
                        [*(f"--{k}={v}" for k, v in FAST.items()), f"--output_dir={tmp_path}", "--lora_targets=[qkv,nope]"])
    assert "'nope' matches no layer" in message and "qkv" in message
    assert not list(tmp_path.glob("log_*"))  # nothing ran


# ---- data ------------------------------------------------------------------------------------------
CATS = [{"id": 1, "name": "cat"}]


def coco_split(directory: Path, images: list[dict], annotations: list[dict] | None = None,
               categories: list[dict] | None = None, size: tuple[int, int] = (64, 48)) -> Path:
    """A Roboflow-layout split `directory/train` whose images exist at `size`; returns the dataset directory."""
    split = directory / "train"
    split.mkdir(parents=True, exist_ok=True)
    for entry in images:
        if entry["file_name"] and "/" not in entry["file_name"]:
            Image.new("RGB", size, (128, 128, 128)).save(split / entry["file_name"])
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}] if annotations is None else annotations
    coco = {"images": images, "annotations": annotations, "categories": categories or CATS}
    (split / "_annotations.coco.json").write_text(json.dumps(coco))
    return directory


@pytest.mark.parametrize("file_name", ["../../outside.png", "/etc/passwd", "sub/../../../x.png", ""])
def test_image_paths_must_stay_inside_the_dataset(tmp_path, file_name):
    dataset = coco_split(tmp_path / "data", [{"id": 1, "file_name": file_name}])
    with pytest.raises(UserInputError, match="outside the dataset directory") as err:
        load_split(dataset, "train", skip_bad_images=True)
    assert repr(file_name) in str(err.value) and "image id 1" in str(err.value)


@pytest.mark.parametrize("bbox", [[True, 2, 10, 10], [1, 2, "10", 10], [1, 2, None, 10]])
def test_bbox_values_must_be_numbers(tmp_path, bbox):
    dataset = coco_split(tmp_path, [{"id": 1, "file_name": "a.png"}],
                         [{"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox}])
    with pytest.raises(UserInputError, match="annotation id 7"):
        load_split(dataset, "train")


@pytest.mark.parametrize("name, rename", [("", None), ("  ", None), ("cat", {"cat": ""})])
def test_a_class_needs_a_name(tmp_path, name, rename):
    dataset = coco_split(tmp_path, [{"id": 1, "file_name": "a.png"}], categories=[{"id": 1, "name": name}])
    with pytest.raises(UserInputError, match="category id 1 .*non-empty name"):
        load_split(dataset, "train", rename=rename)


def test_the_image_file_size_wins_over_the_json_with_one_warning(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 640, "height": 480} for i in (1, 2)]
    dataset = coco_split(tmp_path, images, size=(64, 48))
    with pytest.warns(UserWarning, match="2 image\\(s\\) differ .*annotations 640x480, file 64x48") as caught:
        split = load_split(dataset, "train")
    assert len(caught) == 1
    assert (split.images[0].width, split.images[0].height) == (64, 48)
    assert split.images[0].boxes_by_class["cat"][0] == pytest.approx((1 / 64, 2 / 48, 11 / 64, 12 / 48))


def test_a_float_image_in_0_1_is_scaled_not_clipped_to_black(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, 0].tolist() == [128, 128, 128]


def truncate(path: Path) -> None:
    """Keep a JPEG's header (its size still reads) but cut its pixel data."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_skip_bad_images_decodes_up_front(tmp_path):
    dataset = coco_split(tmp_path, [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2)])
    truncate(tmp_path / "train" / "2.jpg")
    assert len(load_split(dataset, "train").images) == 2  # the header alone looks fine
    with pytest.warns(UserWarning, match="skipped 1 missing or unreadable image.*2.jpg"):
        assert [r.image_id for r in load_split(dataset, "train", skip_bad_images=True).images] == [1]


# ---- events during a run ---------------------------------------------------------------------------
def test_a_diverging_loss_stops_without_saving_nan_weights(tmp_path):
    with pytest.raises(NonFiniteLoss, match="training diverged: the .* became nan at step .*--lr=1000000.0"):
        main(DetectGradConfig(**{**FAST, "lr": 1e6}, output_dir=str(tmp_path), max_steps=4, eval_interval=1))
    assert not (tmp_path / "moondream_lora_finetune_detect_grad.safetensors").exists()
    saved = torch.load(tmp_path / "resume_detect_grad.pt", weights_only=False)  # the last good state
    assert all(torch.isfinite(v).all() for v in saved["trained"].values())
    assert json.loads((tmp_path / "log_detect_grad.jsonl").read_text().splitlines()[-1])["event"] == "diverged"


def interrupt_when(monkeypatch, method: str, condition) -> None:
    """Make `Trainer.<method>` raise KeyboardInterrupt (Ctrl-C) when `condition(trainer, *args)` holds."""
    original = getattr(Trainer, method)

    def wrapped(self, *args, **kwargs):
        if condition(self, *args, **kwargs):
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, method, wrapped)


def test_ctrl_c_during_the_baseline_exits_cleanly_with_nothing_to_save(tmp_path, monkeypatch):
    interrupt_when(monkeypatch, "validate_and_checkpoint", lambda trainer: trainer.state.step == 0)
    with pytest.raises(SystemExit) as stop:
        main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=2))
    assert stop.value.code == 130 and not (tmp_path / "resume_detect_grad.pt").exists()


def test_ctrl_c_during_the_final_report_keeps_the_final_state(tmp_path, monkeypatch):
    interrupt_when(monkeypatch, "evaluate", lambda trainer, split, desc, n_pictures=0: desc == "test")
    with pytest.raises(SystemExit) as stop:
        main(DetectGradConfig(**FAST, output_dir=str(tmp_path), max_steps=1, eval_interval=100))
    assert stop.value.code == 130
    assert (tmp_path / "moondream_lora_finetune_detect_grad.safetensors").is_file()
    assert torch.load(tmp_path / "resume_detect_grad.pt", weights_only=False)["state"]["step"] == 1


def test_an_image_broken_mid_run_saves_a_resumable_state_first(tmp_path, monkeypatch):
    dataset = tmp_path / "data"
    write_synthetic_coco(dataset, n_train=12, n_valid=2, n_test=0, seed=3, image_size=64, max_objects=2)
    original = Trainer.optimizer_step

    def break_images_after_step_1(self, window):
        if self.state.step == 1:
            for path in (dataset / "train").glob("*.png"):
                path.write_bytes(b"broken")
        return original(self, window)

    monkeypatch.setattr(Trainer, "optimizer_step", break_images_after_step_1)
    config = DetectGradConfig(**{**FAST, "dataset": str(dataset), "batch_size": 2}, output_dir=str(tmp_path / "out"),
                              max_steps=4, eval_interval=100, feature_cache="off")
    with pytest.raises(UserInputError, match="cannot read image .*progress saved: continue with --resume="):
        main(config)
    assert torch.load(tmp_path / "out" / "resume_detect_grad.pt", weights_only=False)["state"]["step"] == 1


def test_sigterm_saves_a_state_that_resume_continues(tmp_path):
    command = [sys.executable, str(ROOT / "sft_trainer_detect_grad.py"), *(f"--{k}={v}" for k, v in FAST.items()),
               f"--output_dir={tmp_path}", "--max_steps=1000", "--eval_interval=1000", "--eval_limit=1"]
    log = tmp_path / "log_detect_grad.jsonl"
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (log.is_file() and '"event": "train"' in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 143, run.stderr.read()
    step = torch.load(tmp_path / "resume_detect_grad.pt", weights_only=False)["state"]["step"]
    assert step >= 1
    resumed = subprocess.run([*command[:-3], f"--max_steps={step + 1}", "--eval_limit=1",
                              f"--resume={tmp_path / 'resume_detect_grad.pt'}"], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'resume_detect_grad.pt'} at step {step}" in resumed.stdout
    assert read_metadata(tmp_path / "moondream_lora_finetune_detect_grad.safetensors")["step"] == step + 1


def test_the_splits_found_are_reported_and_a_broken_one_is_an_error(tmp_path, capsys):
    dataset = tmp_path / "data"
    write_synthetic_coco(dataset, n_train=4, n_valid=2, n_test=0, seed=3, image_size=64, max_objects=2)
    config = DetectGradConfig(**{**FAST, "dataset": str(dataset)}, output_dir=str(tmp_path))
    data = load_data(config)
    assert data.val is not None and data.test is None
    assert "splits: train 4 images; valid 2 images; test not found (no test report)" in capsys.readouterr().out

    (dataset / "valid" / "_annotations.coco.json").write_text("{broken")
    with pytest.raises(UserInputError, match="valid/_annotations.coco.json: malformed JSON"):
        load_data(config)


def test_the_disk_feature_cache_is_keyed_on_the_model_and_survives_a_truncated_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    image, cache_dir = tmp_path / "a.png", tmp_path / "cache"
    first, other = (build_model("tiny", device="cpu", seed=seed) for seed in (0, 1))
    features = FeatureCache(first, "disk", cache_dir)(image)
    assert not torch.allclose(FeatureCache(other, "disk", cache_dir)(image), features)  # not the first model's file
    files = sorted(cache_dir.glob("*.pt"))
    assert len(files) == 2 and not list(cache_dir.glob(".*"))  # no temporary files left behind

    for file in files:
        file.write_bytes(file.read_bytes()[:20])
    assert torch.allclose(FeatureCache(first, "disk", cache_dir)(image), features)  # recomputed, not a crash
    first.image_embeddings = None  # a hit must not encode
    assert torch.allclose(FeatureCache(first, "disk", cache_dir)(image), features)


def test_a_class_name_too_long_for_the_context_is_refused_with_the_limit(tmp_path, capsys):
    long_name = "very long class name " * 60
    dataset = coco_split(tmp_path / "data", [{"id": 1, "file_name": "a.png"}], categories=[{"id": 1, "name": long_name}])
    message = cli_error(capsys, evaluate.EvaluateConfig, evaluate.main,
                        ["--model=tiny", f"--dataset={dataset}", "--split=train", f"--out={tmp_path / 'out'}"])
    assert "class name 'very long class name very long class nam...' has a detect prompt of" in message
    assert "--max_objects=50 the context of 2048 leaves room for 1168" in message
    assert "'very long" in cli_error(capsys, DetectGradConfig, main,
                                     [*(f"--{k}={v}" for k, v in FAST.items()), f"--dataset={dataset}",
                                      f"--output_dir={tmp_path / 'out'}", "--max_objects=50"])
    assert "--max_objects=1000: the context of 2048 tokens fits at most 439" in cli_error(
        capsys, DetectGradConfig, main, [*(f"--{k}={v}" for k, v in FAST.items()), f"--output_dir={tmp_path / 'out'}",
                                         "--max_objects=1000"])


@pytest.mark.parametrize("trainer", ["detect_grad", "sft"])
def test_ctrl_c_mid_step_with_dropout_resumes_bit_exact(tmp_path, monkeypatch, trainer):
    """Ctrl-C after a step's dropout masks were drawn: the resumed run must redraw the same masks, so
    the RNG saved is the one from before the interrupted step, not the one at the moment of Ctrl-C."""
    config_cls, entry = (DetectGradConfig, main) if trainer == "detect_grad" else (SFTConfig, sft_main)
    settings = dict(**FAST, lora_dropout=0.3, max_steps=4, eval_interval=100, baseline_eval=False)
    entry(config_cls(**settings, output_dir=str(tmp_path / "straight")))

    original = Trainer.apply_gradients

    def ctrl_c_before_step_3_applies(self):
        if self.state.step == 2:  # step 3's forward and backward (and dropout) are done
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "apply_gradients", ctrl_c_before_step_3_applies)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(SystemExit):
        entry(config_cls(**settings, output_dir=str(interrupted)))
    monkeypatch.setattr(Trainer, "apply_gradients", original)
    resume = interrupted / f"resume_{trainer}.pt"
    assert torch.load(resume, weights_only=True)["state"]["step"] == 2
    entry(config_cls(**settings, output_dir=str(interrupted), resume=str(resume)))

    final = f"moondream_lora_finetune_{trainer}.safetensors"
    straight_weights = load_file(str(tmp_path / "straight" / final))
    resumed_weights = load_file(str(interrupted / final))
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), (name, (tensor - resumed_weights[name]).abs().max())


# ---- a full disk -----------------------------------------------------------------------------------
def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_save_no_space() -> Exception:
    """What torch.save into a Python file raises on a full disk: its C++ error, raised during the OSError."""
    try:
        raise _no_space()
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as err:
            return err


@pytest.mark.parametrize("error", [
    _no_space,
    _torch_save_no_space,
    lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, error):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"the previous checkpoint")

    def write_half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of a new")
        raise error()

    with pytest.raises(DiskFull) as err:
        atomic_write(path, write_half_then_fail)
    assert str(err.value) == (f"no space left on the disk while writing {path} (any earlier version of it is kept); "
                              "free some space there and run again")
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    def fail(tmp: str) -> None:
        raise OSError(errno.EIO, "input/output error")

    with pytest.raises(OSError, match="input/output error"):
        atomic_write(tmp_path / "x", fail)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_survives(tmp_path, capsys, monkeypatch):
    args = [*(f"--{k}={v}" for k, v in FAST.items()), f"--output_dir={tmp_path}", "--eval_interval=100",
            "--baseline_eval=False"]
    run_cli(DetectGradConfig, main, "test", argv=[*args, "--max_steps=1"])
    final = tmp_path / "moondream_lora_finetune_detect_grad.safetensors"
    previous = final.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(DetectGradConfig, main, "test", argv=[*args, "--max_steps=2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: no space left on the disk while writing {re.escape(str(tmp_path))}/\S+\.safetensors "
                        r"\(any earlier version of it is kept\); free some space there and run again", last), last
    assert final.read_bytes() == previous
    assert not list(tmp_path.glob(".*"))


def test_a_full_disk_while_logging_names_the_log(tmp_path, monkeypatch):
    log = RunLog(tmp_path, "detect_grad", {})

    def no_space(*args, **kwargs):
        raise _no_space()

    monkeypatch.setattr(Path, "open", no_space)
    with pytest.raises(DiskFull, match=f"while writing {tmp_path / 'log_detect_grad.jsonl'}; free some space"):
        log.write({"event": "train"})


def test_synthetic_data_stopped_mid_json_leaves_no_split_that_looks_finished(tmp_path, monkeypatch):
    """A split counts as generated once its JSON exists, so a half-written JSON must never be there."""
    real_write_text = Path.write_text

    def half_then_ctrl_c(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_coco(tmp_path, n_train=2, n_valid=0, n_test=0, seed=0, image_size=32, max_objects=1)
    assert len(list((tmp_path / "train").glob("*.png"))) == 2
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob(".*"))


def test_every_file_a_run_writes_arrives_by_rename(tmp_path, monkeypatch):
    """The README's claim: each output is written to a temporary file and renamed, never in place (the
    log alone is appended). Every rename is recorded; every file left behind must be among them."""
    renamed, real_replace = set(), os.replace

    def recording_replace(source, destination):
        renamed.add(Path(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording_replace)
    data, run = tmp_path / "data", tmp_path / "run"
    write_synthetic_coco(data, n_train=4, n_valid=2, n_test=2, seed=3, image_size=64, max_objects=2)
    summary = main(DetectGradConfig(**{**FAST, "dataset": str(data)}, output_dir=str(run), max_steps=2, eval_interval=1,
                                    feature_cache="disk"))
    evaluate.main(evaluate.EvaluateConfig(model="tiny", dataset=str(data), lora=summary["final_path"], compare=True,
                                          limit=2, num_pictures=1, max_objects=3, out=str(tmp_path / "eval")))
    written = {path for path in tmp_path.rglob("*") if path.is_file()}
    assert {p.suffix for p in written} >= {".json", ".png", ".pt", ".safetensors", ".jsonl"}
    assert written - renamed == {run / "log_detect_grad.jsonl"}
