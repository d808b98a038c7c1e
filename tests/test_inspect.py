"""`python -m datasets.inspect PATH`: the numbers, warnings and pictures a user checks before a run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from datasets.inspect import InspectConfig, main

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl_dataset(root: Path) -> Path:
    """train: a.png 100x50 with cat (40,15,60,35), a 2-px-wide dog, and a cat reaching past the right
    edge; b.png with no boxes. valid: a.png with one bird (a class train never sees)."""
    root.mkdir(parents=True)
    for name, size in (("a.png", (100, 50)), ("b.png", (80, 60))):
        Image.new("RGB", size, (90, 120, 200)).save(root / name)
    train = [{"image": "a.png", "objects": [{"label": "cat", "bbox": [40, 15, 60, 35]},
                                            {"label": "dog", "bbox": [10, 10, 12, 40]},
                                            {"label": "cat", "bbox": [90, 0, 130, 20]}]},
             {"image": "b.png", "objects": []}]
    valid = [{"image": "a.png", "objects": [{"label": "bird", "bbox": [0, 0, 50, 50]}]}]
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in train))
    (root / "valid.jsonl").write_text("\n".join(json.dumps(x) for x in valid))
    return root


def test_inspect_reports_counts_spreads_warnings_and_draws_each_split(tmp_path, capsys):
    dataset = write_jsonl_dataset(tmp_path / "data")
    report = main(InspectConfig(dataset=str(dataset), out=str(tmp_path / "out"), num_pictures=4))
    train = report["splits"]["train"]
    assert report["format"] == "jsonl (pixel coordinates)" and "test" not in report["splits"]
    assert (train["images"], train["negatives"], train["boxes"], train["classes"]) == (2, 1, 3, 2)
    assert train["boxes_per_image"] == {"min": 0, "median": 1.5, "max": 3}
    # box sides: sqrt(20*20)=20, sqrt(2*30)=7.75, the clipped cat sqrt(10*20)=14.1
    assert train["box_side_px"] == pytest.approx({"min": 60 ** 0.5, "median": 200 ** 0.5, "max": 20})
    assert train["boxes_per_class"] == {"cat": 2, "dog": 1}
    assert report["warnings"] == ["train: 1 tiny box(es), under 4 px on a side",
                                  "train: 1 box(es) reach outside the image (clipped to it)",
                                  "2 class(es) only in train: cat, dog", "1 class(es) only in valid: bird"]
    for split in ("train", "valid"):
        sheet = Image.open(tmp_path / "out" / f"contact_sheet_{split}.png")
        assert sheet.width > 0 and sheet.height > 0
    printed = capsys.readouterr().out
    assert "train: 2 images (1 without boxes), 3 boxes, 2 classes" in printed
    assert "warning: 1 class(es) only in valid: bird" in printed


def test_inspect_passes_loader_warnings_through(tmp_path):
    dataset = write_jsonl_dataset(tmp_path / "data")
    (dataset / "valid.jsonl").write_text(json.dumps({"image": "a.png", "objects": [{"label": "cat",
                                                                                    "bbox": [200, 0, 300, 10]}]}))
    report = main(InspectConfig(dataset=str(dataset), out=str(tmp_path / "out"), num_pictures=0))
    assert any(w.startswith("valid: ") and "dropped 1 box(es) with zero area or outside the image" in w
               for w in report["warnings"])
    assert not (tmp_path / "out").exists()  # no pictures asked for, nothing written


def test_inspect_from_the_command_line_takes_the_path_first(tmp_path):
    dataset = write_jsonl_dataset(tmp_path / "data")
    run = lambda *args: subprocess.run([sys.executable, "-m", "datasets.inspect", *args], capture_output=True,
                                       text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    ok = run(str(dataset), f"--out={tmp_path / 'out'}", "--num_pictures=1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{dataset}: jsonl (pixel coordinates)")
    assert (tmp_path / "out" / "contact_sheet_valid.png").is_file()
    (dataset / "train.jsonl").write_text('{"image": "a.png"}\n')
    bad = run(str(dataset), f"--out={tmp_path / 'out'}")
    assert bad.returncode == 2
    assert bad.stderr.strip() == f'error: {dataset / "train.jsonl"}: line 1: expected {{"image": PATH, "objects": [...]}}'
